"""torchvision Mask R-CNN state dicts -> maskrcnn checkpoints: the command-line round trip, the
pre-0.13 key layout, and the inputs that must be refused."""

import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

from maskrcnn.config import config_from_dict
from maskrcnn.convert import (config_for_torchvision_state, convert_torchvision_checkpoint,
                              convert_torchvision_state_dict)
from maskrcnn.modeling.maskrcnn import build_model

ROOT = Path(__file__).resolve().parents[1]
TV_NUM_CLASSES = 5  # torchvision counts background: 4 object classes


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    return torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                              num_classes=TV_NUM_CLASSES)


@pytest.fixture(scope="module")
def tv_file(tv_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("torchvision") / "tv.pth"
    torch.save(tv_model.state_dict(), path)
    return path


def old_layout(state):
    """The key names torchvision used before 0.13: the inverse of the upgrades its modules apply to
    state dicts without a version (``FeaturePyramidNetwork``, ``RPNHead``, ``MaskRCNNHeads``
    ``_load_from_state_dict``)."""
    out = OrderedDict()
    for key, value in state.items():
        for new, old in [(".fpn.inner_blocks.{}.0.", ".fpn.inner_blocks.{}."),
                         (".fpn.layer_blocks.{}.0.", ".fpn.layer_blocks.{}.")]:
            for i in range(4):
                key = key.replace(new.format(i), old.format(i))
        key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            key = key.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        out[key] = value
    return out


def test_cli_round_trip_loads_strictly(tv_model, tv_file, tmp_path):
    src, dst, names = tv_file, tmp_path / "out" / "converted.pth", tmp_path / "names.txt"
    names.write_text("cat\ndog\n\nbird\nfish\n")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_torchvision.py"), str(src), str(dst),
                          "--class-names", str(names)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "ResNet-50" in run.stdout and "4 classes" in run.stdout

    ckpt = torch.load(dst, map_location="cpu", weights_only=True)
    assert ckpt["class_names"] == ["cat", "dog", "bird", "fish"]
    assert ckpt["iteration"] == 0
    cfg = config_from_dict(ckpt["config"])
    assert cfg.model.backbone.depth == 50 and cfg.model.roi_heads.num_classes == 4
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"], strict=True)

    tv = tv_model.state_dict()
    ours = model.state_dict()
    assert torch.equal(ours["backbone.layer3.5.conv2.weight"], tv["backbone.body.layer3.5.conv2.weight"])
    assert torch.equal(ours["backbone.bn1.running_var"], tv["backbone.body.bn1.running_var"])
    assert torch.equal(ours["fpn.output_convs.2.weight"], tv["backbone.fpn.layer_blocks.2.0.weight"])
    assert torch.equal(ours["rpn.head.conv.weight"], tv["rpn.head.conv.0.0.weight"])
    assert torch.equal(ours["roi_heads.box_predictor.cls_score.weight"], tv["roi_heads.box_predictor.cls_score.weight"])
    # Background slots dropped: torchvision's deltas 4.. and mask channels 1.. are the object classes.
    assert torch.equal(ours["roi_heads.box_predictor.bbox_pred.weight"], tv["roi_heads.box_predictor.bbox_pred.weight"][4:])
    assert torch.equal(ours["roi_heads.mask_head.predictor.bias"], tv["roi_heads.mask_predictor.mask_fcn_logits.bias"][1:])
    assert torch.equal(ours["roi_heads.mask_head.convs.0.weight"], tv["roi_heads.mask_head.0.0.weight"])


def test_state_nested_under_model_and_default_class_names(tv_model, tmp_path):
    src, dst = tmp_path / "tv.pth", tmp_path / "converted.pth"
    torch.save({"model": tv_model.state_dict(), "epoch": 3}, src)
    cfg = convert_torchvision_checkpoint(src, dst)
    assert cfg.model.roi_heads.num_classes == 4
    assert torch.load(dst, weights_only=True)["class_names"] == ["class_1", "class_2", "class_3", "class_4"]


def test_old_key_layout_is_what_torchvision_upgrades(tv_model):
    old = old_layout(tv_model.state_dict())
    torch.manual_seed(1)
    fresh = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                               num_classes=TV_NUM_CLASSES)
    fresh.load_state_dict(old, strict=True)  # no version metadata: torchvision renames the old keys
    assert torch.equal(fresh.roi_heads.mask_head[0][0].weight, tv_model.roi_heads.mask_head[0][0].weight)


def test_old_key_layout_converts_like_the_new_one(tv_model):
    new = convert_torchvision_state_dict(tv_model.state_dict())
    old = convert_torchvision_state_dict(old_layout(tv_model.state_dict()))
    assert sorted(old) == sorted(new)
    for key in new:
        assert torch.equal(old[key], new[key]), key


def test_resnet18_depth_is_detected_and_loads():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    tv = torchvision.models.detection.MaskRCNN(backbone, num_classes=3)
    state = tv.state_dict()
    cfg = config_for_torchvision_state(state)
    assert cfg.model.backbone.depth == 18 and cfg.model.roi_heads.num_classes == 2
    cfg.model.backbone.fpn_channels = backbone.out_channels
    build_model(cfg.model).load_state_dict(convert_torchvision_state_dict(state), strict=True)


def test_unexpected_key_is_named(tv_model):
    state = dict(tv_model.state_dict())
    state["roi_heads.keypoint_head.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"roi_heads\.keypoint_head\.0\.weight"):
        convert_torchvision_state_dict(state)


def test_v2_state_dict_is_rejected():
    torch.manual_seed(0)
    v2 = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    with pytest.raises(ValueError, match="v2"):
        convert_torchvision_state_dict(v2.state_dict())


def test_missing_source_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        convert_torchvision_checkpoint(tmp_path / "absent.pth", tmp_path / "out.pth")


def test_class_name_count_must_match(tv_file, tmp_path):
    with pytest.raises(ValueError, match="class"):
        convert_torchvision_checkpoint(tv_file, tmp_path / "out.pth", class_names=["a", "b"])
    assert not (tmp_path / "out.pth").exists()


def test_failed_conversion_leaves_the_destination_and_no_stray_file(tv_file, tmp_path, monkeypatch):
    dst = tmp_path / "out" / "converted.pth"
    convert_torchvision_checkpoint(tv_file, dst)
    before = dst.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert_torchvision_checkpoint(tv_file, dst)
    assert dst.read_bytes() == before
    assert [p.name for p in dst.parent.iterdir()] == ["converted.pth"]
