"""How a trained 28 x 28 mask is brought up to its box, and what that does to its outline: mask AP and Boundary AP
of one checkpoint's masks pasted several ways, the detections the same for every way.

    python -m benchmarks.mask_upsampling --checkpoint output/demo/model_final.pth \\
        --ann data/shapes/annotations/instances_val.json --images data/shapes/val [--summary out.json]

The model runs once per validation image and hands out each detection's S x S probabilities of its class
(``mask_format="probs"``). Each way (``WAYS``) then pastes them with torchvision's geometry (the mask padded by
one cell, its box grown by (S + 2) / S and truncated to whole pixels, resized to that extent and thresholded):

- ``probabilities, bilinear``: the package's paste (and torchvision's), probabilities resized bilinearly,
  foreground above 0.5; checked here against :func:`~maskrcnn.modeling.paste.paste_masks_in_image`;
- ``probabilities, bicubic``: the same with bicubic resizing (the outline follows the cells' values more
  closely between cell centres);
- ``logits, bilinear``: log-odds resized bilinearly, foreground above 0 (the probabilities clamped to
  [1e-4, 1 - 1e-4], the padding at 1e-4): a sigmoid is not linear, so the 0.5 crossing moves where neighbouring
  cells are far apart;
- ``probabilities, bilinear, above 0.4`` and ``above 0.6``: where the threshold alone puts the outline.

Prints a Markdown table (mask AP, AP75, Boundary AP, Boundary AP75 per way) and writes it as JSON with the
machine (``--summary``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from maskrcnn.cli import run
from maskrcnn.data.coco import CocoDetection
from maskrcnn.evaluation.coco_evaluator import evaluate_results, load_coco
from maskrcnn.fileio import read_checkpoint, save_json
from maskrcnn.config import config_from_dict
from maskrcnn.modeling.maskrcnn import build_model
from maskrcnn.modeling.paste import paste_masks_in_image
from maskrcnn.precision import autocast, machine_summary, resolve_precision

LOGIT_CLAMP = 1e-4  # probabilities are clamped to [LOGIT_CLAMP, 1 - LOGIT_CLAMP] before their log-odds


class Way(NamedTuple):
    """One way to bring a mask to its box: what is resized (``space``), how (``mode``), where it is cut."""

    space: str  # "probabilities" or "logits"
    mode: str  # F.interpolate's mode: "bilinear" or "bicubic"
    threshold: float  # foreground above this probability


WAYS: Dict[str, Way] = {
    "probabilities, bilinear": Way("probabilities", "bilinear", 0.5),
    "probabilities, bicubic": Way("probabilities", "bicubic", 0.5),
    "logits, bilinear": Way("logits", "bilinear", 0.5),
    "probabilities, bilinear, above 0.4": Way("probabilities", "bilinear", 0.4),
    "probabilities, bilinear, above 0.6": Way("probabilities", "bilinear", 0.6),
}


def paste(probs: Tensor, boxes: Tensor, image_size: Tuple[int, int], way: Way) -> Tensor:
    """(D, S, S) probabilities and (D, 4) xyxy boxes in pixels -> (D, H, W) bool masks, pasted ``way``.

    One detection at a time, with torchvision's geometry (``paste_masks_in_image`` with padding 1)."""
    height, width = image_size
    side = probs.shape[-1]
    if way.space == "logits":
        clamped = probs.float().clamp(LOGIT_CLAMP, 1 - LOGIT_CLAMP)
        values, pad, cut = torch.logit(clamped), math.log(LOGIT_CLAMP / (1 - LOGIT_CLAMP)), math.log(
            way.threshold / (1 - way.threshold))
    else:
        values, pad, cut = probs.float(), 0.0, way.threshold
    padded = F.pad(values, (1, 1, 1, 1), value=pad)
    scale = (side + 2) / side
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2 * scale
    grown = torch.cat([centre - half, centre + half], dim=1).to(torch.int64)
    out = torch.zeros((len(probs), height, width), dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(grown.tolist()):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        resized = F.interpolate(padded[i][None, None], size=(h, w), mode=way.mode, align_corners=False)[0, 0]
        left, top, right, bottom = max(x0, 0), max(y0, 0), min(x1 + 1, width), min(y1 + 1, height)
        if right > left and bottom > top:
            out[i, top:bottom, left:right] = resized[top - y0:bottom - y0, left - x0:right - x0] > cut
    return out


def detections(checkpoint: Path, ann: Path, images: Path) -> Tuple[List[dict], Dict[str, object]]:
    """Run the checkpoint's model once per image -> per image ``image_id``, ``size`` (H, W), ``boxes``,
    ``scores``, ``category_ids`` and ``probs`` (D, S, S), and the precision it ran in."""
    state = read_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg.model).eval()
    model.load_state_dict(state["model"])
    dataset = CocoDetection(ann, images)
    precision = resolve_precision(cfg.model.precision, "cpu", warn=False)
    out = []
    with torch.inference_mode(), autocast(precision.precision, torch.device("cpu")):
        for index in tqdm(range(len(dataset)), desc="inference", unit="img"):
            image, target = dataset[index]
            result = model([image], mask_format="probs")[0]
            out.append({"image_id": target["image_id"], "size": tuple(image.shape[1:]),
                        "boxes": result["boxes"].float(), "scores": result["scores"].float(),
                        "category_ids": [dataset.label_to_cat_id[int(label)] for label in result["labels"]],
                        "probs": result["mask_probs"].float()})
    return out, precision.to_dict()


def coco_results(images: List[dict], pasted: Callable[[dict], Tensor]) -> List[dict]:
    """COCO result dicts of every detection, its mask ``pasted(image)[i]`` as RLE."""
    results = []
    for image in images:
        masks = pasted(image).numpy()
        for i, (box, score, category) in enumerate(zip(image["boxes"].tolist(), image["scores"].tolist(),
                                                       image["category_ids"])):
            rle = mask_util.encode(np.asfortranarray(masks[i].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": image["image_id"], "category_id": category, "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "segmentation": rle})
    return results


def compare_ways(checkpoint: Path, ann: Path, images: Path) -> Dict[str, object]:
    """Mask AP and Boundary AP of each way in :data:`WAYS` -> ``ways`` {name: {mask_ap, mask_ap75, boundary_ap,
    boundary_ap75}}, ``reference_pixels_differing`` (the package's paste against this module's first way),
    ``precision``, ``machine``."""
    found, precision = detections(checkpoint, ann, images)
    differing = sum(int((paste_masks_in_image(image["probs"], image["boxes"], image["size"])
                         != paste(image["probs"], image["boxes"], image["size"], WAYS["probabilities, bilinear"]))
                        .sum()) for image in found)
    coco_gt = load_coco(ann)
    ways = {}
    for name, way in WAYS.items():
        results = coco_results(found, lambda image: paste(image["probs"], image["boxes"], image["size"], way))
        metrics = evaluate_results(coco_gt, results, ("segm", "boundary"), verbose=False)
        ways[name] = {"mask_ap": metrics["segm"]["AP"], "mask_ap75": metrics["segm"]["AP75"],
                      "boundary_ap": metrics["boundary"]["AP"], "boundary_ap75": metrics["boundary"]["AP75"]}
    return {"ways": ways, "reference_pixels_differing": differing, "precision": precision,
            "machine": machine_summary("cpu"), "checkpoint": str(checkpoint)}


def markdown(summary: Dict[str, object]) -> str:
    """The table of :func:`compare_ways`' figures, each way's change from the package's paste in brackets."""
    ways = summary["ways"]
    base = ways["probabilities, bilinear"]
    keys = ("mask_ap", "mask_ap75", "boundary_ap", "boundary_ap75")
    rows = ["| way | mask AP | mask AP75 | Boundary AP | Boundary AP75 |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, figures in ways.items():
        cells = [f"{figures[key]:.3f}" + ("" if figures is base else f" ({figures[key] - base[key]:+.3f})")
                 for key in keys]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint written by training")
    parser.add_argument("--ann", type=Path, required=True, help="COCO annotations of the validation images")
    parser.add_argument("--images", type=Path, required=True, help="folder of the validation images")
    parser.add_argument("--summary", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    summary = compare_ways(args.checkpoint, args.ann, args.images)
    print(markdown(summary))
    print(f"pixels where the package's paste and this module's bilinear one differ: "
          f"{summary['reference_pixels_differing']}; precision {summary['precision']['precision']}; "
          f"{summary['machine']}")
    if args.summary is not None:
        save_json(args.summary, summary)


if __name__ == "__main__":
    run(main)
