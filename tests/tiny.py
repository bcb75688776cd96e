"""The small random-weight Mask R-CNN that tests build: ResNet-18 with narrow heads, 64-96 px inputs."""

from maskrcnn.config import Config


def tiny_config() -> Config:
    """A configuration whose model runs a forward pass in well under a second on a CPU."""
    cfg = Config()
    m = cfg.model
    m.backbone.depth = 18
    m.backbone.fpn_channels = 32
    m.input.min_size = [64]
    m.input.max_size = 96
    m.roi_heads.num_classes = 3
    m.roi_heads.box_head_dim = 64
    m.roi_heads.mask_head_dim = 16
    m.roi_heads.mask_head_convs = 1
    m.roi_heads.batch_size_per_image = 16
    m.rpn.batch_size_per_image = 32
    m.rpn.pre_nms_topk_train = m.rpn.pre_nms_topk_test = 200
    m.rpn.post_nms_topk_train = m.rpn.post_nms_topk_test = 100
    m.roi_heads.detections_per_img = 20
    return cfg


def save_tiny_checkpoint(path, class_names) -> None:
    """Write a checkpoint of the tiny model with random weights (seed 0) for ``class_names`` (labels 1..3)."""
    import torch

    from maskrcnn.config import config_to_dict
    from maskrcnn.modeling.maskrcnn import build_model

    torch.manual_seed(0)
    torch.save({"model": build_model(tiny_config().model).state_dict(), "config": config_to_dict(tiny_config()),
                "class_names": list(class_names), "iteration": 0}, path)
