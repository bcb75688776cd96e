"""The README's "Train on your own data" walkthrough, end to end, on a tiny generated labelme folder:
convert -> check -> fine-tune from converted torchvision weights -> evaluate -> infer with overlays."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from maskrcnn.data.shapes import CATEGORIES, mask_to_polygons, render_image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.backbone.depth=18", "model.input.min_size=[64]", "model.input.max_size=96",
        "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=100", "model.rpn.pre_nms_topk_test=200",
        "model.rpn.post_nms_topk_test=50", "model.rpn.batch_size_per_image=64",
        "model.roi_heads.batch_size_per_image=32", "solver.ims_per_batch=2", "solver.max_iter=2",
        "solver.warmup_iters=1", "data.num_workers=0", "train.device=cpu", "train.precision=fp32",
        "train.log_period=1"]


def _labelme_folder(root: Path, count: int = 6) -> None:
    """``count`` shapes images with one labelme json each (polygons from the visible masks)."""
    names = {c["id"]: c["name"] for c in CATEGORIES}
    root.mkdir(parents=True)
    for i in range(count):
        pixels, instances = render_image(np.random.default_rng([7, i]), min_size=64, max_size=96)
        cv2.imwrite(str(root / f"photo_{i}.png"), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
        shapes = [{"label": names[category_id], "points": np.reshape(polygon, (-1, 2)).tolist(), "group_id": n,
                   "shape_type": "polygon", "flags": {}}
                  for n, (category_id, mask, _, crowd) in enumerate(instances) if not crowd
                  for polygon in mask_to_polygons(mask)]
        (root / f"photo_{i}.json").write_text(json.dumps({
            "version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": f"photo_{i}.png", "imageData": None,
            "imageHeight": pixels.shape[0], "imageWidth": pixels.shape[1]}))


def _run(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


@pytest.mark.slow
def test_walkthrough_from_labelme_to_overlays(tmp_path):
    photos, data, out = tmp_path / "my_photos", tmp_path / "data", tmp_path / "output"
    _labelme_folder(photos)
    printed = _run("tools/convert_dataset.py", "--from", "labelme", str(photos), "--out",
                   str(data / "instances.json"), "--val-fraction", "0.34")
    assert "3 classes (circle, square, triangle)" in printed
    train_ann, val_ann = data / "instances_train.json", data / "instances_val.json"
    assert len(json.loads(val_ann.read_text())["images"]) == 2

    printed = _run("tools/check_dataset.py", "--ann", str(train_ann), "--images", str(photos), "--output",
                   str(out / "check"), "--draw", "2")
    assert "0 errors" in printed and len(list((out / "check" / "overlays").glob("*.png"))) == 2

    # torchvision's COCO Mask R-CNN stands in at ResNet-18 and random weights: nothing is downloaded
    torch.manual_seed(0)
    tv = torchvision.models.detection.MaskRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None),
                                               num_classes=91)
    torch.save(tv.state_dict(), tmp_path / "tv_coco.pth")
    _run("tools/convert_torchvision.py", str(tmp_path / "tv_coco.pth"), str(tmp_path / "weights" / "coco.pth"))
    _run("tools/train.py", "--config", "configs/maskrcnn_R50_FPN_finetune.yaml",
         f"model.weights={tmp_path / 'weights' / 'coco.pth'}", "model.roi_heads.num_classes=3",
         f"data.train_ann={train_ann}", f"data.train_images={photos}", f"data.val_ann={val_ann}",
         f"data.val_images={photos}", f"train.output_dir={out / 'mine'}", *TINY)
    summary = json.loads((out / "mine" / "weights_summary.json").read_text())
    assert summary["classes_fresh"] == ["circle", "square", "triangle"] and summary["tensors_loaded"] > 100
    assert json.loads((out / "mine" / "train_summary.json").read_text())["eval"]["images"] == 2

    printed = _run("tools/eval.py", "--checkpoint", str(out / "mine" / "model_final.pth"), "--ann", str(val_ann),
                   "--images", str(photos), "--output", str(out / "eval"), "--num-workers", "0")
    assert "2 images" in printed
    printed = _run("tools/infer.py", "--checkpoint", str(out / "mine" / "model_final.pth"), "--input", str(photos),
                   "--output", str(out / "mine" / "overlays"))
    assert printed.splitlines()[0].startswith("precision auto -> ")  # the resolved precision and why, once
    assert printed.splitlines()[1].startswith("6 images")
    assert len(list((out / "mine" / "overlays").glob("photo_*.png"))) == 6
