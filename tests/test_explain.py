import json
import runpy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from maskrcnn.cli import run
from maskrcnn.config import config_to_dict
from maskrcnn.data import CocoDetection, ResizeShortestEdge, generate_shapes
from maskrcnn.engine.logger import MetricsLogger
from maskrcnn.diagnostics.figures import FIGURES, PAGE, _draw_paste, explain_checkpoint
from maskrcnn.diagnostics.refinement import explain_refinement
from maskrcnn.diagnostics.trace import explain, load_example, locate_image, read_eval_metrics, read_training_log
from maskrcnn.modeling.mask_head import logits_of_class, mask_loss, mask_targets
from maskrcnn.modeling.maskrcnn import build_model
from maskrcnn.modeling.paste import paste_masks_in_image
from maskrcnn.predictor import Predictor

from tiny import tiny_config

CLASS_NAMES = ["square", "circle", "triangle"]
TOOL = Path(__file__).parents[1] / "tools" / "explain.py"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    generate_shapes(root / "shapes", num_train=3, num_val=2, min_size=64, max_size=96)
    torch.manual_seed(0)
    cfg = tiny_config()
    torch.save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg),
                "class_names": CLASS_NAMES, "iteration": 0}, root / "model.pth")
    logger = MetricsLogger(root / "train")
    for iteration, loss in [(10, 2.5), (20, 1.8), (30, 1.4)]:
        logger.log({"iteration": iteration, "total_loss": loss, "loss_mask": loss / 4, "lr": 0.01})
    logger.log({"iteration": 30, "bbox": {"AP": 0.2, "AP50": 0.4, "AP75": 0.1},
                "segm": {"AP": 0.15, "AP50": 0.35, "AP75": 0.05}})
    logger.close()
    return root


@pytest.fixture(scope="module")
def predictor(workdir):
    return Predictor.from_checkpoint(workdir / "model.pth", score_thresh=None)


@pytest.fixture(scope="module")
def train_set(workdir):
    return CocoDetection(workdir / "shapes" / "annotations" / "instances_train.json", workdir / "shapes" / "train")


@pytest.fixture(scope="module")
def result(predictor, train_set, workdir):
    image, target = load_example(train_set)
    before = {k: v.clone() for k, v in predictor.model.state_dict().items()}
    heldout = load_example(CocoDetection(workdir / "shapes" / "annotations" / "instances_val.json",
                                         workdir / "shapes" / "val"), min_instances=1)
    out = explain(predictor.model, image, target, class_names=CLASS_NAMES, heldout=heldout,
                  log_records=read_training_log(workdir / "train" / "metrics.jsonl"))
    out["state_unchanged"] = all(torch.equal(before[k], v) for k, v in predictor.model.state_dict().items())
    return out


@pytest.fixture(scope="module")
def tool_output(workdir):
    out = workdir / "figures"
    runpy.run_path(str(TOOL))["main"](["--checkpoint", str(workdir / "model.pth"), "--shapes", "--shapes-dir",
                                       str(workdir / "shapes"), "--output", str(out),
                                       "--log", str(workdir / "train" / "metrics.jsonl")])
    return out


def training_target(train_set, image_id):
    """The training target of an image, resized here as the data pipeline resizes it."""
    image, target = train_set[train_set.image_ids.index(image_id)]
    pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return ResizeShortestEdge([64], 96)(pixels, target, np.random.default_rng(0))[1]


def test_tool_writes_every_figure_and_the_page(tool_output, result):
    for name in FIGURES:
        picture = cv2.imread(str(tool_output / name))
        assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 100, name
    page = (tool_output / PAGE).read_text()
    for name in FIGURES:
        assert f"]({name})" in page
    counts = result["counts"]
    assert counts["positive_rois"] > 0
    assert f"{counts['positive_rois']} RoIs x 784 cells = {counts['mask_cells']}" in page
    height, width = result["input"]["size"]
    assert counts["dense_cells"] == height * width * 3


def test_per_roi_losses_average_to_the_mask_loss(result):
    rois = result["mask_rois"]
    weighted = sum(r["loss"] * r["cells"] for r in rois) / sum(r["cells"] for r in rois)
    targets = torch.stack([r["target"] for r in rois])
    expected = mask_loss(logits_of_class(result["mask_logits"], result["mask_classes"]), targets)
    assert weighted == pytest.approx(float(expected), rel=1e-6)
    assert result["mask_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert result["losses"]["loss_mask"] == pytest.approx(float(expected), rel=1e-6)  # the model's own number


def test_roi_loss_equals_binary_cross_entropy_on_its_class_channel(result):
    index = result["shown_rois"][0]
    roi = result["mask_rois"][index]
    logits = result["mask_logits"][index, roi["label"] - 1]
    assert torch.equal(roi["logits"], logits)
    assert roi["loss"] == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, roi["target"])), rel=1e-6)
    assert torch.allclose(roi["probs"], torch.sigmoid(logits))


def test_shown_targets_are_mask_targets_of_the_matched_instance(result, train_set):
    target = training_target(train_set, result["image_id"])
    boxes = torch.stack([r["box"] for r in result["mask_rois"]])
    matched = box_iou(boxes, target["boxes"]).argmax(dim=1)
    assert matched.tolist() == [r["instance"] for r in result["mask_rois"]]
    assert [r["label"] for r in result["mask_rois"]] == target["labels"][matched].tolist()
    expected = mask_targets([target["masks"]], [boxes], [matched], 28)
    assert torch.equal(torch.stack([r["target"] for r in result["mask_rois"]]), expected)


def test_mask_loss_gradient_stays_under_the_rois_of_each_level(result):
    rois = result["mask_rois"]
    assert sum(len(level["rois"]) for level in result["gradients"]) == len(rois)
    for level in result["gradients"]:
        magnitude = level["magnitude"]
        if not level["rois"]:
            assert not magnitude.any(), level["name"]
            continue
        assert magnitude.max() > 0, level["name"]
        footprint = np.zeros_like(magnitude, dtype=bool)
        for i in level["rois"]:
            x0, y0, x1, y1 = (rois[i]["box"] / level["stride"]).tolist()
            footprint[max(int(y0) - 1, 0):int(np.ceil(y1)) + 2, max(int(x0) - 1, 0):int(np.ceil(x1)) + 2] = True
        assert not magnitude[~footprint].any(), level["name"]


def test_pasted_masks_are_the_recorded_probabilities_pasted(result):
    inference = result["inference"]
    instances = inference["instances"]
    assert len(instances) > 0
    pasted = paste_masks_in_image(inference["mask_probs"], instances.boxes, instances.image_size)
    assert torch.equal(pasted, instances.masks)


def test_paste_figure_shows_the_models_own_paste(result):
    """The paste figure is drawn by paste.py: each row's probabilities placed in the image are those the
    paste thresholds (above the model's mask threshold exactly where the detection's mask is), and the last
    panel shows that mask."""
    inference, threshold = result["inference"], result["mask_threshold"]
    instances = inference["instances"]
    rows = min(3, len(instances))
    pasted = paste_masks_in_image(inference["mask_probs"][:rows], instances.boxes[:rows], instances.image_size,
                                  threshold=threshold)
    axes = np.array(_draw_paste(result).axes).reshape(rows, 4)
    for row in range(rows):
        placed = np.asarray(axes[row, 2].images[0].get_array())
        assert placed.shape == instances.image_size
        assert np.array_equal(placed > threshold, pasted[row].numpy()), row
        drawn = ~np.ma.getmaskarray(axes[row, 3].images[1].get_array())
        assert np.array_equal(drawn, instances.masks[row].numpy()), row


def test_anchor_label_counts_cover_every_anchor(result):
    anchors = result["anchors"]
    assert anchors["positive"] + anchors["negative"] + anchors["ignored"] == anchors["total"]
    assert anchors["positive"] == sum(level["positive"] for level in anchors["levels"])
    assert anchors["positive"] == len(anchors["positive_anchors"])
    assert anchors["total"] == result["proposals"]["anchors"]
    location = anchors["location"]
    centres = (location["anchors"][:, :2] + location["anchors"][:, 2:]) / 2
    assert torch.allclose(centres, centres[:1].expand_as(centres))  # one location, every aspect ratio


def test_explain_leaves_the_model_unchanged(result, predictor):
    assert result["state_unchanged"]
    assert not predictor.model.training


def test_unknown_image_id_names_the_annotation_file(train_set):
    with pytest.raises(ValueError, match="image id 999 .*instances_train.json"):
        load_example(train_set, 999)


def test_locate_image_checks_the_file_name(workdir):
    ann = workdir / "shapes" / "annotations" / "instances_train.json"
    image_id, folder = locate_image(ann, workdir / "shapes" / "train" / "000002.jpg")
    assert (image_id, folder) == (2, workdir / "shapes" / "train")
    with pytest.raises(ValueError, match="image id 1 is the file '000001.jpg', not '000002.jpg'"):
        locate_image(ann, workdir / "shapes" / "train" / "000002.jpg", image_id=1)


def test_bad_log_line_and_metrics_name_the_file(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iteration": 1, "total_loss": 1.0}\n{"iteration": 2,\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not JSON"):
        read_training_log(log)
    summary = tmp_path / "metrics.json"
    summary.write_text(json.dumps({"iteration": 10, "eval": None}))
    assert read_eval_metrics(summary) is None
    summary.write_text(json.dumps({"iteration": 10}))
    with pytest.raises(ValueError, match="metrics.json: expected evaluation metrics"):
        read_eval_metrics(summary)


def test_training_view_uses_the_training_size_when_inference_runs_larger(workdir, tmp_path):
    """A checkpoint that infers at another size (model.input.min_size_test) is explained at the size training
    resized its images to, as training saw them."""
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.model.input.min_size_test, cfg.model.input.max_size_test = 80, 120
    torch.save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg),
                "class_names": CLASS_NAMES, "iteration": 0}, tmp_path / "model.pth")
    shapes = workdir / "shapes"
    result = explain_checkpoint(tmp_path / "model.pth", ann_file=shapes / "annotations" / "instances_train.json",
                                image_dir=shapes / "train", output_dir=tmp_path / "figures")
    height, width = result["original_size"]
    scale = min(64 / min(height, width), 96 / max(height, width))
    assert result["input"]["size"] == (int(height * scale), int(width * scale))  # the data pipeline floors
    assert min(result["input"]["size"]) < 80


# The refinement figure: a model with a point head (model.roi_heads.mask_refine).


@pytest.fixture(scope="module")
def refined_checkpoint(tmp_path_factory):
    """A tiny refined model in fp32 at inference size 128 (boxes long enough for both subdivision steps), its point
    head's logits spread out as a trained one's, saved as a checkpoint; and the plain model of the same weights."""
    cfg = tiny_config()
    cfg.model.precision = "fp32"
    cfg.model.input.min_size_test, cfg.model.input.max_size_test = 128, 192
    cfg.model.roi_heads.mask_refine, cfg.model.roi_heads.point_head_dim = True, 16
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.roi_heads.point_head.predictor.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("refined") / "model.pth"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "class_names": CLASS_NAMES,
                "iteration": 0}, path)
    cfg.model.roi_heads.mask_refine = False
    plain = build_model(cfg.model)
    plain.load_state_dict(model.state_dict(), strict=False)
    return path, plain.eval()


def test_refinement_view_shows_the_models_own_masks_and_points(refined_checkpoint, workdir, tmp_path):
    """The refined mask is the refined model's, the 28x28 one the plain model's of the same weights, for the same
    detection; each step recomputed its points inside the detection's box; the tool writes the figure."""
    path, plain = refined_checkpoint
    shapes = workdir / "shapes"
    view = explain_refinement(path, ann_file=shapes / "annotations" / "instances_val.json", image_dir=shapes / "val",
                              output_dir=tmp_path, score_thresh=0.0)
    refined_model = Predictor.from_checkpoint(path, score_thresh=None).model
    image, _ = load_example(CocoDetection(shapes / "annotations" / "instances_val.json", shapes / "val"),
                            view["image_id"])
    with torch.no_grad():
        refined, coarse = refined_model([image])[0], plain([image])[0]
    d = view["detection"]
    torch.testing.assert_close(refined["boxes"][d], view["box"], rtol=0, atol=1e-4)
    torch.testing.assert_close(coarse["boxes"], refined["boxes"], rtol=0, atol=0)
    assert (view["refined"]["mask"] == refined["masks"][d].numpy()).all()
    assert (view["coarse"]["mask"] == coarse["masks"][d].numpy()).all()
    assert (view["coarse"]["mask"] != view["refined"]["mask"]).any()
    assert [step["side"] for step in view["steps"]] == [56, 112]
    x0, y0, x1, y1 = view["box"].tolist()
    for step in view["steps"]:
        points = step["points"]
        assert points.shape == (784, 2)
        assert (points[:, 0] > x0).all() and (points[:, 0] < x1).all()
        assert (points[:, 1] > y0).all() and (points[:, 1] < y1).all()
    assert view["refined"]["wrong"] == int((view["refined"]["mask"] != view["gt_mask"]).sum())
    picture = cv2.imread(str(view["file"]))
    assert picture is not None and picture.shape[1] > 1000


def test_refinement_tool_on_a_model_without_a_point_head_says_so_in_one_line(workdir, capsys):
    tool = runpy.run_path(str(TOOL))
    with pytest.raises(SystemExit) as stop:
        run(tool["main"], ["--refinement", "--checkpoint", str(workdir / "model.pth"), "--shapes", "--shapes-dir",
                           str(workdir / "shapes"), "--output", str(workdir / "refinement")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: the model has no point head (model.roi_heads.mask_refine is "
                                               "off): nothing is refined")
