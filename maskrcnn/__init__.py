"""maskrcnn: Mask R-CNN instance segmentation on PyTorch.

``from maskrcnn import Predictor`` gives the inference API; the stages of the model live in
``maskrcnn.modeling``, the data pipeline in ``maskrcnn.data``, training in ``maskrcnn.engine`` and COCO
evaluation in ``maskrcnn.evaluation``.
"""

__version__ = "0.1.0"

__all__ = ["Predictor", "Instances", "load_config", "build_model"]


def __getattr__(name):
    # Lazy exports: ``import maskrcnn`` stays cheap; torch and the model load on first use.
    if name in ("Predictor", "Instances"):
        from . import predictor

        return getattr(predictor, name)
    if name == "load_config":
        from .config import load_config

        return load_config
    if name == "build_model":
        from .modeling.maskrcnn import build_model

        return build_model
    raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")
