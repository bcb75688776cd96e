"""A checkpoint's labels meet a dataset's categories by id where the names agree, by name where the ids mean
other things (COCO weights, ids 1..90, on a dataset numbered 1..K), and not at all, in one line naming both
sides, where neither fits."""

import json
import warnings

import pytest
import torch

from maskrcnn.cli import run
from maskrcnn.config import config_to_dict
from maskrcnn.convert import coco_category_names
from maskrcnn.errors import InputError
from maskrcnn.inference import match_categories
from maskrcnn.modeling.maskrcnn import build_model
from maskrcnn.predictor import Predictor
from test_cli import _error_line, eval_tool
from test_coco_dataset import _tiny_coco, _write
from tiny import tiny_config

COCO_IDS = {label: label for label in range(1, 91)}  # torchvision's COCO labels are the category ids


def _categories(*names):
    return [{"id": i, "name": name} for i, name in enumerate(names, start=1)]


def _coco_label(name):
    return coco_category_names().index(name) + 1


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
    """A tiny random model with torchvision's 90 COCO label slots, names and label -> category id map, whose
    box classifier favours 'cat' over every other class."""
    cfg = tiny_config()
    cfg.model.roi_heads.num_classes = 90
    torch.manual_seed(0)
    state = build_model(cfg.model).state_dict()
    state["roi_heads.box_predictor.cls_score.bias"][_coco_label("cat")] = 20.0  # column 0 is the background
    path = tmp_path_factory.mktemp("coco90") / "model.pth"
    torch.save({"model": state, "config": config_to_dict(cfg),
                "class_names": coco_category_names(), "iteration": 0, "label_to_cat_id": COCO_IDS}, path)
    return path


def test_coco_labels_on_a_dataset_numbered_1_to_3_match_by_name():
    with pytest.warns(UserWarning, match=r"ids name different things \(model \[1 person, 2 bicycle, 3 car\] \(3\), "
                                         r"dataset \[1 cat, 2 dog, 3 bird\] \(3\)\); matched by name"):
        mapping = match_categories(coco_category_names(), COCO_IDS, _categories("cat", "dog", "bird"))
    assert mapping == {_coco_label("cat"): 1, _coco_label("dog"): 2, _coco_label("bird"): 3}


def test_ids_whose_names_agree_match_by_id_without_a_warning():
    categories = [{"id": 17, "name": "Cat"}, {"id": 1, "name": "person"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert match_categories(coco_category_names(), COCO_IDS, categories) == {1: 1, 17: 17}


def test_names_the_model_lacks_stop_with_both_sides():
    with pytest.raises(InputError, match=r"agree by id but not by name, and the dataset's \[unicorn\] \(1\) are "
                                         r"not among the model's class names: model \[1 person, 2 bicycle, 3 car\] "
                                         r"\(3\), dataset \[1 cat, 2 dog, 3 unicorn\] \(3\)"):
        match_categories(coco_category_names(), COCO_IDS, _categories("cat", "dog", "unicorn"))


def test_coco_checkpoint_predicts_the_dataset_categories_by_name(coco_checkpoint):
    with pytest.warns(UserWarning, match="matched by name"):
        predictor = Predictor.from_checkpoint(coco_checkpoint, categories=_categories("cat", "dog", "bird"),
                                              score_thresh=0.0)
    assert predictor.label_to_cat_id == {_coco_label("cat"): 1, _coco_label("dog"): 2, _coco_label("bird"): 3}
    result = predictor(torch.rand(3, 64, 80))
    assert len(result) and set(result.labels.tolist()) == {_coco_label("cat")}
    assert {r["category_id"] for r in result.to_coco(1)} == {1}


def _named(data, *names):
    data["categories"] = _categories(*names)
    for ann, cat_id in zip(data["annotations"], [1, 2, 3, 3, 2]):
        ann["category_id"] = cat_id
    return data


def test_eval_of_a_coco_checkpoint_scores_the_dataset_categories(tmp_path, coco_checkpoint):
    ann_file, image_dir = _write(tmp_path, _named(_tiny_coco(), "cat", "dog", "bird"))
    with pytest.warns(UserWarning, match="matched by name"):
        run(eval_tool.main, ["--checkpoint", str(coco_checkpoint), "--ann", str(ann_file), "--images",
                             str(image_dir), "--output", str(tmp_path / "out"), "--num-workers", "0"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results and {r["category_id"] for r in results} == {1}  # the model sees cats, the dataset's id 1


def test_eval_with_a_category_the_checkpoint_lacks_is_one_line(tmp_path, capsys, coco_checkpoint):
    ann_file, image_dir = _write(tmp_path, _named(_tiny_coco(), "cat", "dog", "unicorn"))
    line = _error_line(capsys, eval_tool.main, ["--checkpoint", str(coco_checkpoint), "--ann", str(ann_file),
                                                "--images", str(image_dir), "--num-workers", "0"])
    assert "[unicorn]" in line and "model [1 person, 2 bicycle, 3 car]" in line and "dataset [1 cat, 2 dog" in line
