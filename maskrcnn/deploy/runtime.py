"""Run an exported ONNX file with onnxruntime or OpenVINO, behind the predictor's interface.

    predictor = ExportedPredictor("model.onnx", runtime="openvino", precision="bf16")
    result = predictor("street.jpg")             # one Instances, as Predictor returns it
    results = predictor([array, pil_image])      # a list, run as one batch

Shorthand: N images, D detections over the batch, S the mask side. The image conversion, the resize, the
normalisation and padding before the graph, and the resize back and mask paste after it, are the
eager predictor's own functions; only the network runs in the other runtime.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from maskrcnn.config import ModelConfig
from maskrcnn.deploy.export import INPUT_NAMES, OUTPUT_NAMES, read_metadata
from maskrcnn.deploy.signal_stack import kept_signal_stack
from maskrcnn.errors import InputError
from maskrcnn.inference import (ImageInput, check_mask_format, drop_unmatched, match_categories, to_image_tensors,
                                to_instances)
from maskrcnn.modeling.maskrcnn import preprocess_images
from maskrcnn.modeling.postprocess import to_original_image
from maskrcnn.precision import resolve_precision
from maskrcnn.structures import ImageList, Instances

RUNTIMES = ("onnxruntime", "openvino")
# Precisions each runtime offers: OpenVINO's bf16 sets its inference precision hint (CPUs with AVX512-BF16
# or AMX run it natively); "auto" is bf16 on those CPUs and fp32 elsewhere (onnxruntime: always fp32).
RUNTIME_PRECISIONS = {"onnxruntime": ("auto", "fp32"), "openvino": ("auto", "fp32", "bf16")}


class ExportedPredictor:
    """An exported Mask R-CNN ready for inference: the same inputs and :class:`Instances` as
    :class:`maskrcnn.predictor.Predictor`.

    path: an ONNX file written by :func:`~maskrcnn.deploy.export.export_onnx`, or the int8 OpenVINO IR
        (``.xml``) written by :func:`~maskrcnn.deploy.quantize.quantize_int8` (OpenVINO only); its metadata
        supplies the class names, the input normalisation and resize, and the mask threshold.
    runtime: "onnxruntime" or "openvino".
    precision: "auto" (OpenVINO bf16 where the CPU computes it natively, else fp32), "fp32", or "bf16"
        (OpenVINO only; warns where it is emulated, and runs fp32 with a warning where OpenVINO has no bf16
        kernels, below AVX-512); None, the default, is ``model.precision``'s default
        (:attr:`ModelConfig.precision <maskrcnn.config.ModelConfig.precision>`): an exported file carries no
        precision of its own. ``self.precision`` is the one the graph runs in.
    mask_format: "bitmap", "rle" or "none", as the eager predictor.
    score_thresh: detections scoring below this are dropped; None keeps the threshold the graph was exported
        with (its metadata's ``score_thresh``), below which it has already dropped them: a lower one is refused.
    bgr: NumPy inputs are BGR (OpenCV order) unless a call says otherwise.
    threads: intra-op threads of the runtime (None: the runtime's default, all cores).
    categories: a dataset's COCO categories (dicts with ``id`` and ``name``) to report in, as
        :class:`~maskrcnn.predictor.Predictor` takes them: each label is matched to one of them (by the
        metadata's ``label_to_cat_id``, else by name, see :func:`~maskrcnn.inference.match_categories`) and
        detections of labels the dataset lacks are dropped.
    """

    def __init__(self, path: Union[str, Path], *, runtime: str = "onnxruntime", precision: Optional[str] = None,
                 mask_format: str = "bitmap", bgr: bool = False, threads: Optional[int] = None,
                 score_thresh: Optional[float] = None, categories: Optional[Sequence[dict]] = None):
        if runtime not in RUNTIMES:
            raise InputError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        precision = ModelConfig.precision if precision is None else precision
        if precision not in RUNTIME_PRECISIONS[runtime]:
            raise InputError(f"{runtime} runs precision {RUNTIME_PRECISIONS[runtime]}, got {precision!r}")
        check_mask_format(mask_format)
        self.path = Path(path)
        if self.path.suffix == ".xml" and runtime != "openvino":
            raise InputError(f"{self.path} is an OpenVINO IR: run it with runtime='openvino'")
        self.metadata = read_metadata(self.path)
        if score_thresh is not None and score_thresh < self.metadata["score_thresh"]:
            raise InputError(f"score_thresh {score_thresh} is below the threshold {self.metadata['score_thresh']} "
                             f"{self.path} was exported with: re-export it with the lower threshold")
        self.score_thresh = self.metadata["score_thresh"] if score_thresh is None else float(score_thresh)
        self.class_names = list(self.metadata["class_names"])
        cat_ids = self.metadata["label_to_cat_id"]
        self.label_to_cat_id = None if cat_ids is None else {int(k): int(v) for k, v in cat_ids.items()}
        self.drops_unmatched = categories is not None
        if categories is not None:
            self.label_to_cat_id = match_categories(self.class_names, self.label_to_cat_id, categories)
        self.runtime = runtime
        self.resolved_precision = resolve_precision(precision if runtime == "openvino" else "fp32", "cpu")
        self.mask_format = mask_format
        self.bgr = bgr
        if runtime == "onnxruntime":
            self.run_network = _onnxruntime_session(self.path, threads)
        else:
            self.run_network, ran = _openvino_session(self.path, self.resolved_precision.precision, threads)
            if ran != self.resolved_precision.precision:
                self.resolved_precision = replace(self.resolved_precision, precision=ran, native=True,
                                                  reason="OpenVINO has no bf16 kernels on this CPU")
        self.precision = self.resolved_precision.precision

    def __call__(self, inputs: Union[ImageInput, Sequence[ImageInput]], *,
                 bgr: Optional[bool] = None) -> Union[Instances, List[Instances]]:
        """Detect instances in one image (returns one :class:`Instances`) or a list (returns a list, run as
        one batch). ``bgr`` overrides the predictor's setting for NumPy inputs of this call."""
        bgr = self.bgr if bgr is None else bgr
        single, images = to_image_tensors(inputs, bgr=bgr)
        if not images:
            return []
        results = self.detect(images)
        return results[0] if single else results

    def detect(self, images: Sequence[torch.Tensor]) -> List[Instances]:
        """images: N (3, H, W) float 0-1 RGB tensors -> N :class:`Instances` (the network runs as one batch)."""
        meta = self.metadata
        batch, inputs = network_inputs(images, meta)
        outputs = dict(zip(OUTPUT_NAMES, self.run_network(*inputs)))
        kept = outputs["scores"] >= self.score_thresh
        outputs = {name: value[kept] for name, value in outputs.items()}
        counts = np.bincount(outputs["image_index"], minlength=len(images)).tolist()
        split = {name: torch.from_numpy(np.ascontiguousarray(outputs[name])).split(counts)
                 for name in ("boxes", "scores", "labels", "mask_probs")}
        pasted = [
            to_original_image({name: split[name][i] for name in split}, resized, tuple(image.shape[-2:]),
                              mask_format=self.mask_format, mask_threshold=meta["mask_threshold"],
                              memory_mb=meta["paste_memory_mb"])
            for i, (resized, image) in enumerate(zip(batch.image_sizes, images))
        ]
        results = to_instances(pasted, [tuple(image.shape[-2:]) for image in images], class_names=self.class_names,
                               label_to_cat_id=self.label_to_cat_id)
        return drop_unmatched(results, self.label_to_cat_id) if self.drops_unmatched else results


def network_inputs(images: Sequence[torch.Tensor],
                   metadata: dict) -> Tuple[ImageList, Tuple[np.ndarray, np.ndarray]]:
    """N ``(3, H, W)`` 0-1 RGB images -> the batch as the exported graph takes it: the padded
    :class:`ImageList` (its ``image_sizes`` are the resized sizes) and the graph's inputs, ``images``
    (N, 3, Hp, Wp) float32 resized, normalised and padded with the ``metadata`` of the exported file, and
    ``image_sizes`` (N, 2) int64."""
    batch = preprocess_images(list(images), pixel_mean=torch.tensor(metadata["pixel_mean"]).view(3, 1, 1),
                              pixel_std=torch.tensor(metadata["pixel_std"]).view(3, 1, 1),
                              min_size=metadata["min_size"], max_size=metadata["max_size"],
                              size_divisible=metadata["size_divisible"])
    return batch, (batch.tensor.numpy(), np.asarray(batch.image_sizes, dtype=np.int64))


def _onnxruntime_session(path: Path, threads: Optional[int]):
    """A function (images, image_sizes) -> the graph's outputs, in an onnxruntime CPU session."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: np.ndarray, image_sizes: np.ndarray) -> list:
        return session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, (images, image_sizes))))

    return run


def _openvino_session(path: Path, precision: str, threads: Optional[int]):
    """(a function (images, image_sizes) -> the graph's outputs, compiled by OpenVINO for the CPU; the
    precision it runs in). OpenVINO emulates bf16 on AVX-512 CPUs without bf16 instructions but has no bf16
    kernels below AVX-512: where it refuses to compile for bf16, the graph runs in fp32, with a warning."""
    import openvino

    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    model = read_openvino_model(path)
    try:
        with kept_signal_stack():
            compiled = openvino.Core().compile_model(model, "CPU", config)
    except RuntimeError as error:
        if precision != "bf16":
            raise
        reason = next((line for line in str(error).splitlines()[::-1] if line.strip()), "no reason given")
        warnings.warn(f"OpenVINO cannot run bf16 on this CPU ({reason.strip()}): running {path.name} in fp32",
                      stacklevel=3)
        config["INFERENCE_PRECISION_HINT"], precision = "f32", "fp32"
        with kept_signal_stack():
            compiled = openvino.Core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(images: np.ndarray, image_sizes: np.ndarray) -> list:
        result = request.infer({"images": images, "image_sizes": image_sizes})
        return [np.array(result[compiled.output(name)]) for name in OUTPUT_NAMES]

    return run, precision


def read_openvino_model(path: Path):
    """The graph of an ONNX file or OpenVINO IR as an OpenVINO model whose NonMaxSuppression drops what ONNX
    Runtime and the eager model drop. OpenVINO's CPU NonMaxSuppression drops a box whose IoU *equals* the
    IoU threshold, where ONNX Runtime and torchvision's ``nms`` keep it (they drop an IoU above it): each
    NonMaxSuppression's threshold is raised to the next float32, above which the same IoUs lie."""
    import openvino

    model = openvino.Core().read_model(str(path))
    for node in model.get_ops():
        if node.get_type_name() == "NonMaxSuppression":
            threshold = node.input_value(3).get_node().get_data().astype(np.float32)
            raised = openvino.opset13.constant(np.nextafter(threshold, np.float32(np.inf)))
            node.input(3).replace_source_output(raised.output(0))
    return model

