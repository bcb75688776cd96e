"""YOLO segmentation annotations (Ultralytics layout) -> :class:`ImageRecord` objects.

The dataset folder holds ``data.yaml`` with ``names`` (a list, or a mapping from class index to name),
``images/`` (any sub-folders, e.g. ``images/train``) and ``labels/`` mirroring it: the labels of
``images/a/b.jpg`` are in ``labels/a/b.txt``, one instance per line: the class index, then the polygon as
``x y`` pairs normalised by the image width and height (0..1). A line of exactly 5 numbers is a detection
box ``class cx cy w h`` (also normalised) and becomes a rectangle. An image without a label file has no
instances; a label file without an image is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import yaml
from tqdm import tqdm

from maskrcnn.data.formats.coco_writer import (ImageRecord, Instance, box_polygon, check_label, check_points,
                                               image_size, relative_name)
from maskrcnn.fileio import image_files


def read_yolo(src, *, image_dir=None, class_names: Optional[Sequence[str]] = None
              ) -> Tuple[List[ImageRecord], List[str]]:
    """Read a YOLO segmentation dataset folder.

    image_dir: the folder the COCO ``file_name`` entries are relative to (default ``src/images``).
    class_names: overrides the names of ``data.yaml`` (index i is class i).
    Returns ``(records, class_names)``. Raises FileNotFoundError / ValueError naming the file and line.
    """
    src = Path(src)
    images_root, labels_root = src / "images", src / "labels"
    if not images_root.is_dir():
        raise FileNotFoundError(f"YOLO folder {src} has no images/ folder")
    names = list(class_names) if class_names is not None else _read_names(src / "data.yaml")
    image_dir = Path(image_dir) if image_dir is not None else images_root
    images = image_files(images_root, recursive=True)
    expected = {labels_root / p.relative_to(images_root).with_suffix(".txt") for p in images}
    orphans = sorted(set(labels_root.rglob("*.txt")) - expected) if labels_root.is_dir() else []
    if orphans:
        raise FileNotFoundError(f"{orphans[0]}: no image of this name under {images_root}"
                                + (f" (and {len(orphans) - 1} more label files)" if len(orphans) > 1 else ""))
    records = []
    for path in tqdm(images, desc="yolo", unit="img", disable=len(images) < 100):
        height, width = image_size(path, str(path))
        label_file = labels_root / path.relative_to(images_root).with_suffix(".txt")
        instances = _read_labels(label_file, names, height, width) if label_file.is_file() else []
        records.append(ImageRecord(file_name=relative_name(path, image_dir), height=height, width=width,
                                   instances=instances))
    return records, names


def _read_names(path: Path) -> List[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (it gives the class names)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not readable YAML: {exc}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise ValueError(f"{path}: 'names' keys must be the class indices 0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path}: expected 'names', a list of class names or a mapping index -> name")
    return [str(name) for name in names]


def _read_labels(path: Path, names: Sequence[str], height: int, width: int) -> List[Instance]:
    instances = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {line_number}"
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            raise ValueError(f"{where}: expected numbers, got {line[:60]!r}") from None
        if not values[0].is_integer() or not 0 <= values[0] < len(names):
            raise ValueError(f"{where}: class index {values[0]:g} is not one of the {len(names)} names "
                             f"0..{len(names) - 1}")
        label = check_label(names[int(values[0])], names, where)
        coords = np.asarray(values[1:], dtype=np.float64)
        if len(coords) == 4:
            cx, cy, w, h = coords * [width, height, width, height]
            points = box_polygon(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            where += f" (box {label!r})"
        elif len(coords) % 2:
            raise ValueError(f"{where}: odd number of coordinates ({len(coords)})")
        else:
            points = coords.reshape(-1, 2) * [width, height]
            where += f" (polygon {label!r})"
        instances.append(Instance(label=label, parts=[check_points(points, height=height, width=width,
                                                                   where=where)], where=where))
    return instances
