"""int8 post-training quantisation of an exported model's backbone and FPN, with NNCF, for OpenVINO.

    path = quantize_int8("model.onnx", calibration_images, "model.int8.xml")
    predictor = ExportedPredictor(path, runtime="openvino")

NNCF runs the fp32 graph on the calibration images, records the range of every activation that enters a
convolution of the backbone or the FPN, and inserts int8 quantise/dequantise pairs there (weights per
output channel); OpenVINO then runs those convolutions in int8. Everything after the FPN (the RPN, the
RoIAlign heads, the NMS and top-k) stays in floating point: its inputs are few and its outputs decide
which detections survive, so it gains little speed and is where rounding would move boxes and masks.
The result is an OpenVINO IR (an ``.xml`` graph and a ``.bin`` of weights) carrying the ONNX file's
metadata; ``python -m benchmarks.int8_report`` measures what it costs in mask AP and what it buys in speed.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence, Union

from maskrcnn.deploy.export import INPUT_NAMES, METADATA_KEY, read_metadata
from maskrcnn.deploy.runtime import network_inputs
from maskrcnn.deploy.signal_stack import kept_signal_stack
from maskrcnn.errors import InputError
from maskrcnn.inference import ImageInput, to_image_tensor

# The exporter names each node after the module that made it ("/backbone/layer1/...", "/fpn/..."); only
# these nodes are quantised.
QUANTIZED_SCOPES = ("/backbone/", "/fpn/")


def quantize_int8(onnx_path: Union[str, Path], calibration_images: Sequence[ImageInput],
                  output_path: Union[str, Path], *, preset: str = "mixed") -> Path:
    """Quantise the backbone and FPN of an exported model to int8 and write it as an OpenVINO IR.

    onnx_path: a file written by :func:`~maskrcnn.deploy.export.export_onnx`.
    calibration_images: images of the kind the model will see (paths, uint8 RGB arrays, PIL images or
        0-1 tensors); a few hundred at most are useful. Take them from the training set, not from the
        images the result is evaluated on.
    output_path: the ``.xml`` file to write (its weights go to the ``.bin`` beside it); both are written
        to temporary names and renamed into place, the ``.bin`` first.
    preset: "mixed" (symmetric weights, asymmetric activations: suits activations that are not centred
        on zero, as after the FPN's additions) or "performance" (symmetric both).
    Returns the ``.xml`` path.
    """
    import nncf
    import openvino

    nncf.set_log_level(logging.WARNING)  # NNCF lists every node it leaves alone at INFO
    onnx_path, output_path = Path(onnx_path), Path(output_path)
    if output_path.suffix != ".xml":
        raise InputError(f"the int8 model is an OpenVINO IR: output must end in .xml, got {output_path}")
    if not calibration_images:
        raise InputError("quantisation needs at least one calibration image")
    presets = {"mixed": nncf.QuantizationPreset.MIXED, "performance": nncf.QuantizationPreset.PERFORMANCE}
    if preset not in presets:
        raise InputError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    metadata = read_metadata(onnx_path)
    model = openvino.Core().read_model(str(onnx_path))
    inputs = [dict(zip(INPUT_NAMES, network_inputs([to_image_tensor(image, name=f"calibration image {i}")],
                                                   metadata)[1]))
              for i, image in enumerate(calibration_images)]
    # Everything whose name is outside the backbone and the FPN is left in floating point.
    outside = "^(?!" + "|".join(scope.replace("/", r"\/") for scope in QUANTIZED_SCOPES) + ").*"
    with kept_signal_stack():  # NNCF compiles and frees models for the calibration statistics
        quantized = nncf.quantize(model, nncf.Dataset(inputs), preset=presets[preset], subset_size=len(inputs),
                                  ignored_scope=nncf.IgnoredScope(patterns=[outside], validate=False))
        gc.collect()  # its compiled models freed here, while the caller's stack is not yet back
    quantized.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_path.parent, prefix=f".{output_path.stem}.") as folder:
        tmp = Path(folder) / "model.xml"
        openvino.save_model(quantized, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), output_path.with_suffix(".bin"))
        os.replace(tmp, output_path)
    return output_path


def quantized_node_names(path: Union[str, Path]) -> list:
    """Names of the operations of an OpenVINO IR that compute on int8-quantised inputs (the FakeQuantize
    nodes' consumers, but for ShapeOf, which reads only the shape), sorted; used to check that only the
    backbone and FPN were quantised."""
    import openvino

    model = openvino.Core().read_model(str(path))
    names = set()
    for op in model.get_ops():
        if op.get_type_name() == "FakeQuantize":
            for target in op.output(0).get_target_inputs():
                node = target.get_node()
                if node.get_type_name() != "ShapeOf":
                    names.add(node.get_friendly_name())
    return sorted(names)
