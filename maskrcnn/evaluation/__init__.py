"""COCO evaluation (:mod:`maskrcnn.evaluation.coco_evaluator`) and COCO RLE mask encoding
(:mod:`maskrcnn.evaluation.rle`)."""
