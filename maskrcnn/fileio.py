"""File helpers shared by every room: atomic writes, JSON files, checkpoints, image decoding.

Nothing written here is ever half-written: a crash leaves the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from maskrcnn.errors import InputError

# File name endings read as images when a folder is listed.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one.

    ``write`` receives a binary file object opened on a temporary file next to ``path``; the file is
    flushed, fsynced and renamed onto ``path``. If ``write`` raises, the temporary file is removed, the
    old ``path`` is untouched and the exception propagates.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_json(path: Union[str, Path], obj) -> None:
    """Atomically write ``obj`` as JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(obj).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def read_checkpoint(path: Union[str, Path]):
    """What a ``torch.save`` file holds (tensors on the CPU, read with ``weights_only``).

    Raises ``FileNotFoundError`` for a missing file and ``InputError`` naming it when it is unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise InputError(f"{path} is not a readable checkpoint: {exc}") from None


def read_json(path: Union[str, Path], what: str, expected: type):
    """The JSON value of the file ``path``, of type ``expected`` (``list`` or ``dict``).

    what: what the file should be, for the messages ("results file", "Label Studio export", ...).
    Raises ``FileNotFoundError`` for a missing file and :class:`InputError` naming the file when it is not
    readable JSON or holds another type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path} is not readable JSON: {exc}") from None
    if not isinstance(value, expected):
        raise InputError(f"{what} {path} holds a JSON {type(value).__name__}, expected a {expected.__name__}")
    return value


EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how the stored pixels are turned to be seen upright
# Orientation 1..8 -> (turns of 90 degrees counter-clockwise, then a left-right mirror), applied to the
# stored pixels to give the upright view (the EXIF 2.3 definition, as PIL's ImageOps.exif_transpose).
_ORIENT_STEPS = {1: (0, False), 2: (0, True), 3: (2, False), 4: (2, True), 5: (3, True), 6: (3, False),
                 7: (1, True), 8: (1, False)}


def exif_orientation(image: Union[str, Path, bytes, Image.Image]) -> int:
    """The EXIF orientation (1..8) of an image file, encoded bytes or PIL image; 1 when the image has
    none or an invalid one. Reads the header only: no pixel is decoded (a PNG's eXIf chunk counts when it
    comes before the pixel data, where PIL's header reading finds it)."""
    if isinstance(image, Image.Image):
        value = _header_exif(image).get(EXIF_ORIENTATION)
    else:
        try:
            with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
                value = _header_exif(img).get(EXIF_ORIENTATION)
        except (OSError, SyntaxError, ValueError):
            return 1
    return value if value in _ORIENT_STEPS else 1


def _header_exif(image: Image.Image) -> Image.Exif:
    """The EXIF of an opened PIL image as its header holds it. PIL's base-class reading: the PNG plugin's
    own ``getexif`` decodes every pixel first, to look for an eXIf chunk after them."""
    return Image.Image.getexif(image)


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The upright view of ``pixels`` ``(H, W, ...)`` stored with EXIF ``orientation`` (1..8): ``(H, W, ...)``
    for 1..4, ``(W, H, ...)`` for 5..8 (those turn the image by 90 degrees). A view, not a copy."""
    turns, mirror = _ORIENT_STEPS.get(orientation, (0, False))
    pixels = np.rot90(pixels, turns)
    return pixels[:, ::-1] if mirror else pixels


def swaps_axes(orientation: int) -> bool:
    """Whether EXIF ``orientation`` turns the image by 90 degrees (the upright width is the stored height)."""
    return orientation in (5, 6, 7, 8)


def image_header(path: Union[str, Path]) -> Tuple[int, int, int]:
    """``(height, width, orientation)`` of an image file from its header: the size in pixels of the upright
    image (EXIF ``orientation`` 1..8 applied; 5..8 swap the stored width and height).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that is not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = exif_orientation(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot read image file {path}: {exc}") from None
    return (width, height, orientation) if swaps_axes(orientation) else (height, width, orientation)


def read_image(path: Union[str, Path], where: str = "") -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array, upright: EXIF orientation applied, as
    phones, viewers and annotation tools show the photo (``H, W`` as :func:`image_size` gives them).

    Grayscale, 16-bit and RGBA files are converted to 8-bit RGB (alpha dropped).
    where: context for error messages, e.g. "image id 3 in instances.json".
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that does not decode.
    """
    path = Path(path)
    context = f" ({where})" if where else ""
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found{context}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise InputError(f"cannot read image file {path}{context}: not an image format OpenCV decodes")
    return np.ascontiguousarray(orient(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), exif_orientation(path)))


def decode_image(data: bytes, where: str = "encoded image") -> np.ndarray:
    """Decode an encoded image file held in memory (JPEG, PNG, ...) to an ``(H, W, 3)`` uint8 RGB array,
    upright as :func:`read_image` reads the same file. ValueError naming ``where`` when it does not decode."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) \
        if data else None
    if image is None:
        raise InputError(f"cannot decode {where}: not an image format OpenCV decodes")
    return np.ascontiguousarray(orient(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), exif_orientation(data)))


def upright(image: Image.Image) -> Image.Image:
    """A PIL image turned upright by its EXIF orientation (the image itself when it has none)."""
    return ImageOps.exif_transpose(image)


def read_class_names(path: Union[str, Path]) -> list:
    """Non-empty lines of a text file, stripped: one class name per line, for labels 1..K in order.

    Raises ``FileNotFoundError`` naming the file when it is absent.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def image_files(folder: Union[str, Path], *, recursive: bool = False) -> list:
    """The image files (by :data:`IMAGE_SUFFIXES`, any case) of ``folder``, or of its whole tree with
    ``recursive``, sorted by path; ValueError naming the folder if it holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    found = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return found
