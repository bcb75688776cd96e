"""Check a COCO instances dataset before training: every problem in one pass, statistics, a clean copy.

:func:`check_dataset` reads the json and every image once and returns a :class:`CheckResult`: the
problems found (each naming the file, image id and annotation id) and the statistics. Errors are what
training or evaluation would stop on, or silently learn wrong from:

- the json: duplicate image, annotation or category ids; image entries without a file name or a positive
  integer size; annotations of an unknown image or category;
- the images: missing, unreadable (decoded in full, so truncated files are found), or of another size
  than the json gives, upright (EXIF orientation applied, as the images are read for training); an image
  whose EXIF orientation swaps the width and height that the json gives is reported as such;
- the boxes: not 4 finite numbers, zero or negative width or height, outside the image by more than
  ``BOUNDS_TOLERANCE`` pixels, or disagreeing with the segmentation (IoU of the box with the
  segmentation's bounding box below ``BOX_AGREEMENT_IOU``);
- the segmentations: missing, polygons that are not flat x, y lists, have fewer than 3 points or leave
  the image, RLE whose size differs from the image's or whose runs do not cover it exactly, or a
  segmentation that covers no pixel.

Warnings: categories without any instance (their AP is undefined) and file names listed twice.
Statistics: images, instances per class and per image, small / medium / large instances (COCO's area
thresholds 32² and 96² pixels), crowd regions and image sizes; :func:`plot_statistics` draws them.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from tqdm import tqdm

from maskrcnn.errors import InputError
from maskrcnn.data.coco_json import AnnotationError, load_json, parse_box, parse_segmentation
from maskrcnn.fileio import atomic_write, exif_orientation, save_json, swaps_axes

BOX_AGREEMENT_IOU = 0.9  # a bbox whose IoU with its segmentation's extent is below this is an error
SMALL_AREA, LARGE_AREA = 32 ** 2, 96 ** 2  # COCO's small / medium / large area thresholds (pixels)


@dataclass
class Problem:
    """One problem: ``severity`` "error" or "warning", a short ``kind`` and a ``message`` naming the file,
    the image id and the annotation id it concerns."""

    severity: str
    kind: str
    message: str
    image_id: Optional[int] = None
    annotation_id: Optional[int] = None


@dataclass
class CheckResult:
    """Problems in the order found, statistics, and what a clean copy leaves out: image ids and
    annotation positions (indices into the json's ``annotations`` list)."""

    problems: List[Problem] = field(default_factory=list)
    stats: Dict = field(default_factory=dict)
    bad_image_ids: Set[int] = field(default_factory=set)
    bad_annotations: Set[int] = field(default_factory=set)

    @property
    def errors(self) -> List[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> List[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def check_dataset(ann_file: Union[str, Path], image_dir: Union[str, Path], *, progress: bool = False) -> CheckResult:
    """Check ``ann_file`` and the images it lists under ``image_dir``; see the module docstring.

    Raises ``FileNotFoundError`` / ``ValueError`` only for unusable input (no such file or folder, not
    JSON, not a COCO object); every other problem is listed in the result.
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    data = load_json(ann_file)
    result = CheckResult()

    def report(severity, kind, text, image_id=None, annotation_id=None):
        result.problems.append(Problem(severity, kind, f"{ann_file}: {text}", image_id, annotation_id))

    categories: Dict[int, str] = {}
    for entry in data["categories"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or "name" not in entry:
            report("error", "bad category", f"category {str(entry)[:100]} needs an integer 'id' and a 'name'")
        elif entry["id"] in categories:
            report("error", "duplicate category id", f"category id {entry['id']} appears twice")
        else:
            categories[entry["id"]] = str(entry["name"])

    images: Dict[int, dict] = {}
    file_names = Counter()
    for entry in tqdm(data["images"], desc="images", unit="img", disable=not progress):
        image_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(image_id, int):
            report("error", "bad image entry", f"image entry {str(entry)[:100]} needs an integer 'id'")
            continue
        if image_id in images:
            report("error", "duplicate image id", f"image id {image_id} appears twice (the second one, "
                   f"{entry.get('file_name')!r}, is left out of a clean copy)", image_id)
            continue
        height, width, file_name = entry.get("height"), entry.get("width"), entry.get("file_name")
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0
                and isinstance(file_name, str)):
            report("error", "bad image entry", f"image id {image_id} needs a 'file_name' and positive integer "
                   f"'height' and 'width', got {file_name!r}, {height!r}, {width!r}", image_id)
            result.bad_image_ids.add(image_id)
            images[image_id] = None
            continue
        images[image_id] = {"file_name": file_name, "height": height, "width": width}
        file_names[file_name] += 1
        problem = _check_image_file(image_dir / file_name, height, width)
        if problem is not None:
            kind, text = problem
            report("error", kind, f"image id {image_id}: {text}", image_id)
            result.bad_image_ids.add(image_id)
    for file_name, count in file_names.items():
        if count > 1:
            report("warning", "duplicate file name", f"file name {file_name!r} is listed {count} times")

    seen_ids: Set = set()
    used = Counter()
    per_image = Counter()
    sizes = Counter()
    crowds = 0
    for position, ann in enumerate(data.get("annotations", [])):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        where = f"annotation id {ann_id} (image id {image_id})"

        def bad(kind, text):
            report("error", kind, f"{where}: {text}", image_id, ann_id)
            result.bad_annotations.add(position)

        if ann_id is None:
            bad("bad annotation", f"annotation #{position} is not an object with an 'id'")
            continue
        if ann_id in seen_ids:
            bad("duplicate annotation id", "annotation id appears twice (later ones are left out of a clean copy)")
            continue
        seen_ids.add(ann_id)
        if image_id not in images:
            bad("unknown image id", "no image has this id")
            continue
        image = images[image_id]
        category_id = ann.get("category_id")
        if category_id not in categories:
            bad("unknown category", f"unknown category id {category_id!r}")
        if image is None:
            continue
        height, width = image["height"], image["width"]
        try:
            box = parse_box(ann.get("bbox"), height, width, where)
        except AnnotationError as exc:
            bad(exc.reason, _strip(exc, where))
            box = None
        try:
            rle = _segmentation_rle(ann.get("segmentation"), height, width, where)
        except AnnotationError as exc:
            bad(exc.reason, _strip(exc, where))
            continue
        area = float(mask_utils.area(rle))
        if area == 0:
            bad("empty segmentation", "the segmentation covers no pixel")
            continue
        if box is not None:
            extent = mask_utils.toBbox(rle)  # x, y, w, h
            raw = [float(v) for v in ann["bbox"]]
            iou = float(mask_utils.iou([raw], [extent.tolist()], [0])[0, 0])
            if iou < BOX_AGREEMENT_IOU:
                bad("bbox disagrees with segmentation",
                    f"bbox {[round(v, 1) for v in raw]} but the segmentation spans "
                    f"{[round(float(v), 1) for v in extent]} (IoU {iou:.2f})")
                continue
        if position in result.bad_annotations:
            continue
        if ann.get("iscrowd", 0):
            crowds += 1
            continue
        used[category_id] += 1
        per_image[image_id] += 1
        sizes["small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"] += 1

    for category_id, name in categories.items():
        if not used[category_id]:
            report("warning", "category without instances",
                   f"category id {category_id} ({name!r}) has no valid instance")

    valid = {i: im for i, im in images.items() if im is not None}
    result.stats = {
        "images": len(data["images"]),
        "instances": sum(used.values()),
        "crowd_regions": crowds,
        "instances_per_class": {name: used[cat_id] for cat_id, name in categories.items()},
        "instances_per_image": dict(sorted(Counter(per_image[i] for i in valid).items())),
        "sizes": {key: sizes[key] for key in ("small", "medium", "large")},
        "image_sizes": [[im["width"], im["height"]] for im in valid.values()],
    }
    return result


def _strip(exc: Exception, where: str) -> str:
    """The message of an :class:`AnnotationError` without its leading location (the caller adds it)."""
    text = str(exc)
    return text[len(where) + 2:] if text.startswith(where + ": ") else text


def _check_image_file(path: Path, height: int, width: int) -> Optional[Tuple[str, str]]:
    """``(kind, message)`` of what is wrong with an image file, or None when it is a readable image of
    ``height`` x ``width`` pixels upright (EXIF orientation applied, as every reader of the package does)."""
    if not path.is_file():
        return "missing image", f"image file {path} not found"
    try:
        with Image.open(path) as img:
            img.load()
            stored_width, stored_height = img.size
            orientation = exif_orientation(img)
    except (OSError, SyntaxError, ValueError) as exc:
        return "unreadable image", f"cannot read image file {path}: {exc}"
    upright = (stored_width, stored_height) if swaps_axes(orientation) else (stored_height, stored_width)
    if upright == (height, width):
        return None
    if (stored_height, stored_width) == (height, width):
        return "exif orientation", (f"image file {path} is stored {stored_width}x{stored_height} (WxH) but its "
                                    f"EXIF orientation {orientation} turns it to {upright[1]}x{upright[0]} "
                                    f"upright; the json gives the stored size: its annotations were made on "
                                    f"the sideways pixels")
    return "image size mismatch", (f"image file {path} is {upright[1]}x{upright[0]} (WxH) but the json gives "
                                   f"{width}x{height}")


def _segmentation_rle(segmentation, height: int, width: int, where: str) -> dict:
    """The compressed RLE a segmentation decodes to; AnnotationError for malformed polygons or RLE."""
    parsed = parse_segmentation(segmentation, height, width, where)
    if isinstance(parsed, list):
        return mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in parsed], height, width))
    return parsed


def format_report(result: CheckResult) -> str:
    """The problems (one per line) and the statistics as text."""
    lines = [f"{p.severity}: {p.message}" for p in result.problems]
    s = result.stats
    kinds = Counter((p.severity, p.kind) for p in result.problems)
    lines.append(f"{len(result.errors)} errors, {len(result.warnings)} warnings"
                 + "".join(f"\n  {count} x {severity} {kind}" for (severity, kind), count in sorted(kinds.items())))
    lines.append(f"{s['images']} images, {s['instances']} instances, {s['crowd_regions']} crowd regions")
    width = max((len(name) for name in s["instances_per_class"]), default=0)
    lines.extend(f"  {name:<{width}} {count}" for name, count in s["instances_per_class"].items())
    per_image = s["instances_per_image"]
    if per_image:
        counts = np.repeat(list(per_image), list(per_image.values()))
        lines.append(f"instances per image: mean {counts.mean():.1f}, max {counts.max()}, "
                     f"{per_image.get(0, 0)} images without any")
    lines.append("small / medium / large: " + " / ".join(str(v) for v in s["sizes"].values()))
    if s["image_sizes"]:
        sizes = np.array(s["image_sizes"])
        lines.append(f"image width {sizes[:, 0].min()}..{sizes[:, 0].max()}, "
                     f"height {sizes[:, 1].min()}..{sizes[:, 1].max()} pixels")
    return "\n".join(lines)


def plot_statistics(stats: Dict, path: Union[str, Path]) -> None:
    """Draw the statistics of :func:`check_dataset` as one PNG of four panels, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    names, counts = list(stats["instances_per_class"]), list(stats["instances_per_class"].values())
    ax = axes[0, 0]
    ax.barh(range(len(names)), counts, color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=8 if len(names) < 30 else 5)
    ax.invert_yaxis()
    ax.set_xlabel("instances")
    ax.set_title("instances per class")
    ax = axes[0, 1]
    per_image = stats["instances_per_image"]
    ax.bar(list(per_image), list(per_image.values()), color="tab:orange")
    ax.set_xlabel("instances in the image")
    ax.set_ylabel("images")
    ax.set_title("instances per image")
    ax = axes[1, 0]
    ax.bar(list(stats["sizes"]), list(stats["sizes"].values()), color="tab:green")
    ax.set_ylabel("instances")
    ax.set_title(f"instance size (area < {SMALL_AREA}, < {LARGE_AREA}, larger; pixels)")
    ax = axes[1, 1]
    sizes = np.array(stats["image_sizes"]).reshape(-1, 2)
    ax.scatter(sizes[:, 0], sizes[:, 1], s=8, alpha=0.5, color="tab:purple")
    ax.set_xlabel("width (pixels)")
    ax.set_ylabel("height (pixels)")
    ax.set_title(f"image sizes ({len(sizes)} images)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def write_clean(ann_file: Union[str, Path], out: Union[str, Path], result: CheckResult) -> Dict[str, int]:
    """Write a copy of ``ann_file`` without the bad annotations and images of ``result`` (and the
    annotations of those images). Refuses to write over ``ann_file``. Returns the counts removed."""
    ann_file, out = Path(ann_file), Path(out)
    if out.resolve() == ann_file.resolve():
        raise InputError(f"--write-clean {out} would overwrite the input; choose another file")
    data = load_json(ann_file)
    seen: Set = set()
    images = []
    for entry in data["images"]:
        image_id = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(image_id, int) and image_id not in seen and image_id not in result.bad_image_ids:
            images.append(entry)
        seen.add(image_id)
    kept_ids = {entry["id"] for entry in images}
    annotations = [ann for position, ann in enumerate(data.get("annotations", []))
                   if position not in result.bad_annotations and ann.get("image_id") in kept_ids]
    categories, seen_categories = [], set()
    for entry in data["categories"]:
        if isinstance(entry, dict) and isinstance(entry.get("id"), int) and "name" in entry \
                and entry["id"] not in seen_categories:
            categories.append(entry)
            seen_categories.add(entry["id"])
    clean = {**data, "images": images, "annotations": annotations, "categories": categories}
    save_json(out, clean)
    return {"images": len(data["images"]) - len(images),
            "annotations": len(data.get("annotations", [])) - len(annotations)}


def ground_truth(data: dict, image_id: int) -> Tuple[np.ndarray, List[int], List[dict]]:
    """The non-crowd annotations of one image of a COCO dict (one without errors): boxes ``(M, 4)``
    float32 xyxy pixels, category ids and compressed RLEs, for overlays."""
    image = next(im for im in data["images"] if im.get("id") == image_id)
    height, width = image["height"], image["width"]
    boxes, category_ids, rles = [], [], []
    for ann in data.get("annotations", []):
        if ann.get("image_id") != image_id or ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        boxes.append([x, y, x + w, y + h])
        category_ids.append(ann["category_id"])
        rles.append(_segmentation_rle(ann["segmentation"], height, width, f"annotation id {ann.get('id')}"))
    return np.array(boxes, dtype=np.float32).reshape(-1, 4), category_ids, rles

