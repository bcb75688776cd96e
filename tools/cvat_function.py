"""A checkpoint as a CVAT auto-annotation function, for ``cvat-cli task auto-annotate``:

    cvat-cli --server-host http://localhost:8080 --auth user:pass task auto-annotate 12 \\
        --function-file tools/cvat_function.py -p checkpoint=str:output/demo/model_final.pth

Parameters (``-p NAME=TYPE:VALUE``): ``checkpoint`` (str; default: the environment variable
MASKRCNN_CHECKPOINT), ``device`` (str, default cpu), ``score_thresh`` (float; default: the checkpoint's own
threshold, below which ``--conf-threshold`` cannot reach), ``simplify`` (float, polygon simplification in
pixels). cvat-cli's ``--conf-threshold``, ``--conv-mask-to-poly`` and ``--allow-unmatched-labels`` apply.
The task's labels are matched to the model's classes by name; see ``maskrcnn.deploy.cvat_function`` and
docs/annotation-tools.md.
"""

import os

from maskrcnn.deploy.cvat_function import CvatFunction
from maskrcnn.errors import InputError
from maskrcnn.predictor import Predictor

CHECKPOINT_VARIABLE = "MASKRCNN_CHECKPOINT"


def create(checkpoint: str = None, device: str = "cpu", score_thresh: float = None,
           simplify: float = None) -> CvatFunction:
    """The function of ``checkpoint`` (or of the file ``$MASKRCNN_CHECKPOINT`` names)."""
    checkpoint = checkpoint or os.environ.get(CHECKPOINT_VARIABLE)
    if not checkpoint:
        raise InputError(f"no checkpoint: pass -p checkpoint=str:PATH or set {CHECKPOINT_VARIABLE}")
    predictor = Predictor.from_checkpoint(checkpoint, device=device, score_thresh=score_thresh, mask_format="rle")
    return CvatFunction(predictor, predictor.class_names, tolerance=simplify)
