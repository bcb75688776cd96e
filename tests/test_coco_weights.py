"""torchvision's 90-slot COCO layout, converted and evaluated on a COCO-format set with COCO category ids:
the AP equals pycocotools' AP of torchvision's own outputs on the same images and categories."""

import contextlib
import io
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.config import Config
from maskrcnn.convert import coco_category_names, convert_torchvision_checkpoint
from maskrcnn.reference import sample_images, well_conditioned_torchvision_model

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import eval as eval_tool  # noqa: E402

NUM_IMAGES = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A converted random-weight torchvision model and a COCO set built from torchvision's own detections:
    the two categories it detects most (by COCO id) plus one it never does; half of each image's detections
    of those categories become the ground truth, so the AP is neither 0 nor 1; its other detections have
    no category in the set."""
    root = tmp_path_factory.mktemp("coco_weights")
    cfg = Config().model
    cfg.backbone.depth = 18
    tv = well_conditioned_torchvision_model(cfg, seed=3)
    torch.save(tv.state_dict(), root / "tv.pth")
    convert_torchvision_checkpoint(root / "tv.pth", root / "converted.pth")
    images = sample_images(96, torch.device("cpu"), count=NUM_IMAGES, seed=4)
    (root / "images").mkdir()
    for i, image in enumerate(images, start=1):
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        cv2.imwrite(str(root / "images" / f"{i:06d}.png"), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    with torch.no_grad():
        outputs = tv(images)
    names = coco_category_names()
    counts = torch.bincount(torch.cat([o["labels"] for o in outputs]), minlength=91)
    counts[[i + 1 for i, n in enumerate(names) if n == "N/A"]] = 0
    chosen = counts.argsort(descending=True)[:2].tolist()
    absent = next(i for i in range(1, 91) if counts[i] == 0 and names[i - 1] != "N/A")
    categories = [{"id": c, "name": names[c - 1]} for c in sorted(chosen + [absent])]
    tv_results, annotations = [], []
    for image_id, (image, out) in enumerate(zip(images, outputs), start=1):
        masks = (out["masks"][:, 0] >= 0.5).numpy()
        for k, (box, score, label) in enumerate(zip(out["boxes"].tolist(), out["scores"].tolist(),
                                                    out["labels"].tolist())):
            if label not in chosen:
                continue
            rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            xywh = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            tv_results.append({"image_id": image_id, "category_id": label, "bbox": xywh, "score": score,
                               "segmentation": rle})
            if k % 2 == 0:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                    "bbox": xywh, "area": float(mask_utils.area(rle)), "iscrowd": 0,
                                    "segmentation": rle})
    coco = {"images": [{"id": i, "file_name": f"{i:06d}.png", "height": int(im.shape[1]), "width": int(im.shape[2])}
                       for i, im in enumerate(images, start=1)],
            "annotations": annotations, "categories": categories}
    (root / "instances.json").write_text(json.dumps(coco))
    dropped = sum(len(o["labels"]) for o in outputs) - len(tv_results)
    assert dropped > 0
    return root, tv_results, dropped


def _pycocotools_ap(ann_file: Path, results: list, iou_type: str) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dets = [dict(r) for r in results]
        if iou_type == "segm":
            for d in dets:
                d.pop("bbox")
        evaluator = COCOeval(gt, gt.loadRes(dets), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


@pytest.mark.slow
def test_converted_coco_weights_score_as_torchvision_does(setup, capsys):
    root, tv_results, dropped = setup
    eval_tool.main(["--checkpoint", str(root / "converted.pth"), "--ann", str(root / "instances.json"),
                    "--images", str(root / "images"), "--output", str(root / "eval"), "--num-workers", "0",
                    "--precision", "fp32"])  # torchvision's figures are fp32
    printed = capsys.readouterr().out
    assert f"left out {dropped} detections of labels whose category" in printed
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    for iou_type in ("bbox", "segm"):
        expected = _pycocotools_ap(root / "instances.json", tv_results, iou_type)
        assert 0.1 < expected < 0.95
        assert metrics[iou_type]["AP"] == expected
    ours = json.loads((root / "eval" / "results.json").read_text())
    assert len(ours) == len(tv_results)
    assert {r["category_id"] for r in ours} <= {c["id"] for c in json.loads((root / "instances.json").read_text())["categories"]}


def test_model_and_dataset_without_a_common_category_is_an_error(setup, tmp_path):
    root, _, _ = setup
    coco = json.loads((root / "instances.json").read_text())
    coco["categories"] = [{"id": 1000, "name": "zebra crossing"}]
    coco["annotations"] = []
    (tmp_path / "other.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"no category in common.*model \[1, 2, 3.*dataset \[1000\]"):
        eval_tool.main(["--checkpoint", str(root / "converted.pth"), "--ann", str(tmp_path / "other.json"),
                        "--images", str(root / "images"), "--output", str(tmp_path / "eval"), "--num-workers", "0"])
