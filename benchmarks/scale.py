"""COCO at scale: synthetic COCO-sized files and the measurements of ``python -m benchmarks.scale_report`` and
``python -m benchmarks.bench_eval``.

Synthetic objects are star-shaped polygons (``V`` vertices around an ellipse, radii jittered) in images of
640x480 pixels, 80 categories, like COCO's; nothing is downloaded. Sizes:

- train2017-sized annotations: 118,287 images, 862,961 polygon annotations (1% crowd), about 360 MB of json;
- a results file: ``D`` detections per image, a few near each ground-truth object (same category, jittered
  box and polygon, the segmentation as COCO RLE) and the rest anywhere, of any category, with lower scores.

Every measurement runs in a fresh spawned process so that one's peak resident set size (``ru_maxrss``)
is not another's; timings are wall-clock seconds in that process. Proportional set size (PSS) charges each
page shared by n processes 1/n to each: the sum over loader workers is their real cost in memory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import pycocotools.mask as mask_utils
from tqdm import tqdm

from maskrcnn.fileio import atomic_write

IMAGE_SIZE = (480, 640)  # (H, W) of every synthetic image
TRAIN2017 = {"images": 118_287, "annotations": 862_961}


def _polygons(rng: np.random.Generator, count: int, height: int, width: int, vertices: np.ndarray,
              centers: Optional[np.ndarray] = None, radii: Optional[np.ndarray] = None) -> List[np.ndarray]:
    """``count`` star-shaped polygons as flat ``(2V,)`` float64 ``x, y`` arrays inside an ``height x width`` image.

    vertices: ``(count,)`` vertex counts; centers, radii: ``(count, 2)`` pixels (random if not given).
    """
    if radii is None:
        radii = np.exp(rng.uniform(np.log(3), np.log(min(height, width) / 2.5), (count, 2)))
    if centers is None:
        centers = rng.uniform(radii, [width, height] - radii)
    out = []
    for c, r, v in zip(centers, radii, vertices):
        angles = np.sort(rng.uniform(0, 2 * np.pi, v))
        scale = rng.uniform(0.7, 1.0, v)
        xs = np.clip(c[0] + r[0] * scale * np.cos(angles), 0, width)
        ys = np.clip(c[1] + r[1] * scale * np.sin(angles), 0, height)
        out.append(np.stack([xs, ys], axis=1).reshape(-1).round(2))
    return out


def _polygon_area(polygon: np.ndarray) -> float:
    """Shoelace area (pixels^2) of a flat ``x, y`` polygon."""
    xs, ys = polygon[0::2], polygon[1::2]
    return float(0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def _box(polygon: np.ndarray) -> List[float]:
    """COCO ``[x, y, w, h]`` of a flat ``x, y`` polygon."""
    xs, ys = polygon[0::2], polygon[1::2]
    return [round(float(xs.min()), 2), round(float(ys.min()), 2), round(float(np.ptp(xs)), 2),
            round(float(np.ptp(ys)), 2)]


def write_synthetic_coco(path: Union[str, Path], *, num_images: int, num_annotations: int, num_categories: int = 80,
                         mean_vertices: int = 17, crowd_fraction: float = 0.01, seed: int = 0,
                         progress: bool = True) -> dict:
    """Write a COCO instances json of synthetic polygon annotations, streamed (atomically) image by image.

    The ``num_annotations`` are spread over the images at random (some images get none). Polygons have
    ``mean_vertices`` vertices on average (8 to ``2 * mean_vertices - 8``), coordinates to 0.01 pixel.
    Returns ``{"images", "annotations", "bytes"}`` of the written file.
    """
    rng = np.random.default_rng(seed)
    height, width = IMAGE_SIZE
    per_image = np.bincount(rng.integers(0, num_images, num_annotations), minlength=num_images)
    categories = [{"id": i + 1, "name": f"class{i + 1}", "supercategory": "thing"} for i in range(num_categories)]

    def write(f):
        f.write(b'{"info": {"description": "synthetic"}, "categories": ')
        f.write(json.dumps(categories).encode())
        f.write(b', "images": [')
        f.write(",\n".join(json.dumps({"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "height": height,
                                       "width": width}) for i in range(num_images)).encode())
        f.write(b'], "annotations": [')
        ann_id = 0
        for image_index in tqdm(range(num_images), desc="writing json", unit="img", disable=not progress):
            count = int(per_image[image_index])
            if not count:
                continue
            vertices = rng.integers(8, 2 * mean_vertices - 7, count)
            lines = []
            for polygon in _polygons(rng, count, height, width, vertices):
                ann_id += 1
                lines.append(json.dumps({
                    "id": ann_id, "image_id": image_index + 1, "category_id": int(rng.integers(1, num_categories + 1)),
                    "iscrowd": int(rng.random() < crowd_fraction), "area": round(_polygon_area(polygon), 2),
                    "bbox": _box(polygon), "segmentation": [polygon.tolist()]}))
            f.write((",\n" if ann_id > count else "") .encode() + ",\n".join(lines).encode())
        f.write(b"]}")

    atomic_write(path, write)
    return {"images": num_images, "annotations": num_annotations, "bytes": Path(path).stat().st_size}


def synthetic_results(ann_file: Union[str, Path], *, detections_per_image: int = 100, near_per_object: int = 3,
                      seed: int = 0, progress: bool = True) -> List[dict]:
    """COCO result dicts for the ground truth in ``ann_file`` (as :func:`write_synthetic_coco` writes it).

    Each image gets ``detections_per_image`` detections: ``near_per_object`` per ground-truth object (its
    category, center and radii jittered by up to 15%, score 0.3-1) and the rest random (any category,
    score 0-0.5). Segmentations are compressed RLE (string counts, as model results are).
    """
    rng = np.random.default_rng(seed)
    with open(ann_file, encoding="utf-8") as f:
        data = json.load(f)
    by_image: Dict[int, list] = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    num_categories = len(data["categories"])
    results = []
    for image in tqdm(data["images"], desc="results", unit="img", disable=not progress):
        height, width = image["height"], image["width"]
        objects = by_image[image["id"]][:detections_per_image // near_per_object]
        centers, radii, categories = [], [], []
        for ann in objects:
            x, y, w, h = ann["bbox"]
            for _ in range(near_per_object):
                radii.append(np.maximum([w / 2, h / 2] * rng.uniform(0.85, 1.15, 2), 1.0) / 0.85)
                centers.append([x + w / 2, y + h / 2] + rng.uniform(-0.15, 0.15, 2) * [w, h])
                categories.append(ann["category_id"])
        near = len(categories)
        polygons = _polygons(rng, near, height, width, rng.integers(8, 20, near), np.array(centers).reshape(-1, 2),
                             np.array(radii).reshape(-1, 2)) if near else []
        rest = detections_per_image - near
        polygons += _polygons(rng, rest, height, width, rng.integers(8, 20, rest))
        categories += rng.integers(1, num_categories + 1, rest).tolist()
        scores = np.concatenate([rng.uniform(0.3, 1.0, near), rng.uniform(0.0, 0.5, rest)])
        rles = mask_utils.frPyObjects([p.tolist() for p in polygons], height, width)
        for polygon, rle, category, score in zip(polygons, rles, categories, scores):
            results.append({"image_id": image["id"], "category_id": int(category), "bbox": _box(polygon),
                            "score": round(float(score), 4),
                            "segmentation": {"size": [height, width], "counts": rle["counts"].decode()}})
    return results


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_mb(pid: int) -> Dict[str, float]:
    """``rss``, ``pss`` and ``anonymous`` (heap and copied-on-write pages, not file-backed ones such as a
    memory-mapped cache) of process ``pid`` in MiB, from ``/proc/pid/smaps_rollup``."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "anonymous": fields["Anonymous"]}


def _child(function: Callable, args: tuple, queue) -> None:
    try:
        queue.put(("ok", function(*args)))
    except BaseException as exc:  # the parent re-raises it with the child's message
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_isolated(function: Callable, *args):
    """``function(*args)`` in a fresh spawned process (so its peak RSS is its own); returns its result."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(function, args, queue))
    process.start()
    status, value = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"{function.__name__} failed in its process: {value}")
    return value


def _time_evaluation(ann_file: str, results_file: str, backend: str, iou_type: str) -> dict:
    from maskrcnn.evaluation.coco_evaluator import evaluate_results, load_coco

    with open(results_file, encoding="utf-8") as f:
        results = json.load(f)
    coco_gt = load_coco(ann_file, backend)
    start = time.perf_counter()
    metrics = evaluate_results(coco_gt, results, (iou_type,), verbose=False, backend=backend)
    return {"seconds": time.perf_counter() - start, "AP": metrics[iou_type]["AP"], "peak_rss_mb": peak_rss_mb()}


def bench_evaluation(ann_file: Union[str, Path], results_file: Union[str, Path],
                     backends=("pycocotools", "faster-coco-eval"), iou_types=("bbox", "segm")) -> Dict[str, dict]:
    """Seconds of :func:`~maskrcnn.evaluation.coco_evaluator.evaluate_results` (results loading, matching,
    accumulation, summary) per IoU type and backend, each in its own process, side by side.

    Returns ``{iou_type: {backend: {"seconds", "AP", "peak_rss_mb"}}}``.
    """
    return {iou_type: {backend: run_isolated(_time_evaluation, str(ann_file), str(results_file), backend, iou_type)
                       for backend in backends} for iou_type in iou_types}


def _rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    return memory_mb(os.getpid())["rss"]


def _build_pycocotools(ann_file: str) -> dict:
    import contextlib
    import io

    import maskrcnn.data.coco  # noqa: F401  (what a training process imports: both start from the same RSS)
    from pycocotools.coco import COCO

    baseline = _rss_mb()
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        COCO(ann_file)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline}


def _build_ours(ann_file: str, cache: bool) -> dict:
    from maskrcnn.data.coco import CocoDetection

    baseline = _rss_mb()
    start = time.perf_counter()
    dataset = CocoDetection(ann_file, Path(ann_file).parent, cache=cache)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline, "rss_mb": _rss_mb(),
            "images": len(dataset)}


class _PycocotoolsRecords:
    """A dataset over a pycocotools ``COCO`` index that reads each image's annotations as a loader would."""

    def __init__(self, ann_file: str):
        import contextlib
        import io

        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(ann_file)
        self.image_ids = list(self.coco.imgs)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> Tuple[int, int]:
        """(this process's id, the image's polygon count)."""
        anns = self.coco.imgToAnns[self.image_ids[index]]
        np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        polygons = [np.array(p, dtype=np.float32) for a in anns if isinstance(a["segmentation"], list)
                    for p in a["segmentation"]]
        return os.getpid(), len(polygons)


class _OurRecords:
    """A dataset over :class:`~maskrcnn.data.coco.CocoDetection` records (the annotations, not the images)."""

    def __init__(self, ann_file: str):
        from maskrcnn.data.coco import CocoDetection

        self.dataset = CocoDetection(ann_file, Path(ann_file).parent)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[int, int]:
        """(this process's id, the image's polygon count)."""
        record = self.dataset.record(index)
        return os.getpid(), sum(len(s) for s in record["segmentations"] if isinstance(s, list))


class _NoRecords:
    """As many items as the json has images, each only its process id: the workers' memory without a dataset."""

    def __init__(self, ann_file: str):
        with open(ann_file, encoding="utf-8") as f:
            self.length = len(json.load(f)["images"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[int, int]:
        return os.getpid(), 0


def _pids(batch: List[Tuple[int, int]]) -> set:
    return {pid for pid, _ in batch}


def _worker_memory(ann_file: str, kind: str, num_workers: int) -> dict:
    import torch

    import maskrcnn.data.coco  # noqa: F401  (every kind forks its workers from the same imports)

    dataset = {"ours": _OurRecords, "pycocotools": _PycocotoolsRecords, "none": _NoRecords}[kind](ann_file)
    loader = torch.utils.data.DataLoader(dataset, batch_size=512, num_workers=num_workers, collate_fn=_pids,
                                         persistent_workers=True)
    start = time.perf_counter()
    pids = set()
    for batch in tqdm(loader, desc=f"pass ({kind})", unit="batch", leave=False):
        pids |= batch
    seconds = time.perf_counter() - start
    workers = [memory_mb(pid) for pid in sorted(pids)]
    parent = memory_mb(os.getpid())
    del loader
    return {"pass_seconds": seconds, "workers": len(workers),
            "workers_pss_mb": sum(w["pss"] for w in workers),
            "workers_anonymous_mb": sum(w["anonymous"] for w in workers),
            "parent_pss_mb": parent["pss"], "total_pss_mb": parent["pss"] + sum(w["pss"] for w in workers)}


def annotation_report(ann_file: Union[str, Path], *, num_workers: int = 4) -> Dict[str, dict]:
    """Build time and peak RSS of pycocotools' ``COCO`` and of :class:`~maskrcnn.data.coco.CocoDetection`
    (packing and writing its cache), the cache's load time, and the memory of ``num_workers`` loader workers
    after a full pass over every image's annotations (images are not read), for both and for a dataset of
    nothing (the workers' own memory: interpreter, torch); each in its own process.
    """
    ann_file = Path(ann_file)
    cache_file = ann_file.with_name(ann_file.name + ".maskrcnn-cache")
    cache_file.unlink(missing_ok=True)
    report = {"pycocotools": run_isolated(_build_pycocotools, str(ann_file)),
              "ours_build": run_isolated(_build_ours, str(ann_file), True),
              "ours_cache_load": run_isolated(_build_ours, str(ann_file), True),
              "ours_cache_bytes": cache_file.stat().st_size}
    for kind in ("none", "pycocotools", "ours"):
        report[f"workers_{kind}"] = run_isolated(_worker_memory, str(ann_file), kind, num_workers)
    return report


def _tiled_inference(config_path: str, height: int, width: int, tile_size: int, tile_overlap: int,
                     tiles_per_batch: int, score_thresh: float, threads: Optional[int]) -> dict:
    import cv2
    import torch

    from maskrcnn.config import load_config
    from maskrcnn.predictor import Predictor
    from maskrcnn.tiling import tile_grid

    if threads:
        torch.set_num_threads(threads)
    # the model sees each tile at its own size: no resize
    cfg = load_config(config_path, [f"model.input.min_size=[{tile_size}]", f"model.input.max_size={tile_size}"])
    torch.manual_seed(0)
    predictor = Predictor(cfg, None, score_thresh=score_thresh, tile_size=tile_size, tile_overlap=tile_overlap,
                          tiles_per_batch=tiles_per_batch)
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), 90, dtype=np.uint8)
    for _ in range(height * width // 40_000):  # an object every 200 x 200 pixels on average
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        axes = (int(rng.integers(10, 120)), int(rng.integers(10, 120)))
        cv2.ellipse(image, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, rng.integers(0, 256, 3).tolist(), -1)
    baseline = _rss_mb()
    start = time.perf_counter()
    result = predictor(image)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
            "image_float_mb": 3 * height * width * 4 / 2**20, "tiles": len(tile_grid((height, width), tile_size,
                                                                                     tile_overlap)),
            "detections": len(result), "full_canvas_per_detection_mb": len(result) * height * width / 2**20}


def tiled_inference_figures(config_path: Union[str, Path], *, height: int = 6000, width: int = 8000,
                            tile_size: int = 512, tile_overlap: int = 128, tiles_per_batch: int = 4,
                            score_thresh: float = 0.3, threads: Optional[int] = None) -> dict:
    """Time and peak RSS of :class:`~maskrcnn.predictor.Predictor` tiling one ``height x width`` image of
    synthetic ellipses with the configuration's model (seeded random weights, no resize of the tiles), in
    its own process. Also the RSS before the call (model and image loaded), the float image's size, the
    tile and detection counts, and what one full-size bool canvas per detection would have taken."""
    return run_isolated(_tiled_inference, str(config_path), height, width, tile_size, tile_overlap, tiles_per_batch,
                        score_thresh, threads)
