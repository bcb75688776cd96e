"""Label Studio tasks: detections -> a tasks file with predictions and its labeling config, and a JSON export
(or such a tasks file) -> a :class:`Conversion`.

A task is ``{"data": {"image": URL}, "annotations": [...], "predictions": [...]}``; each annotation or
prediction holds a ``result`` list of regions, each with ``type``, ``from_name`` / ``to_name`` (the control
and the image of the labeling config), ``original_width`` / ``original_height`` (the upright image's pixels)
and ``value``:

- ``polygonlabels``: ``points``, ``[[x, y], ...]`` in percent of the image's width and height (``(0, 0)``
  the top-left corner of the top-left pixel, ``(100, 100)`` the bottom-right corner of the last);
- ``brushlabels``: ``format: "rle"`` and ``rle``, Label Studio's run-length encoding (see :func:`encode_brush`)
  of the image's RGBA bytes, the mask in the alpha channel.

Each such region is one object, labelled ``value[type][0]``; regions of other types (rectangles, keypoints,
choices, ...) are skipped and counted (errors with ``strict``).

Images are named as Label Studio serves them: ``/data/local-files/?d=<path>`` (local storage; the path is
relative to ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``), ``/data/upload/<project>/<8 hex>-<name>`` (an upload,
prefixed by Label Studio) or any URL, whose last path component is the file name.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List, Optional, Sequence
from urllib.parse import parse_qs, quote, unquote, urlparse

import numpy as np

from maskrcnn.errors import InputError
from maskrcnn.fileio import atomic_write, read_json, save_json
from maskrcnn.data.formats.predictions import PredictedImage, Shape
from maskrcnn.data.formats.coco_writer import (Conversion, ImageRecord, Instance, Skipped, check_labels,
                                               check_points, check_size, class_names_from, relative_name)

IMAGE_KEY = "image"  # the task data key and the <Image> tag name of the labeling config
POLYGON_CONTROL = "polygon"  # the <PolygonLabels> control's name: the from_name of polygon regions
BRUSH_CONTROL = "brush"  # the <BrushLabels> control's name: the from_name of mask regions
LOCAL_FILES = "/data/local-files/?d="  # how Label Studio serves a file of a local storage
UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # what Label Studio puts before an uploaded file's name
BRUSH_RUN_BITS = (3, 4, 8, 16)  # the widths of a brush RLE chunk's length field (Label Studio's own choice)
READ_TYPES = ("polygonlabels", "brushlabels")


def labeling_config(class_names: Sequence[str]) -> str:
    """The labeling config (XML) of the tasks :func:`write_label_studio` writes: an image, a polygon and a
    brush control, each with a label per class."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=IMAGE_KEY, value=f"${IMAGE_KEY}", zoom="true")
    for tag, name in (("PolygonLabels", POLYGON_CONTROL), ("BrushLabels", BRUSH_CONTROL)):
        control = ET.SubElement(view, tag, name=name, toName=IMAGE_KEY)
        for class_name in class_names:
            ET.SubElement(control, "Label", value=class_name)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def write_label_studio(images: Sequence[PredictedImage], class_names: Sequence[str], folder, *,
                       model_version: str, image_root) -> List[Path]:
    """Write ``<folder>/tasks.json`` (one task per image, its shapes as a prediction of ``model_version``
    whose score is the mean of its regions' scores; an image without shapes has no prediction) and
    ``<folder>/labeling_config.xml``. Images are named ``/data/local-files/?d=<path relative to
    image_root>``: Label Studio serves them with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
    ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<image_root>``. Returns both paths."""
    folder, image_root = Path(folder), Path(image_root).resolve()
    tasks = []
    for image in images:
        relative = Path(os.path.relpath(image.path.resolve(), image_root)).as_posix()
        if relative.startswith("../"):
            raise InputError(f"{image.path} lies outside the Label Studio document root {image_root}")
        task = {"data": {IMAGE_KEY: LOCAL_FILES + quote(relative)}, "predictions": []}
        if image.shapes:
            result = [shape_region(shape, f"r{i}", image.height, image.width) for i, shape in enumerate(image.shapes)]
            task["predictions"].append({"model_version": model_version, "result": result,
                                        "score": float(np.mean([shape.score for shape in image.shapes]))})
        tasks.append(task)
    tasks_path, config_path = folder / "tasks.json", folder / "labeling_config.xml"
    save_json(tasks_path, tasks)
    config = labeling_config(class_names).encode("utf-8")
    atomic_write(config_path, lambda f: f.write(config))
    return [tasks_path, config_path]


def shape_region(shape: Shape, region_id: str, height: int, width: int) -> dict:
    """A shape as a Label Studio region: a polygon in percent of the image, or a brush mask."""
    region = {"id": region_id, "from_name": BRUSH_CONTROL if shape.is_mask else POLYGON_CONTROL,
              "to_name": IMAGE_KEY, "type": "brushlabels" if shape.is_mask else "polygonlabels",
              "original_width": width, "original_height": height, "image_rotation": 0, "score": shape.score}
    if shape.is_mask:
        mask = np.zeros((height, width), dtype=bool)
        h, w = shape.crop.shape
        mask[shape.top:shape.top + h, shape.left:shape.left + w] = shape.crop
        region["value"] = {"format": "rle", "rle": encode_brush(mask), "brushlabels": [shape.label]}
    else:
        (polygon,) = shape.polygons
        percent = polygon * (100.0 / width, 100.0 / height)
        region["value"] = {"points": percent.tolist(), "closed": True, "polygonlabels": [shape.label]}
    return region


def encode_brush(mask: np.ndarray) -> List[int]:
    """Label Studio's brush RLE of a ``(H, W)`` bool mask: the bytes of the ``(H, W, 4)`` RGBA image, 255 in
    every channel where the mask is set, encoded as Label Studio's ``rle-pack`` does.

    The bit stream: the number of bytes (32 bits), the word size less one (5 bits: 7, bytes), the four
    widths of the length field less one (4 bits each: :data:`BRUSH_RUN_BITS`), then chunks: ``1`` (a run of
    one value), the index of the length field's width (2 bits), the run length less one, the value (8 bits).
    Zero bits pad the stream to whole bytes. Returns the bytes as a list of ints.
    """
    flat = mask.reshape(-1)
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    lengths = np.diff(np.append(starts, flat.size)) * 4  # pixel runs -> byte runs (4 channels alike)
    bits = [f"{flat.size * 4:032b}", f"{8 - 1:05b}"] + [f"{b - 1:04b}" for b in BRUSH_RUN_BITS]
    longest = 1 << BRUSH_RUN_BITS[-1]
    for start, length in zip(starts.tolist(), lengths.tolist()):
        value = f"{255 if flat[start] else 0:08b}"
        while length:
            chunk = min(length, longest)
            index = next(i for i, b in enumerate(BRUSH_RUN_BITS) if chunk <= 1 << b)
            bits.append(f"1{index:02b}{chunk - 1:0{BRUSH_RUN_BITS[index]}b}{value}")
            length -= chunk
    stream = "".join(bits)
    stream += "0" * (-len(stream) % 8)
    return list(int(stream, 2).to_bytes(len(stream) // 8, "big"))


def decode_brush(rle: Sequence[int], where: str) -> np.ndarray:
    """The ``(N,)`` uint8 bytes a Label Studio brush RLE (``rle-pack``, see :func:`encode_brush`; literal
    chunks, which start with a ``0`` bit and hold one word per byte, included) encodes; InputError naming
    ``where`` when the stream ends early or its words are not bytes."""
    try:
        bits = np.unpackbits(np.asarray(rle, dtype=np.uint8))
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{where}: rle is not a list of bytes") from None
    weights = 1 << np.arange(32, dtype=np.int64)[::-1]
    position = 0

    def read(count: int) -> int:
        nonlocal position
        if position + count > bits.size:
            raise InputError(f"{where}: the brush rle ends before the bytes it announces")
        value = int(bits[position:position + count] @ weights[32 - count:])
        position += count
        return value

    total = read(32)
    word = read(5) + 1
    widths = [read(4) + 1 for _ in range(4)]
    if word > 8:
        raise InputError(f"{where}: brush rle words of {word} bits, expected bytes (at most 8 bits)")
    out = np.zeros(total, dtype=np.uint8)
    i = 0
    while i < total:
        repeat = read(1)
        end = min(i + 1 + read(widths[read(2)]), total)
        if repeat:
            out[i:end] = read(word)
        else:
            out[i:end] = [read(word) for _ in range(end - i)]
        i = end
    return out


def read_label_studio(src, *, image_dir=None, class_names: Optional[Sequence[str]] = None, strict: bool = False,
                      predictions: bool = False) -> Conversion:
    """Read a Label Studio JSON export (or a tasks file) of image tasks.

    Each task's first annotation that was not cancelled is read (with ``predictions``: its first
    prediction instead); a task without one is skipped and counted.
    image_dir: the folder the images are found in by their URL (see the module docstring; a local
        storage's path is relative to it, as to Label Studio's document root); default the JSON's folder.
    class_names: the class list; default: the sorted labels found.
    strict: skipped regions and tasks are errors instead.
    Raises FileNotFoundError / InputError naming the file, the task and the region.
    """
    src = Path(src)
    tasks = read_json(src, "Label Studio export (a list of tasks)", list)
    image_dir = Path(image_dir) if image_dir is not None else src.parent
    skipped = Skipped(strict)
    records = []
    for index, task in enumerate(tasks):
        where = f"{src}: task {task.get('id', index) if isinstance(task, dict) else index}"
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise InputError(f"{where}: not a task (expected an object with 'data')")
        results = _results(task, predictions, where)
        if results is None:
            skipped.add("Label Studio task", "no annotation" if not predictions else "no prediction", src, where)
            continue
        records.append(_read_task(task["data"], results, image_dir, where, skipped, src))
    names = class_names_from(records, class_names)
    check_labels(records, names)
    return Conversion(records, names, skipped)


def _results(task: dict, predictions: bool, where: str) -> Optional[list]:
    """The result list of the task's first annotation not cancelled (or its first prediction)."""
    entries = task.get("predictions" if predictions else "annotations") or []
    if not isinstance(entries, list):
        raise InputError(f"{where}: 'predictions' / 'annotations' is not a list")
    for entry in entries:
        if isinstance(entry, dict) and not entry.get("was_cancelled"):
            if not isinstance(entry.get("result"), list):
                raise InputError(f"{where}: an annotation or prediction without a 'result' list")
            return entry["result"]
    return None


def image_file(url: str, image_dir: Path) -> Path:
    """The file a Label Studio image URL names, in ``image_dir`` (see the module docstring)."""
    parsed = urlparse(url)
    if parsed.path.endswith("/data/local-files/") and "d" in parse_qs(parsed.query):
        return image_dir / parse_qs(parsed.query)["d"][0]
    name = Path(unquote(parsed.path)).name
    return image_dir / (UPLOAD_PREFIX.sub("", name) if "/data/upload/" in parsed.path else name)


def _read_task(data: dict, results: list, image_dir: Path, where: str, skipped: Skipped, src: Path) -> ImageRecord:
    url = data.get(IMAGE_KEY)
    if not isinstance(url, str):
        raise InputError(f"{where}: no image URL in data[{IMAGE_KEY!r}]")
    path = image_file(url, image_dir)
    sizes = {(r.get("original_height"), r.get("original_width")) for r in results if isinstance(r, dict)}
    sizes.discard((None, None))
    if len(sizes) > 1:
        raise InputError(f"{where}: regions give several image sizes {sorted(sizes)}")
    height, width = check_size(sizes.pop() if sizes else None, path, f"{where} ({url})")
    instances = []
    for index, result in enumerate(results):
        kind = result.get("type") if isinstance(result, dict) else None
        value = result.get("value") if isinstance(result, dict) else None
        region = f"{where}: region {index} ({kind})"
        if kind not in READ_TYPES:
            skipped.add(f"Label Studio {kind}", "not a polygon or a brush mask", src, region)
            continue
        labels = value.get(kind) if isinstance(value, dict) else None
        if not labels or not isinstance(labels[0], str):
            skipped.add(f"Label Studio unlabelled {kind}", "no label", src, region)
            continue
        region = f"{where}: region {index} ({kind} {labels[0]!r})"
        if kind == "polygonlabels":
            try:
                pixels = np.asarray(value.get("points"), dtype=np.float64) * (width / 100.0, height / 100.0)
            except (TypeError, ValueError):
                raise InputError(f"{region}: points are not [x, y] number pairs in percent") from None
            part = check_points(pixels, height=height, width=width, where=region)
        else:
            if value.get("format") != "rle":
                raise InputError(f"{region}: brush format {value.get('format')!r}, expected 'rle'")
            pixels = decode_brush(value.get("rle") or [], region)
            if pixels.size != height * width * 4:
                raise InputError(f"{region}: the brush rle holds {pixels.size} bytes, expected {width}x{height}x4 "
                                 f"= {height * width * 4}")
            part = pixels.reshape(height, width, 4)[:, :, 3] > 0
            if not part.any():
                raise InputError(f"{region}: the brush mask is empty")
        instances.append(Instance(label=labels[0], parts=[part], where=region))
    return ImageRecord(file_name=relative_name(path, image_dir), height=height, width=width, instances=instances)
