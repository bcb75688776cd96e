"""What int8 quantisation of the backbone and FPN costs in accuracy: box and mask AP of the same checkpoint
exported and run by OpenVINO in f32 and in int8, on the same evaluation set, scored by pycocotools.

The checkpoint is exported with :func:`~maskrcnn.deploy.export.export_onnx` at the evaluation settings
(the checkpoint's own score threshold), quantised with :func:`~maskrcnn.deploy.quantize.quantize_int8`
on calibration images that should come from the training split, and both files run the evaluation
images one at a time through :class:`~maskrcnn.deploy.runtime.ExportedPredictor`. The time of each pass
is reported too, but on small images it is mostly the Python around the graph; the speed of the
network on full-size images is ``python -m benchmarks.benchmark_deploy``'s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Union

from maskrcnn.deploy.export import export_onnx
from maskrcnn.deploy.quantize import quantize_int8
from maskrcnn.deploy.runtime import ExportedPredictor
from maskrcnn.evaluation.coco_evaluator import evaluate_results, load_coco
from maskrcnn.fileio import image_files
from maskrcnn.inference import match_categories
from maskrcnn.predictor import Predictor

# The largest mask AP drop (in AP points, 0-100) at which int8 is offered.
MAX_MASK_AP_DROP = 1.0


def evaluate_exported(predictor: ExportedPredictor, ann_file: Union[str, Path], image_dir: Union[str, Path],
                      progress: Callable[[str], None] = lambda message: None) -> Dict[str, object]:
    """Box and mask AP of an exported model on a COCO-format set, image by image.

    Returns ``{"bbox": {...}, "segm": {...}}`` as :func:`~maskrcnn.evaluation.coco_evaluator.evaluate_results`
    gives them, plus ``seconds`` (the whole pass, image reading included) and ``images``.
    """
    coco_gt = load_coco(ann_file)
    mapping = match_categories(predictor.class_names, predictor.label_to_cat_id, coco_gt.dataset["categories"])
    results: List[dict] = []
    images = coco_gt.dataset["images"]
    start = time.perf_counter()
    for k, record in enumerate(images):
        instances = predictor(str(Path(image_dir) / record["file_name"]))
        results.extend(instances.to_coco(record["id"], label_to_cat_id=mapping))
        if (k + 1) % 50 == 0:
            progress(f"{k + 1}/{len(images)} images")
    seconds = time.perf_counter() - start
    metrics = evaluate_results(coco_gt, results, verbose=False)
    return {**metrics, "seconds": seconds, "images": len(images)}


def run_int8_report(checkpoint: Union[str, Path], calibration_dir: Union[str, Path], ann_file: Union[str, Path],
                    image_dir: Union[str, Path], folder: Union[str, Path], *, calibration_count: int = 100,
                    preset: str = "mixed", threads: int = None,
                    progress: Callable[[str], None] = lambda message: None) -> Dict[str, object]:
    """Export ``checkpoint`` to ``folder``, quantise it on ``calibration_count`` images of ``calibration_dir``,
    evaluate both on ``ann_file`` / ``image_dir``.

    Returns ``{"openvino f32": metrics, "openvino int8": metrics, "mask_ap_drop": points, "box_ap_drop":
    points, "qualifies": mask_ap_drop <= MAX_MASK_AP_DROP, "calibration_images": n, "preset": preset}``
    (drops in AP points, 0-100; positive means int8 is worse).
    """
    folder = Path(folder)
    predictor = Predictor.from_checkpoint(checkpoint)
    progress("exporting to ONNX")
    onnx_path = export_onnx(predictor.model, folder / "model.onnx", class_names=predictor.class_names,
                            label_to_cat_id=predictor.label_to_cat_id)
    files = image_files(calibration_dir)[:calibration_count]
    progress(f"quantising on {len(files)} calibration images ({preset})")
    int8_path = quantize_int8(onnx_path, [str(f) for f in files], folder / "model.int8.xml", preset=preset)
    report: Dict[str, object] = {"calibration_images": len(files), "preset": preset}
    for name, path in (("openvino f32", onnx_path), ("openvino int8", int8_path)):
        progress(f"evaluating {name}")
        exported = ExportedPredictor(path, runtime="openvino", mask_format="rle", threads=threads)
        report[name] = evaluate_exported(exported, ann_file, image_dir, progress)
    for key, iou_type in (("mask_ap_drop", "segm"), ("box_ap_drop", "bbox")):
        report[key] = 100 * (report["openvino f32"][iou_type]["AP"] - report["openvino int8"][iou_type]["AP"])
    report["qualifies"] = report["mask_ap_drop"] <= MAX_MASK_AP_DROP
    return report


def format_int8_report(report: Dict[str, object]) -> str:
    """The report as a small table: AP per variant, the drops, the pass times and the verdict."""
    lines = [f"{'variant':<14} {'box AP':>7} {'mask AP':>8} {'pass s':>7}"]
    for name in ("openvino f32", "openvino int8"):
        m = report[name]
        lines.append(f"{name:<14} {100 * m['bbox']['AP']:7.2f} {100 * m['segm']['AP']:8.2f} {m['seconds']:7.1f}")
    verdict = "within" if report["qualifies"] else "beyond"
    lines.append(f"int8 ({report['preset']} preset, {report['calibration_images']} calibration images): "
                 f"mask AP {-report['mask_ap_drop']:+.2f} points, box AP {-report['box_ap_drop']:+.2f} points; "
                 f"{verdict} the {MAX_MASK_AP_DROP:g}-point limit")
    return "\n".join(lines)
