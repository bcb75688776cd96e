"""configs/maskrcnn_R18_FPN_small_few_images.yaml: the demo configuration with the options the few-images
benchmark chose, and nothing else changed."""

from pathlib import Path

from maskrcnn.config import config_to_dict, load_config

ROOT = Path(__file__).resolve().parent.parent
FEW_IMAGES = ROOT / "configs" / "maskrcnn_R18_FPN_small_few_images.yaml"
DEMO = ROOT / "configs" / "maskrcnn_R18_FPN_small.yaml"


def _leaves(tree: dict, prefix: str = "") -> dict:
    """``{"model.backbone.depth": 18, ...}`` of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_few_images_config_loads_with_copy_paste_on_and_the_measured_length():
    cfg = load_config(FEW_IMAGES)
    assert cfg.data.copy_paste is True
    assert cfg.solver.max_iter == 300
    # Measured and left off: large-scale jitter, repeat-factor sampling, the weight average.
    assert cfg.data.scale_jitter == [] and cfg.data.repeat_factor_threshold == 0.0 and cfg.solver.ema_decay == 0.0


def test_the_few_images_config_differs_from_the_demo_only_in_its_own_keys():
    few, demo = _leaves(config_to_dict(load_config(FEW_IMAGES))), _leaves(config_to_dict(load_config(DEMO)))
    changed = {key for key in demo if few[key] != demo[key]}
    assert changed == {"data.copy_paste", "solver.max_iter", "train.output_dir", "train.checkpoint_period"}
