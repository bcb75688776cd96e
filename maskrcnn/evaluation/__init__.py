"""COCO evaluation (:mod:`maskrcnn.evaluation.coco_evaluator`)."""
