"""COCO evaluation (:mod:`~maskrcnn.evaluation.coco_evaluator`) and RLE mask encoding (:mod:`~maskrcnn.evaluation.rle`)."""
