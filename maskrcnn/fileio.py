"""File helpers shared by every room: atomic writes, JSON results, image decoding.

Nothing written here is ever half-written: a crash leaves the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

import cv2
import numpy as np

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


def read_image(path: Union[str, Path], where: str = "") -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array.

    Grayscale, 16-bit and RGBA files are converted to 8-bit RGB (alpha dropped). EXIF orientation is
    ignored: the pixels are returned as stored, the grid COCO annotations refer to.
    where: context for error messages, e.g. "image id 3 in instances.json".
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that does not decode.
    """
    path = Path(path)
    context = f" ({where})" if where else ""
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found{context}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError(f"cannot read image file {path}{context}: not an image format OpenCV decodes")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


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
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return found
