"""Configuration: defaults, YAML merge, command-line overrides, errors, and the reference in docs/configuration.md."""

from pathlib import Path

import pytest
import torch

from maskrcnn.config import (Config, config_from_dict, config_reference_markdown, config_to_dict, load_config,
                             readme_with_config_reference)

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_reproduce_torchvision_maskrcnn_resnet50_fpn():
    cfg = Config()
    assert cfg.model.backbone.depth == 50 and cfg.model.backbone.norm == "frozen_bn"
    assert cfg.model.anchors.sizes == [32, 64, 128, 256, 512]
    assert (cfg.model.rpn.pre_nms_topk_test, cfg.model.rpn.post_nms_topk_test) == (1000, 1000)
    assert cfg.model.roi_heads.bbox_reg_weights == [10.0, 10.0, 5.0, 5.0]
    assert (cfg.model.roi_heads.score_thresh, cfg.model.roi_heads.nms_thresh) == (0.05, 0.5)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  backbone:\n    depth: 18\nsolver:\n  lr: 0.5\n")
    cfg = load_config(path, ["solver.lr=0.1", "model.input.min_size=[64,96]"])
    assert cfg.model.backbone.depth == 18
    assert cfg.solver.lr == 0.1
    assert cfg.model.input.min_size == [64, 96]
    assert cfg.model.backbone.fpn_channels == 256  # untouched defaults stay


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="model.backbone.dept"):
        load_config(overrides=["model.backbone.dept=18"])
    path = tmp_path / "bad.yaml"
    path.write_text("solver:\n  lr_rate: 1\n")
    with pytest.raises(ValueError, match="lr_rate"):
        load_config(path)


def test_wrong_type_and_malformed_override_are_rejected():
    with pytest.raises(ValueError, match="solver.max_iter"):
        load_config(overrides=["solver.max_iter=many"])
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(overrides=["solver.lr"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_dict_round_trip_for_checkpoints():
    cfg = load_config(overrides=["model.roi_heads.num_classes=3", "train.precision=bf16"])
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_reference_lists_every_field_with_its_meaning():
    table = config_reference_markdown()
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == len(set(rows))
    assert all(not line.endswith("|  |") for line in rows), "a field has no comment in maskrcnn/config.py"
    assert "| `solver.lr` | `0.02` |" in table


def test_docs_reference_is_up_to_date():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert readme_with_config_reference(page) == page, "run python tools/config_reference.py"


@pytest.mark.parametrize("override, message", [
    ("model.input.min_size=[]", r"model.input.min_size must be a non-empty list of positive sizes, got \[\]"),
    ("model.input.max_size=0", "model.input.max_size must be positive, got 0"),
    ("model.input.min_size_test=0", "model.input.min_size_test must be positive, got 0"),
    ("model.input.pixel_std=[0.2,0.2]", r"model.input.pixel_std needs one value per RGB channel \(3\)"),
    ("solver.ims_per_batch=0", "solver.ims_per_batch must be positive"),
    ("data.aspect_ratio_groups=0", "data.aspect_ratio_groups must be positive, got 0"),
    ("model.backbone.width=0", "model.backbone.width must be positive, got 0"),
    ("model.backbone.width=32;model.backbone.pretrained=true",
     "model.backbone.pretrained loads ImageNet weights of width 64; model.backbone.width is 32"),
])
def test_unusable_values_are_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=override.split(";"))


def test_an_override_error_names_the_override_not_the_file():
    with pytest.raises(ValueError) as info:
        load_config("configs/maskrcnn_R18_FPN_small.yaml", ["train.outputdir=x"])
    assert str(info.value) == "bad override 'train.outputdir=x': unknown key 'train.outputdir'; did you mean train.output_dir?"


def test_inference_size_defaults_to_the_last_training_size_and_can_differ():
    """Training resizes to one of ``min_size``; inference to ``min_size_test`` (and ``max_size_test``) where
    set, else to the last of ``min_size`` capped by ``max_size``."""
    from maskrcnn.modeling.maskrcnn import build_model

    cfg = load_config(overrides=["model.backbone.depth=18", "model.input.min_size=[96,128]", "model.input.max_size=256"])
    assert (build_model(cfg.model).min_size, build_model(cfg.model).max_size) == (128, 256)
    cfg = load_config(overrides=["model.backbone.depth=18", "model.input.min_size=[128]", "model.input.max_size=256",
                                 "model.input.min_size_test=144", "model.input.max_size_test=288"])
    model = build_model(cfg.model)
    assert (model.min_size, model.max_size) == (144, 288)
    assert model.preprocess([torch.rand(3, 100, 150)], resize=True).tensor.shape[-2:] == (160, 224)
