"""Synthetic shapes: a small COCO-format instance segmentation dataset generated from a seed.

Each image has a random size in ``[min_size, max_size]`` (height and width drawn independently), a
background of a random colour with a linear gradient, and 0-6 squares, circles and triangles of random
colour, size, rotation and position; pixel noise is added over everything. Later shapes occlude earlier
ones: each instance's mask is its visible part, and instances left almost fully hidden are dropped. About
one image in ten also holds a crowd: a cluster of small shapes of one category annotated as a single
``iscrowd=1`` region. With ``categories="novel"`` the shapes are stars, hexagons and crosses instead: a
set that a model trained on the basic one has never seen. With ``rare_fraction`` below 1 the training split
is long-tailed: its last category is drawn that often relative to each other one, while the validation split
stays balanced, so the rare category's AP is measured on as many instances as the others'.
With ``categories="edges"`` the shapes are sunbursts (7-11 thin spikes), gears (8-14 square teeth) and combs
(6-9 thin teeth on a bar): outlines with sharp corners and parts a few pixels wide, drawn large (radius 0.12-0.3
of the short side, so up to 60 % of it across, 1-4 per image) to be generated on large images (``min_size`` 512,
``max_size`` 800, say), where a 28 x 28 mask cell spans 10 pixels or more of an object and its edge shows.

Annotations exercise every segmentation form a COCO reader meets:
- polygons (from ``cv2.findContours`` of the visible mask, several per instance when occlusion splits it),
  for most instances;
- compressed RLE (``counts`` a UTF-8 string) and uncompressed RLE (``counts`` a list of run lengths) for
  the others and for crowd regions.
``bbox`` (COCO ``x, y, w, h``) and ``area`` are those of the stored segmentation as pycocotools decodes it.

Layout under the output folder: ``train/*.jpg``, ``val/*.jpg``, ``annotations/instances_{train,val}.json``
and ``meta.json`` (the generation parameters; a folder whose ``meta.json`` matches is reused as is).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, NamedTuple, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_utils
from tqdm import tqdm

from maskrcnn.config import ShapesConfig
from maskrcnn.errors import InputError

CATEGORIES = [
    {"id": 1, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "circle", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
]
# A second set the demo model never sees, to measure what starting from its weights buys (make transfer).
NOVEL_CATEGORIES = [
    {"id": 1, "name": "star", "supercategory": "shape"},
    {"id": 2, "name": "hexagon", "supercategory": "shape"},
    {"id": 3, "name": "cross", "supercategory": "shape"},
]
# Thin parts and sharp corners, drawn large: what a 28 x 28 mask blurs and a point-refined one keeps.
EDGE_CATEGORIES = [
    {"id": 1, "name": "sunburst", "supercategory": "shape"},
    {"id": 2, "name": "gear", "supercategory": "shape"},
    {"id": 3, "name": "comb", "supercategory": "shape"},
]
CATEGORY_SETS = {"basic": CATEGORIES, "novel": NOVEL_CATEGORIES, "edges": EDGE_CATEGORIES}
SPLITS = ("train", "val")
FORMAT_VERSION = 1  # bump when the generator's output changes for the same parameters
MAX_SHAPES = 6  # shapes per image are drawn uniformly from 0..MAX_SHAPES


class Layout(NamedTuple):
    """How large and how many: a shape's radius is drawn uniformly from ``radius`` times the image's short side,
    the number of shapes per image (crowds aside) uniformly from ``shapes[0]..shapes[1]``."""

    radius: Tuple[float, float] = (0.08, 0.3)
    shapes: Tuple[int, int] = (0, MAX_SHAPES)


# The layout of each category set: the edge shapes large and few, so that their outlines fill the image.
LAYOUTS = {"basic": Layout(), "novel": Layout(), "edges": Layout(radius=(0.12, 0.3), shapes=(1, 4))}
CROWD_PROB = 0.1  # probability that an image holds a crowd region
MIN_VISIBLE_FRACTION = 0.1  # instances with less of their area visible are dropped
MIN_VISIBLE_PIXELS = 20  # instances with fewer visible pixels are dropped
POLYGON_MIN_IOU = 0.95  # a polygon is stored only if its rasterisation matches the mask this well


def generate_shapes(out_dir: str | Path, *, num_train: int = ShapesConfig.num_train,
                    num_val: int = ShapesConfig.num_val, seed: int = ShapesConfig.seed,
                    min_size: int = ShapesConfig.min_size, max_size: int = ShapesConfig.max_size,
                    categories: str = ShapesConfig.categories, rare_fraction: float = ShapesConfig.rare_fraction,
                    progress: bool = False) -> bool:
    """Write the shapes dataset under ``out_dir``; deterministic given the parameters (defaults:
    :class:`maskrcnn.config.ShapesConfig`).

    categories: "basic" (square, circle, triangle), "novel" (star, hexagon, cross) or "edges" (sunburst, gear,
        comb; large, see ``LAYOUTS``), see ``CATEGORY_SETS``.
    rare_fraction: in (0, 1]; the training split draws the last category this often relative to each other one.

    Returns ``False`` (and writes nothing) when ``out_dir/meta.json`` already records the same parameters
    and both annotation files exist, ``True`` after generating. ``progress`` shows a tqdm bar.
    """
    if not 1 <= min_size <= max_size:
        raise InputError(f"expected 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if num_train < 0 or num_val < 0:
        raise InputError(f"image counts must be non-negative, got num_train={num_train}, num_val={num_val}")
    if categories not in CATEGORY_SETS:
        raise InputError(f"categories must be one of {sorted(CATEGORY_SETS)}, got {categories!r}")
    if not 0 < rare_fraction <= 1:
        raise InputError(f"rare_fraction must be in (0, 1], got {rare_fraction}")
    out_dir = Path(out_dir)
    meta = {"format_version": FORMAT_VERSION, "num_train": num_train, "num_val": num_val, "seed": seed,
            "min_size": min_size, "max_size": max_size}
    if categories != "basic":  # the basic set's meta.json stays as it was, so existing folders are reused
        meta["categories"] = categories
    if rare_fraction != 1:
        meta["rare_fraction"] = rare_fraction
    meta_file = out_dir / "meta.json"
    ann_files = {split: out_dir / "annotations" / f"instances_{split}.json" for split in SPLITS}
    if meta_file.is_file() and all(f.is_file() for f in ann_files.values()):
        if json.loads(meta_file.read_text()) == meta:
            return False
    meta_file.unlink(missing_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {"train": num_train, "val": num_val}
    with tqdm(total=num_train + num_val, disable=not progress, unit="img") as bar:
        for split_index, split in enumerate(SPLITS):
            image_dir = out_dir / split
            image_dir.mkdir(parents=True, exist_ok=True)
            images, annotations = [], []
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, split_index, i])
                image_id = i + 1
                file_name = f"{image_id:06d}.jpg"
                pixels, instances = render_image(rng, min_size=min_size, max_size=max_size,
                                                 categories=CATEGORY_SETS[categories], layout=LAYOUTS[categories],
                                                 rare_fraction=rare_fraction if split == "train" else 1.0)
                height, width = pixels.shape[:2]
                cv2.imwrite(str(image_dir / file_name), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
                images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
                for category_id, mask, occluded, crowd in instances:
                    segmentation, rle = encode_segmentation(mask, rng=rng, occluded=occluded, crowd=crowd)
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                        "segmentation": segmentation, "area": float(mask_utils.area(rle)),
                        "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(crowd)})
                bar.update()
            dataset = {"info": {"description": "synthetic shapes", "version": str(FORMAT_VERSION)},
                       "licenses": [], "images": images, "annotations": annotations,
                       "categories": CATEGORY_SETS[categories]}
            ann_files[split].write_text(json.dumps(dataset, separators=(",", ":")))
    meta_file.write_text(json.dumps(meta, indent=1))
    return True


def render_image(rng: np.random.Generator, *, min_size: int, max_size: int,
                 categories: List[dict] = CATEGORY_SETS[ShapesConfig.categories],
                 rare_fraction: float = ShapesConfig.rare_fraction, layout: Layout = Layout()
                 ) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray, bool, bool]]]:
    """Draw one image and its instances, of the given categories (a list of ``CATEGORY_SETS``; default the set
    that :func:`generate_shapes` draws by default), sized and counted by ``layout`` (that of the set in
    ``LAYOUTS``). The last category is drawn ``rare_fraction`` times as often as each other one.

    Returns ``(pixels, instances)``: pixels ``(H, W, 3)`` uint8 RGB; instances a list, back to front, of
    ``(category_id, visible_mask (H, W) bool, occluded, crowd)`` where ``occluded`` says that later shapes
    hide part of the shape.
    """
    height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    short = min(height, width)
    weights = np.ones(len(categories))
    weights[-1] = rare_fraction

    def draw_category() -> dict:
        if rare_fraction == 1:  # the balanced draw, as every existing dataset was generated
            return categories[rng.integers(len(categories))]
        return categories[rng.choice(len(categories), p=weights / weights.sum())]

    background_colour = rng.uniform(0, 255, 3)
    pixels = _background(rng, height, width, background_colour)
    # Each entry: [category_id, full_mask, visible_mask, crowd]; later shapes cut earlier visible masks.
    layers = []
    if rng.random() < CROWD_PROB:
        category = draw_category()
        centre = rng.uniform(0.25, 0.75, 2) * (width, height)
        group = np.zeros((height, width), dtype=bool)
        for _ in range(rng.integers(5, 10)):
            offset = rng.normal(0.0, 0.08 * short, 2)
            radius = max(3.0, rng.uniform(0.03, 0.06) * short)
            mask = _shape_mask(category["name"], centre + offset, radius, rng.uniform(0, 2 * np.pi), rng,
                               height, width)
            pixels[mask] = _contrasting_colour(rng, background_colour)
            group |= mask
        layers.append([category["id"], group, group.copy(), True])
    for _ in range(rng.integers(layout.shapes[0], layout.shapes[1] + 1)):
        category = draw_category()
        radius = max(4.0, rng.uniform(*layout.radius) * short)
        centre = rng.uniform(0.0, 1.0, 2) * (width, height)
        mask = _shape_mask(category["name"], centre, radius, rng.uniform(0, 2 * np.pi), rng, height, width)
        if not mask.any():
            continue
        pixels[mask] = _contrasting_colour(rng, background_colour)
        for layer in layers:
            layer[2] &= ~mask
        layers.append([category["id"], mask, mask.copy(), False])
    pixels += rng.normal(0.0, rng.uniform(3.0, 12.0), pixels.shape)
    instances = []
    for category_id, full, visible, crowd in layers:
        visible_area, full_area = int(visible.sum()), int(full.sum())
        if visible_area >= max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * full_area):
            instances.append((category_id, visible, visible_area < full_area, crowd))
    return np.clip(pixels, 0, 255).astype(np.uint8), instances


def encode_segmentation(mask: np.ndarray, *, rng: np.random.Generator, occluded: bool, crowd: bool
                        ) -> Tuple[object, dict]:
    """Pick a COCO segmentation form for one ``(H, W)`` bool mask and encode it.

    Crowd regions get uncompressed RLE; other instances mostly polygons (80% of unoccluded ones, 50% of
    occluded ones), else compressed or uncompressed RLE. A polygon that does not reproduce the mask (holes,
    slivers) falls back to compressed RLE.
    Returns ``(segmentation as written to the json, compressed RLE of what it decodes to)``.
    """
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    compressed = {"size": list(rle["size"]), "counts": rle["counts"].decode("utf-8")}
    if crowd:
        return uncompressed_rle(mask), rle
    draw = rng.random()
    polygon_share = 0.5 if occluded else 0.8
    if draw < polygon_share:
        polygons = mask_to_polygons(mask)
        if polygons:
            height, width = mask.shape
            poly_rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
            if mask_utils.iou([poly_rle], [rle], [0])[0, 0] >= POLYGON_MIN_IOU:
                return polygons, poly_rle
        return compressed, rle
    if draw < polygon_share + (1 - polygon_share) / 2:
        return compressed, rle
    return uncompressed_rle(mask), rle


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Outer contours of a ``(H, W)`` bool mask as COCO polygons (pixel coordinates, ``x0, y0, x1, ...``).

    Contours are traced on the mask upsampled 2x, so that vertices sit on pixel boundaries and
    pycocotools rasterises the polygons back to the same pixels. Holes are not represented.
    """
    height, width = mask.shape
    upsampled = cv2.resize(mask.astype(np.uint8), (2 * width, 2 * height), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(upsampled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [((c.reshape(-1).astype(np.float64) + 0.5) / 2).tolist() for c in contours if len(c) >= 3]


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a ``(H, W)`` bool mask: column-major run lengths, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _background(rng: np.random.Generator, height: int, width: int, colour: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` float32: a solid colour plus a linear gradient in a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    ramp = xs * np.cos(angle) + ys * np.sin(angle)  # (H, W) in [-sqrt 2, sqrt 2]
    amplitude = rng.uniform(-50, 50, 3).astype(np.float32)
    return colour.astype(np.float32) + ramp[:, :, None] * amplitude


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random RGB colour at least 80 (Euclidean, 0-255 scale) from the background colour."""
    while True:
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - background) >= 80:
            return colour


def _shape_mask(name: str, centre: np.ndarray, radius: float, angle: float,
                rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``(H, W)`` bool mask of one shape; ``radius`` is half the square's side, the circle's radius or the
    circumradius of the other shapes (pixels); ``angle`` rotates all but the circle (radians)."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    if name == "circle":
        cv2.circle(canvas, (int(round(centre[0])), int(round(centre[1]))), int(round(radius)), 1, -1)
    else:
        if name == "square":
            corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * radius
        elif name in ("star", "hexagon"):
            count, inner = (5, 0.45) if name == "star" else (6, 1.0)  # star: 5 tips, inner vertices at 0.45 r
            angles = np.arange(2 * count) * (np.pi / count)
            radii = np.where(np.arange(2 * count) % 2, inner, 1.0) * radius
            corners = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)
        elif name == "cross":
            a, b = 0.3, 0.95  # half the arm width and the arm length, in units of radius
            corners = np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a],
                                [-b, a], [-b, -a], [-a, -a]], dtype=np.float64) * radius
        elif name in EDGE_OUTLINES:
            corners = EDGE_OUTLINES[name](rng) * radius
        else:
            angles = np.arange(3) * (2 * np.pi / 3) + rng.uniform(-0.25, 0.25, 3)
            corners = np.stack([np.cos(angles), np.sin(angles)], 1) * radius * rng.uniform(0.8, 1.1, (3, 1))
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = corners @ rotation.T + centre
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def _sunburst(rng: np.random.Generator) -> np.ndarray:
    """7-11 thin spikes: tips at radius 1, the vertices between them at 0.2-0.3. Returns (V, 2) corners."""
    count, inner = int(rng.integers(7, 12)), rng.uniform(0.2, 0.3)
    angles = np.arange(2 * count) * (np.pi / count)
    radii = np.where(np.arange(2 * count) % 2, inner, 1.0)
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)


def _gear(rng: np.random.Generator) -> np.ndarray:
    """8-14 teeth with radial flanks on a body of radius 0.75, each half the pitch wide. Returns (4 T, 2)."""
    count = int(rng.integers(8, 15))
    start = np.arange(count) * (2 * np.pi / count)
    angles = np.stack([start, start, start + np.pi / count, start + np.pi / count], 1).reshape(-1)
    radii = np.tile([0.75, 1.0, 1.0, 0.75], count)
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], 1)


def _comb(rng: np.random.Generator) -> np.ndarray:
    """A bar 1.5 long and 0.25 thick with 6-9 teeth 1.05 long and 0.06-0.1 wide, the outer two flush with the
    bar's ends; corners within radius 1. Returns (4 + 4 T, 2)."""
    count, tooth = int(rng.integers(6, 10)), rng.uniform(0.06, 0.1)
    top, bar, tip, end = -0.65, -0.4, 0.65, 0.75  # the bar spans y in [top, bar], the teeth [bar, tip]
    centres = np.linspace(end - tooth / 2, -end + tooth / 2, count)  # right to left, as the outline runs
    teeth = [[(x + tooth / 2, bar), (x + tooth / 2, tip), (x - tooth / 2, tip), (x - tooth / 2, bar)]
             for x in centres]
    return np.array([(-end, top), (end, top), *(corner for t in teeth for corner in t)], dtype=np.float64)


# Outline of each edge shape at radius 1, drawn from the image's generator: name -> rng -> (V, 2) corners.
EDGE_OUTLINES = {"sunburst": _sunburst, "gear": _gear, "comb": _comb}

