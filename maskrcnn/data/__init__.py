"""Data pipeline: COCO-format dataset, augmentation, samplers and the training loader."""

from maskrcnn.data.coco import AnnotationError, CocoDetection
from maskrcnn.data.loader import build_test_dataset, build_train_dataset, build_train_loader, collate
from maskrcnn.data.samplers import GroupedBatchSampler, TrainingSampler, aspect_ratio_group_ids
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.data.transforms import Compose, RandomHorizontalFlip, ResizeShortestEdge, build_transforms

__all__ = [
    "AnnotationError", "CocoDetection", "Compose", "GroupedBatchSampler", "RandomHorizontalFlip",
    "ResizeShortestEdge", "TrainingSampler", "build_test_dataset", "build_train_dataset", "build_train_loader",
    "build_transforms", "collate", "generate_shapes", "aspect_ratio_group_ids",
]
