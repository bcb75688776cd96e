"""Starting from weights with other classes: shared tensors copied exactly, class rows copied by name (with
torchvision's background slot accounted for), other rows as freshly initialised, bad keys named."""

import json
from pathlib import Path

import pytest
import torch
import torchvision

from maskrcnn.config import Config, load_config
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.engine.checkpoint import save_checkpoint
from maskrcnn.engine.trainer import WEIGHTS_SUMMARY, train
from maskrcnn.engine.weights import CLASS_SPECIFIC, load_weights
from maskrcnn.modeling.maskrcnn import build_model
from test_trainer import tiny_config as tiny_train_config
from tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CLS, BOX, MASK = ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
                  "roi_heads.mask_head.predictor")


def _model(num_classes, seed, cfg=None):
    cfg = cfg or tiny_config()
    cfg.model.roi_heads.num_classes = num_classes
    torch.manual_seed(seed)
    return build_model(cfg.model), cfg


@pytest.fixture
def source_checkpoint(tmp_path):
    model, cfg = _model(3, seed=0)
    path = save_checkpoint(tmp_path / "src" / "model_final.pth", model=model, iteration=50, config=cfg,
                           class_names=["cat", "dog", "bird"])
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_shared_tensors_exact_matched_rows_copied_other_rows_fresh(source_checkpoint):
    path, source = source_checkpoint
    model, _ = _model(2, seed=1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    summary = load_weights(model, path, [" Dog", "cow"])
    state = model.state_dict()
    for key in state:
        if key not in CLASS_SPECIFIC:
            assert torch.equal(state[key], source[key]), key
    for suffix in ("weight", "bias"):
        cls, box, mask = (state[f"{p}.{suffix}"] for p in (CLS, BOX, MASK))
        src_cls, src_box, src_mask = (source[f"{p}.{suffix}"] for p in (CLS, BOX, MASK))
        new_cls, new_box, new_mask = (fresh[f"{p}.{suffix}"] for p in (CLS, BOX, MASK))
        assert cls.shape[0] == 3 and box.shape[0] == 8 and mask.shape[0] == 2
        assert torch.equal(cls[0], src_cls[0])  # background
        assert torch.equal(cls[1], src_cls[2])  # Dog <- dog (label 2 of the source)
        assert torch.equal(box[0:4], src_box[4:8])
        assert torch.equal(mask[0], src_mask[1])
        assert torch.equal(cls[2], new_cls[2]) and torch.equal(box[4:8], new_box[4:8])  # cow: as built
        assert torch.equal(mask[1], new_mask[1])
    assert not torch.equal(state[f"{CLS}.weight"][2], source[f"{CLS}.weight"][2])
    assert summary["classes_copied"] == {" Dog": "dog"} and summary["classes_fresh"] == ["cow"]
    rebuilt = [key for key in CLASS_SPECIFIC if key in state]
    assert summary["tensors_loaded"] == len(state) - len(rebuilt)
    assert summary["kind"] == "maskrcnn checkpoint" and sorted(summary["layers_rebuilt"]) == sorted(rebuilt)


@pytest.mark.parametrize("classes", [["cat", "dog", "bird"], ["dog", "cow"]])
def test_plain_and_refined_models_start_from_each_others_weights(source_checkpoint, tmp_path, classes):
    """A model with the point head (model.roi_heads.mask_refine) takes a plain checkpoint's tensors and keeps its
    point head as built; a plain model takes a refined checkpoint's and leaves its point head aside."""
    path, source = source_checkpoint
    cfg = tiny_config()
    cfg.model.roi_heads.mask_refine = True
    refined, _ = _model(len(classes), seed=1, cfg=cfg)
    built = {k: v.clone() for k, v in refined.state_dict().items()}
    load_weights(refined, path, classes)
    state = refined.state_dict()
    head = [key for key in state if key.startswith("roi_heads.point_head.")]
    assert head and all(torch.equal(state[key], built[key]) for key in head)
    assert all(torch.equal(state[key], source[key]) for key in state
               if key not in head and (key not in CLASS_SPECIFIC or len(classes) == 3))
    refined_path = save_checkpoint(tmp_path / "refined" / "model_final.pth", model=refined, iteration=1,
                                   config=cfg, class_names=classes)
    plain, _ = _model(len(classes), seed=2)
    load_weights(plain, refined_path, classes)
    assert all(torch.equal(value, state[key]) for key, value in plain.state_dict().items())


def test_same_classes_load_everything_exactly(source_checkpoint):
    path, source = source_checkpoint
    model, _ = _model(3, seed=1)
    summary = load_weights(model, path, ["Cat", "dog", "bird"])
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert summary["layers_rebuilt"] == [] and summary["tensors_loaded"] == len(source)


@pytest.fixture(scope="module")
def torchvision_coco_like(tmp_path_factory):
    """A seeded torchvision ResNet-50 Mask R-CNN with COCO's 91 slots (background + 90), saved bare."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path_factory.mktemp("tv") / "tv.pth"
    torch.save(tv.state_dict(), path)
    return path, tv.state_dict()


@pytest.mark.parametrize("wrapped", [False, True])
def test_torchvision_state_dict_is_converted_and_rows_skip_its_background_slot(torchvision_coco_like, tmp_path,
                                                                                 wrapped):
    path, tv = torchvision_coco_like
    if wrapped:
        path = tmp_path / "wrapped.pth"
        torch.save({"model": tv, "epoch": 3}, path)
    model, _ = _model(3, seed=1, cfg=Config())
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    summary = load_weights(model, path, ["Person", "zebra crossing", "dog"])
    state = model.state_dict()
    for ours, theirs in [("backbone.conv1.weight", "backbone.body.conv1.weight"),
                         ("backbone.layer4.2.conv3.weight", "backbone.body.layer4.2.conv3.weight"),
                         ("fpn.lateral_convs.0.weight", "backbone.fpn.inner_blocks.0.0.weight"),
                         ("rpn.head.objectness_logits.weight", "rpn.head.cls_logits.weight"),
                         ("roi_heads.box_head.fc2.weight", "roi_heads.box_head.fc7.weight"),
                         ("roi_heads.mask_head.deconv.weight", "roi_heads.mask_predictor.conv5_mask.weight")]:
        assert torch.equal(state[ours], tv[theirs]), ours
    person, dog = 1, 18  # torchvision's COCO labels
    for suffix in ("weight", "bias"):
        tv_cls, tv_box = (tv[f"roi_heads.box_predictor.{n}.{suffix}"] for n in ("cls_score", "bbox_pred"))
        tv_mask = tv[f"roi_heads.mask_predictor.mask_fcn_logits.{suffix}"]
        cls, box, mask = (state[f"{p}.{suffix}"] for p in (CLS, BOX, MASK))
        assert torch.equal(cls[[0, 1, 3]], tv_cls[[0, person, dog]])
        assert torch.equal(box[0:4], tv_box[4 * person:4 * person + 4])  # torchvision: 4 background deltas first
        assert torch.equal(box[8:12], tv_box[4 * dog:4 * dog + 4])
        assert torch.equal(mask[[0, 2]], tv_mask[[person, dog]])  # torchvision: background mask channel first
        assert torch.equal(cls[2], fresh[f"{CLS}.{suffix}"][2]) and torch.equal(box[4:8], fresh[f"{BOX}.{suffix}"][4:8])
        assert torch.equal(mask[1], fresh[f"{MASK}.{suffix}"][1])
    assert summary["kind"] == "torchvision state dict"
    assert summary["classes_copied"] == {"Person": "person", "dog": "dog"}
    assert summary["classes_fresh"] == ["zebra crossing"]


def test_torchvision_v2_state_dict_loads_into_the_v2_configuration(tmp_path):
    """torchvision's v2 weights start a run of the v2 configuration (every shared tensor, batch-norm
    statistics included, copied exactly); the v1 configuration refuses them, pointing at the v2 file."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "tv_v2.pth"
    torch.save(tv.state_dict(), path)
    tv = tv.state_dict()
    cfg = load_config(ROOT / "configs" / "maskrcnn_R50_FPN_v2.yaml", ["model.backbone.pretrained=false"])
    model, _ = _model(2, seed=1, cfg=cfg)
    summary = load_weights(model, path, ["person", "dog"])
    state = model.state_dict()
    for ours, theirs in [("fpn.lateral_norms.1.running_var", "backbone.fpn.inner_blocks.1.1.running_var"),
                         ("rpn.head.extra_convs.0.weight", "rpn.head.conv.1.0.weight"),
                         ("roi_heads.box_head.norms.2.running_mean", "roi_heads.box_head.2.1.running_mean"),
                         ("roi_heads.box_head.fc1.weight", "roi_heads.box_head.5.weight"),
                         ("roi_heads.mask_head.norms.3.weight", "roi_heads.mask_head.3.1.weight")]:
        assert torch.equal(state[ours], tv[theirs]), ours
    assert summary["classes_copied"] == {"person": "person", "dog": "dog"}
    v1, _ = _model(2, seed=1, cfg=Config())
    with pytest.raises(ValueError, match=r"maskrcnn_R50_FPN_v2\.yaml.*unexpected \(\d+\): fpn.lateral_norms"):
        load_weights(v1, path, ["person", "dog"])


def test_bad_keys_outside_class_layers_are_named(source_checkpoint, tmp_path):
    path, source = source_checkpoint
    broken = dict(source)
    del broken["fpn.output_convs.2.weight"]
    broken["extra.layer.weight"] = torch.zeros(1)
    bad = tmp_path / "broken.pth"
    torch.save({"model": broken, "class_names": ["cat", "dog", "bird"]}, bad)
    model, _ = _model(3, seed=1)
    with pytest.raises(ValueError, match=r"missing \(1\): fpn.output_convs.2.weight; "
                                         r"unexpected \(1\): extra.layer.weight"):
        load_weights(model, bad, ["cat", "dog", "bird"])
    cfg = tiny_config()
    cfg.model.roi_heads.box_head_dim = 32
    wider, _ = _model(3, seed=1, cfg=cfg)
    with pytest.raises(ValueError, match=r"mis-shaped \(\d+\): roi_heads.box_head.fc1.weight \(64, 1568\) "
                                         r"\(model \(32, 1568\)\)"):
        load_weights(wider, path, ["cat", "dog", "bird"])


def test_training_starts_from_weights_and_resume_wins(tmp_path):
    data = tmp_path / "shapes"
    generate_shapes(data, num_train=4, num_val=1, seed=0, min_size=64, max_size=96)
    cfg = tiny_train_config(data, tmp_path / "src", "solver.max_iter=2")
    source_model, _ = _model(3, seed=0, cfg=cfg)
    source = save_checkpoint(tmp_path / "src.pth", model=source_model, iteration=7, config=cfg,
                             class_names=["Circle", "hexagon", "square"])
    out = tmp_path / "run"
    run_cfg = tiny_train_config(data, out, "solver.max_iter=2", f"model.weights={source}", "train.precision=bf16")
    assert run_cfg.model.backbone.freeze_at == 2
    summary = train(run_cfg)
    assert summary["iteration"] == 2
    trained = torch.load(out / "model_final.pth", weights_only=True)["model"]
    loaded = source_model.state_dict()
    assert torch.equal(trained["backbone.conv1.weight"], loaded["backbone.conv1.weight"])  # frozen stem
    assert torch.equal(trained["backbone.layer1.0.conv1.weight"], loaded["backbone.layer1.0.conv1.weight"])
    assert not torch.equal(trained["rpn.head.conv.weight"], loaded["rpn.head.conv.weight"])  # trained
    written = json.loads((out / WEIGHTS_SUMMARY).read_text())
    assert written["classes_copied"] == {"square": "square", "circle": "Circle"}
    assert written["classes_fresh"] == ["triangle"]
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # With a checkpoint in the output folder, --resume continues from it; the weights file is not read.
    summary = train(tiny_train_config(data, out, "solver.max_iter=3", f"model.weights={tmp_path / 'gone.pth'}"),
                    resume=True)
    assert summary["iteration"] == 3
