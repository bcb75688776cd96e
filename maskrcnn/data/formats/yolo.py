"""YOLO segmentation annotations (the layouts Ultralytics reads) -> a :class:`Conversion`.

The dataset folder holds ``data.yaml`` with ``names`` (a list, or a mapping from class index to name) and,
as Ultralytics writes it, the subsets: ``train``, ``val`` and ``test``, each a folder of images, a ``.txt``
file listing image paths (one a line; ``./x`` relative to the list's folder, other relative paths to the
dataset root) or a list of those, relative to the dataset root ``path`` (a missing ``../x`` is read as ``x``, as Ultralytics does for
Roboflow's exports). ``path`` counts where it names an
existing folder (absolute, or relative to ``data.yaml``'s folder); otherwise ``data.yaml``'s folder is the
root, as for an export moved elsewhere. Each record keeps its subset (an image listed in two subsets is in
both). Without subsets every image under ``images/`` is read. A label file without an image, in the
``labels`` folder that mirrors an image folder, is an error.

The labels of an image are found as Ultralytics finds them: the last ``images`` folder of its path replaced
by ``labels`` and the suffix by ``.txt`` (``images/train/a.jpg`` -> ``labels/train/a.txt``,
``train/images/a.jpg`` -> ``train/labels/a.txt``). One instance per line: the class index, then the
polygon as ``x y`` pairs normalised by the upright image's width and height (0..1). A line of exactly 5
numbers is a detection box ``class cx cy w h`` (also normalised) and becomes a rectangle. An image without
a label file has no instances.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import yaml
from tqdm import tqdm

from maskrcnn.errors import InputError
from maskrcnn.data.formats.coco_writer import (Conversion, ImageRecord, Instance, box_polygon, check_label,
                                               check_points, image_size, relative_name)
from maskrcnn.fileio import image_files

SUBSETS = ("train", "val", "test")  # the subset keys of an Ultralytics data.yaml


def read_yolo(src, *, image_dir=None, class_names: Optional[Sequence[str]] = None,
              strict: bool = False) -> Conversion:
    """Read a YOLO segmentation dataset: its folder, or its ``data.yaml``.

    image_dir: the folder the COCO ``file_name`` entries are relative to (default: the dataset root when
        ``data.yaml`` names subsets, else ``images/``).
    class_names: overrides the names of ``data.yaml`` (index i is class i).
    strict: accepted for a uniform reader interface; every YOLO line has an area.
    Raises FileNotFoundError / ValueError naming the file and line.
    """
    src = Path(src)
    yaml_path = src if src.is_file() else src / "data.yaml"
    folder = yaml_path.parent
    data = _read_yaml(yaml_path) if yaml_path.is_file() else {}
    if class_names is not None:
        names = list(class_names)
    elif not yaml_path.is_file():
        raise FileNotFoundError(f"{yaml_path} not found (it gives the class names)")
    else:
        names = _read_names(data, yaml_path)
    root = _dataset_root(data.get("path"), folder)
    subsets = {key: data[key] for key in SUBSETS if data.get(key)}
    if subsets:
        images = {key: _subset_images(spec, root, yaml_path, key) for key, spec in subsets.items()}
        image_dir = Path(image_dir) if image_dir is not None else root
    else:
        if not (root / "images").is_dir():
            raise FileNotFoundError(f"YOLO folder {root} has no images/ folder and no data.yaml naming subsets")
        images = {"": _folder_images(root / "images")}
        image_dir = Path(image_dir) if image_dir is not None else root / "images"
    records = []
    count = sum(len(paths) for paths in images.values())
    with tqdm(total=count, desc="yolo", unit="img", disable=count < 100) as bar:
        for subset, paths in images.items():
            for path in paths:
                height, width = image_size(path, str(path))
                label_file = label_path(path)
                instances = _read_labels(label_file, names, height, width) if label_file.is_file() else []
                records.append(ImageRecord(file_name=relative_name(path, image_dir), height=height, width=width,
                                           instances=instances, subset=subset))
                bar.update()
    return Conversion(records, names)


def label_path(image: Path) -> Path:
    """The label file of an image, as Ultralytics finds it: the last ``images`` folder of the path replaced
    by ``labels``, the suffix by ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not readable YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with 'names' (and 'path', 'train', 'val')")
    return data


def _read_names(data: dict, path: Path) -> List[str]:
    names = data.get("names")
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise InputError(f"{path}: 'names' keys must be the class indices 0..{len(names) - 1}")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise InputError(f"{path}: expected 'names', a list of class names or a mapping index -> name")
    return [str(name) for name in names]


def _dataset_root(path, folder: Path) -> Path:
    """``path`` of data.yaml where it names an existing folder (relative to ``folder``), else ``folder``."""
    if isinstance(path, str) and path:
        candidate = folder / path  # an absolute path stays as it is
        if candidate.is_dir():
            return candidate
    return folder


def _subset_images(spec, root: Path, yaml_path: Path, subset: str) -> List[Path]:
    """The images of one subset of data.yaml: folders (recursive), list files or a list of those."""
    found: List[Path] = []
    for entry in spec if isinstance(spec, list) else [spec]:
        path = root / str(entry)
        if not path.exists() and str(entry).startswith("../"):
            path = root / str(entry)[3:]  # as Ultralytics reads Roboflow's "../train/images"
        if path.is_dir():
            found.extend(_folder_images(path))
        elif path.is_file() and path.suffix == ".txt":
            found.extend(_listed_images(path, root))
        else:
            raise FileNotFoundError(f"{yaml_path}: {subset}: {path} is neither a folder nor a .txt list of images")
    return found


def _listed_images(list_file: Path, root: Path) -> List[Path]:
    images = []
    for line_number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        path = list_file.parent / line[2:] if line.startswith("./") else root / line
        if not path.is_file():
            raise FileNotFoundError(f"{list_file}: line {line_number}: image {path} not found")
        images.append(path)
    return images


def _folder_images(folder: Path) -> List[Path]:
    """Every image under ``folder``; FileNotFoundError naming a label file (in the ``labels`` folder that
    mirrors it) without an image."""
    images = image_files(folder, recursive=True)
    labels_root = label_path(folder / "_").parent
    expected = {label_path(p) for p in images}
    orphans = sorted(set(labels_root.rglob("*.txt")) - expected) if labels_root != folder and labels_root.is_dir() \
        else []
    if orphans:
        raise FileNotFoundError(f"{orphans[0]}: no image of this name under {folder}"
                                + (f" (and {len(orphans) - 1} more label files)" if len(orphans) > 1 else ""))
    return images


def _read_labels(path: Path, names: Sequence[str], height: int, width: int) -> List[Instance]:
    instances = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {line_number}"
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            raise InputError(f"{where}: expected numbers, got {line[:60]!r}") from None
        if not values[0].is_integer() or not 0 <= values[0] < len(names):
            raise InputError(f"{where}: class index {values[0]:g} is not one of the {len(names)} names "
                             f"0..{len(names) - 1}")
        label = check_label(names[int(values[0])], names, where)
        coords = np.asarray(values[1:], dtype=np.float64)
        if len(coords) == 4:
            cx, cy, w, h = coords * [width, height, width, height]
            points = box_polygon(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            where += f" (box {label!r})"
        elif len(coords) % 2:
            raise InputError(f"{where}: odd number of coordinates ({len(coords)})")
        else:
            points = coords.reshape(-1, 2) * [width, height]
            where += f" (polygon {label!r})"
        instances.append(Instance(label=label, parts=[check_points(points, height=height, width=width,
                                                                   where=where)], where=where))
    return instances
