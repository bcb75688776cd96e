"""One owner per setting: a score threshold's default is written in maskrcnn/config.py only. Tools and the
predictors default to None ("the model's own") or name a constant of maskrcnn.config."""

import ast
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from tiny import tiny_config
import maskrcnn.config
from maskrcnn.deploy.runtime import ExportedPredictor
from maskrcnn.predictor import Predictor
from maskrcnn.visualize import draw_instances

TOOLS = sorted((Path(__file__).parents[1] / "tools").glob("*.py"))


def _threshold_defaults(path: Path):
    """(option, default expression) of every ``add_argument`` of ``path`` whose option names a threshold."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and any(isinstance(a, ast.Constant) and "thresh" in str(a.value) for a in node.args)):
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            yield node.args[0].value, default


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", TOOLS, ids=[p.stem for p in TOOLS])
def test_tool_threshold_defaults_are_none_or_the_configs(path):
    for option, default in _threshold_defaults(path):
        if default is None or (isinstance(default, ast.Constant) and default.value is None):
            continue
        assert isinstance(default, ast.Name), (f"{path.name} {option}: default {ast.unparse(default)} is written in "
                                               "the tool; pass None (the model's own) or name a maskrcnn.config setting")
        value = getattr(_module(path), default.id)
        assert getattr(maskrcnn.config, default.id, object()) is value, \
            f"{path.name} {option}: default {default.id} is not a maskrcnn.config setting"


def test_the_tools_have_threshold_options():
    """The check above sees the options it is about."""
    options = {path.stem: [option for option, _ in _threshold_defaults(path)] for path in TOOLS}
    for tool in ("infer", "serve", "export", "explain"):
        assert options[tool] == ["--score-thresh"], tool


@pytest.mark.parametrize("function, name", [(Predictor.__init__, "score_thresh"),
                                            (ExportedPredictor.__init__, "score_thresh")])
def test_predictors_default_to_the_models_own_threshold(function, name):
    assert inspect.signature(function).parameters[name].default is None


def test_drawing_defaults_to_the_configs_display_threshold():
    assert inspect.signature(draw_instances).parameters["score_thresh"].default is maskrcnn.config.DISPLAY_SCORE_THRESH


def test_predictor_keeps_the_configured_threshold_by_default(tmp_path):
    cfg = tiny_config()
    cfg.model.roi_heads.score_thresh = 0.2
    assert Predictor(cfg, None).model.roi_heads.score_thresh == 0.2
    assert Predictor(cfg, None, score_thresh=0.3).model.roi_heads.score_thresh == 0.3
    path = tmp_path / "model.pth"
    torch.save({"model": Predictor(cfg, None).model.state_dict(), "config": maskrcnn.config.config_to_dict(cfg)}, path)
    assert Predictor.from_checkpoint(path).model.roi_heads.score_thresh == 0.2
