"""COCO evaluation: run a model over a COCO-format dataset and score its results with pycocotools.

    metrics = evaluate(model, "annotations/instances_val.json", "val/", output_dir="output/eval")
    metrics["segm"]["AP"], metrics["bbox"]["per_category"]["circle"]

A model's labels are matched to the dataset's categories through its label -> category id map (a
checkpoint's ``label_to_cat_id``), or by name where it has none (:func:`maskrcnn.inference.match_categories`);
a model trained on the dataset's own categories needs neither (labels 1..K are the categories in
increasing id order, as :class:`~maskrcnn.data.coco.CocoDetection` numbers them). Detections of labels
whose category the dataset lacks (COCO's 'N/A' slots of torchvision's 90, classes the dataset does not
have) are left out, and one line says how many.
Scoring runs on one of two backends: ``"pycocotools"`` (the reference, default) or ``"faster-coco-eval"``
(the same COCOeval with its per-image matching and accumulation in C++; identical numbers, several times
faster on large result sets: ``python -m benchmarks.bench_eval``). Boundary AP (``"boundary"``, Cheng et al.
2021: mask AP with each pair's IoU the smaller of its mask IoU and its Boundary IoU, the IoU of the bands
within :data:`BOUNDARY_DILATION_RATIO` of the image diagonal inside each mask's outline) is scored by
faster-coco-eval whichever backend scores boxes and masks; without that package it is skipped, and one line
says so.
Under ``torch.distributed`` each process runs its share of the images (every world_size-th image, from its
rank) and rank 0 gathers the results and scores them.

The metrics dict holds, per IoU type ("bbox", "segm", "boundary"), ``AP`` (IoU 0.50:0.95), ``AP50``, ``AP75``,
``APs``, ``APm``, ``APl`` on pycocotools' 0-1 scale and ``per_category`` (category name -> AP). Where there is no
ground truth to score (-1 in pycocotools' summary, e.g. no small objects; a category without ground truth,
which pycocotools would average to NaN) the value is ``None`` (JSON null).
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from maskrcnn.config import DataConfig
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.loader import collate, workers_fork_safely
from maskrcnn.distributed import get_rank, get_world_size, unwrap_model
from maskrcnn.errors import InputError, MissingPackageError
from maskrcnn.fileio import save_json
from maskrcnn.modeling.maskrcnn import MaskRCNN
from maskrcnn.inference import detect, match_categories
from maskrcnn.precision import resolve_precision

IOU_TYPES = ("bbox", "segm", "boundary")
MASK_IOU_TYPES = ("segm", "boundary")  # scored on the results' segmentation
# Boundary IoU's band: the pixels of a mask within this fraction of its image's diagonal of the mask's outline
# (Cheng et al. 2021, "Boundary IoU: Improving Object-Centric Image Segmentation Evaluation", their value).
BOUNDARY_DILATION_RATIO = 0.02
BOUNDARY_SKIPPED = "Boundary AP skipped: it needs the faster-coco-eval package (pip install faster-coco-eval)"
BACKENDS = ("pycocotools", "faster-coco-eval")
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six numbers of COCOeval.stats


def _backend_api(backend: str) -> tuple:
    """(COCO class, COCOeval class) of a scoring backend; faster-coco-eval is imported only when asked for."""
    if backend == "pycocotools":
        return COCO, COCOeval
    if backend == "faster-coco-eval":
        try:
            from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster
        except ImportError as error:
            raise MissingPackageError("the faster-coco-eval backend needs its package: "
                                      "pip install faster-coco-eval") from error
        return FasterCOCO, COCOeval_faster
    raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")


def load_coco(ann_file: Union[str, Path], backend: str = "pycocotools"):
    """Read a COCO annotation file (quietly) into ``backend``'s COCO class.

    Raises ``FileNotFoundError`` naming a missing file.
    """
    coco_class, _ = _backend_api(backend)
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_class(str(ann_file))


def run_inference(model: Union[MaskRCNN, DistributedDataParallel], dataset: CocoDetection, *, batch_size: int = 2,
                  device: Optional[Union[str, torch.device]] = None, precision: Optional[str] = None,
                  with_masks: bool = True, num_workers: int = DataConfig.num_workers, progress: bool = True,
                  class_names: Optional[Sequence[str]] = None,
                  label_to_cat_id: Optional[dict] = None) -> Optional[List[dict]]:
    """COCO result dicts of ``model`` on every image of ``dataset``.

    model: a MaskRCNN (or its DDP wrapper); put in eval mode for the run, its training mode restored after.
    dataset: the evaluation set, images at their file size (no transforms; the model resizes).
    batch_size: images per forward pass; device: where images go (default: the model's device).
    precision: "auto" (bf16 where the device computes it natively, else fp32), "fp32" or "bf16" (autocast
        forward); None, the default, is the model's own ``precision`` (``model.precision`` of its configuration).
    num_workers: image loading processes (0 loads in this process).
    class_names: the model's class names (label 1..K); default the dataset's own, for a model trained on it.
    label_to_cat_id: the model's label -> category id map; default (with default class names) the dataset's
        own mapping; None with class names given matches labels to categories by name.
    with_masks: add ``segmentation`` (COCO RLE encoded from each mask's box region, no full-image canvas).
    Returns ``image_id``, ``category_id`` (the dataset's ids), ``bbox`` (x, y, w, h pixels), ``score`` (and
    ``segmentation``) per detection, all images on rank 0; ``None`` on the other ranks.
    """
    if class_names is None:
        class_names = dataset.class_names
        if label_to_cat_id is None:
            label_to_cat_id = dataset.label_to_cat_id
    mapping = match_categories(class_names, label_to_cat_id, dataset.categories)
    model = unwrap_model(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = resolve_precision(model.precision if precision is None else precision, device, warn=False).precision
    rank, world_size = get_rank(), get_world_size()
    shard = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    was_training = model.training
    model.eval()
    results = []
    dropped = 0
    try:
        with tqdm(total=len(shard), desc="inference", unit="img", disable=not progress or rank != 0) as bar:
            with workers_fork_safely():
                batches = iter(loader)
            for images, targets in batches:
                for image, target in zip(images, targets):
                    if tuple(image.shape[1:]) != tuple(target["orig_size"]):
                        raise InputError(f"image id {target['image_id']}: the dataset returned a "
                                         f"{image.shape[2]}x{image.shape[1]} image for a {target['orig_size'][1]}x"
                                         f"{target['orig_size'][0]} file; evaluation needs untransformed images")
                images = [image.to(device, non_blocking=True) for image in images]
                detections = detect(model, images, class_names=class_names, label_to_cat_id=mapping,
                                    mask_format="rle" if with_masks else "none", precision=precision)
                for target, instances in zip(targets, detections):
                    coco = instances.to_coco(target["image_id"])
                    dropped += len(instances) - len(coco)
                    results.extend(coco)
                bar.update(len(images))
    finally:
        model.train(was_training)
    if world_size > 1:
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object((results, dropped), gathered, dst=0)
        if rank != 0:
            return None
        results = [result for part, _ in gathered for result in part]
        dropped = sum(count for _, count in gathered)
    if dropped and progress:
        unmatched = [name for label, name in enumerate(class_names, start=1) if label not in mapping]
        print(f"left out {dropped} detections of labels whose category {dataset.ann_file} lacks "
              f"({len(unmatched)} of the model's {len(class_names)} classes: {', '.join(unmatched[:8])}"
              f"{', ...' if len(unmatched) > 8 else ''})")
    return results


def _load_results(coco_gt, results: List[dict]):
    """``coco_gt.loadRes`` (pycocotools' fails on an empty list: no results become an empty result set)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            return coco_gt.loadRes(results)
        coco_dt = type(coco_gt)()
        coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                           "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
        coco_dt.createIndex()
        return coco_dt


def _as_backend_gt(coco_gt, coco_class):
    """The ground truth as ``coco_class``; one of the other backend is indexed anew from its dataset dict with
    copies of its annotation dicts, so that the fields a backend adds while scoring (faster-coco-eval's RLE
    and boundary) stay out of the caller's ground truth."""
    if isinstance(coco_gt, coco_class):
        return coco_gt
    converted = coco_class()
    annotations = [dict(ann) for ann in coco_gt.dataset.get("annotations", [])]
    converted.dataset = {**coco_gt.dataset, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        converted.createIndex()
    return converted


def _none_if_missing(value: float) -> Optional[float]:
    """pycocotools' summary marks 'no ground truth to score' as -1."""
    return None if value < 0 else float(value)


def format_per_category(per_category: Dict[str, Optional[float]], columns: int = 3) -> str:
    """A text table of per-category AP (percent), ``columns`` categories per line; '-' for no ground truth."""
    cells = [f"{name[:20]:<20} {'-' if ap is None else f'{100 * ap:5.1f}':>5}" for name, ap in per_category.items()]
    return "\n".join("  ".join(cells[i:i + columns]) for i in range(0, len(cells), columns))


def boundary_ap_available() -> bool:
    """Whether Boundary AP can be scored: its one implementation is faster-coco-eval's."""
    try:
        _backend_api("faster-coco-eval")
    except MissingPackageError:
        return False
    return True


def run_cocoeval(coco_gt, results: List[dict], iou_type: str, *, backend: str = "pycocotools",
                 on_step: Optional[Callable[[str], None]] = None):
    """The COCOeval of ``results`` for one IoU type, evaluated and accumulated (not summarised).

    coco_gt, results: as in :func:`evaluate_results`. iou_type: "bbox", "segm" or "boundary".
    backend: scores "bbox" and "segm"; "boundary" is always faster-coco-eval's boundary mode, with dilation
        ratio :data:`BOUNDARY_DILATION_RATIO` (its ``ious[image_id, category_id]`` are, per detection x
        ground truth, min(mask IoU, Boundary IoU); a crowd region's, mask IoU alone).
    on_step: called with "load", "evaluate" and "accumulate" as each stage ends (a progress bar).
    """
    if iou_type == "boundary":
        backend = "faster-coco-eval"
    coco_class, eval_class = _backend_api(backend)
    coco_gt = _as_backend_gt(coco_gt, coco_class)
    on_step = on_step or (lambda stage: None)
    dets = copy.deepcopy(results)  # loadRes adds fields in place
    if iou_type in MASK_IOU_TYPES:
        for det in dets:
            if "segmentation" not in det:
                raise InputError(f"result for image id {det['image_id']} has no 'segmentation' for {iou_type} "
                                 "evaluation")
            # With a "bbox" present, loadRes would take the instance area from the box, not the mask.
            det.pop("bbox", None)
    coco_dt = _load_results(coco_gt, dets)
    on_step("load")
    if iou_type == "boundary":
        evaluator = eval_class(coco_gt, coco_dt, iou_type, boundary_dilation_ratio=BOUNDARY_DILATION_RATIO)
    else:
        evaluator = eval_class(coco_gt, coco_dt, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        on_step("evaluate")
        evaluator.accumulate()
        on_step("accumulate")
    if backend == "faster-coco-eval":
        evaluator.print_function = print  # its default is a logger
    return evaluator


def evaluate_results(coco_gt, results: List[dict], iou_types: Sequence[str] = IOU_TYPES, *, verbose: bool = True,
                     backend: str = "pycocotools", progress: bool = False) -> Dict[str, dict]:
    """Score COCO result dicts against ``coco_gt`` with ``backend``'s COCOeval.

    coco_gt: the ground truth, a COCO object of either backend (:func:`load_coco`); one of the other backend
        is re-indexed (:func:`_as_backend_gt`).
    backend: "pycocotools" (the reference) or "faster-coco-eval" (C++ matching and accumulation, same numbers)
        for "bbox" and "segm"; "boundary" is faster-coco-eval's either way (:func:`run_cocoeval`), skipped with
        one printed line (:data:`BOUNDARY_SKIPPED`) where that package is missing.
    progress: a progress bar over the scoring stages (load, evaluate, accumulate per IoU type).
    results: dicts with ``image_id``, ``category_id``, ``bbox`` (x, y, w, h), ``score`` and, for "segm" and
        "boundary", ``segmentation`` (RLE); not modified. Images without results count as images with no
        detections; crowd ground truth is handled as COCO defines it.
    iou_types: any of "bbox", "segm", "boundary". Mask and Boundary AP use mask areas for the
        small/medium/large ranges.
    verbose: print COCOeval's 12-number summary and a per-category AP table for each IoU type.
    Returns ``{iou_type: {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_category": {name: AP}}}`` (no
    "boundary" where it was skipped).
    """
    _backend_api(backend)
    for key, known in (("image_id", coco_gt.getImgIds()), ("category_id", coco_gt.getCatIds())):
        unknown = sorted({r[key] for r in results} - set(known), key=str)
        if unknown:
            raise InputError(f"results name {key} values not in the ground truth: {unknown[:10]}")
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise InputError(f"iou_types must be among {IOU_TYPES}, got {iou_type!r}")
    if "boundary" in iou_types and not boundary_ap_available():
        print(BOUNDARY_SKIPPED)
        iou_types = [t for t in iou_types if t != "boundary"]
    metrics = {}
    bar = tqdm(total=3 * len(iou_types), desc=f"scoring ({backend})", unit="step", disable=not progress)
    for iou_type in iou_types:
        def step_done(stage: str) -> None:
            bar.set_postfix_str(f"{iou_type}: {stage}")
            bar.update()

        evaluator = run_cocoeval(coco_gt, results, iou_type, backend=backend, on_step=step_done)
        if verbose:
            print(f"Evaluation of {iou_type}" + (f" (Boundary IoU, dilation ratio {BOUNDARY_DILATION_RATIO:g}):"
                                                 if iou_type == "boundary" else ":"))
            evaluator.summarize()
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                evaluator.summarize()
        # precision: (T IoU thresholds, R recall points, K categories, A area ranges, M max-dets); -1 = no data
        precision = evaluator.eval["precision"]
        per_category = {}
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]  # all areas, 100 detections
            p = p[p > -1]
            per_category[coco_gt.cats[cat_id]["name"]] = float(p.mean()) if p.size else None
        metrics[iou_type] = {key: _none_if_missing(v) for key, v in zip(SUMMARY_KEYS, evaluator.stats[:6])}
        metrics[iou_type]["per_category"] = per_category
        if verbose:
            print(f"Per-category {iou_type} AP:\n{format_per_category(per_category)}")
    bar.close()
    return metrics


def evaluate(model: Union[MaskRCNN, DistributedDataParallel], ann_file: Union[str, Path], image_dir: Union[str, Path],
             output_dir: Optional[Union[str, Path]] = None, *, batch_size: int = 2,
             device: Optional[Union[str, torch.device]] = None, precision: Optional[str] = None,
             iou_types: Sequence[str] = IOU_TYPES, num_workers: int = DataConfig.num_workers, verbose: bool = True,
             class_names: Optional[Sequence[str]] = None, label_to_cat_id: Optional[dict] = None,
             backend: str = "pycocotools", annotation_cache_dir: Optional[Union[str, Path]] = None) -> Optional[dict]:
    """Run ``model`` on a COCO dataset and score it; callable from training for periodic evaluation.

    Returns (on rank 0; ``None`` on other ranks) the metrics of :func:`evaluate_results` plus ``images``
    (number of images), ``images_per_s`` (inference throughput, image reading and RLE encoding included) and
    ``precision`` (what ``precision`` resolved to and why, see :mod:`maskrcnn.precision`).
    precision, num_workers, class_names, label_to_cat_id: as in :func:`run_inference`.
    backend: the scoring backend of :func:`evaluate_results`; checked before inference starts.
    annotation_cache_dir: the folder of the annotations' cache file (see :class:`CocoDetection`); None: beside
        ``ann_file``.
    output_dir: if given, rank 0 writes ``results.json`` (COCO results) and ``metrics.json`` there, atomically.
    """
    _backend_api(backend)
    inner = unwrap_model(model)
    resolved = resolve_precision(inner.precision if precision is None else precision,
                                 device if device is not None else next(inner.parameters()).device)
    dataset = CocoDetection(ann_file, image_dir, cache_dir=annotation_cache_dir)
    dataset.check_images(progress=verbose and get_rank() == 0)  # a bad file fails now, not mid-inference
    start = time.perf_counter()
    results = run_inference(model, dataset, batch_size=batch_size, device=device, precision=resolved.precision,
                            with_masks=any(t in MASK_IOU_TYPES for t in iou_types), num_workers=num_workers,
                            progress=verbose, class_names=class_names, label_to_cat_id=label_to_cat_id)
    elapsed = time.perf_counter() - start
    if results is None:
        return None
    metrics = evaluate_results(load_coco(ann_file, backend), results, iou_types, verbose=verbose, backend=backend,
                               progress=verbose)
    metrics["images"] = len(dataset)
    metrics["images_per_s"] = len(dataset) / elapsed
    metrics["precision"] = resolved.to_dict()
    if output_dir is not None:
        save_json(Path(output_dir) / "results.json", results)
        save_json(Path(output_dir) / "metrics.json", metrics)
    return metrics
