"""Batch rows read back (maskrcnn.batch.results): a dataset's COCO results, scored by tools/eval.py and
analysed by tools/analyze.py as a results.json is, and each row's Instances, written as pre-annotations."""

import json
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from batch_data import CLASS_NAMES, LABEL_TO_CAT_ID, write_checkpoint, write_images
from maskrcnn.batch import ModelSpec, list_inputs, predict_batch, read_rows
from maskrcnn.batch.results import coco_results, instances_of
from maskrcnn.cli import run
from maskrcnn.data.formats.preannotate import PreannotationWriter
from maskrcnn.errors import InputError
from maskrcnn.evaluation.coco_evaluator import load_coco
from maskrcnn.fileio import read_checkpoint, read_image, save_json
from maskrcnn.predictor import Predictor

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import analyze as analyze_tool  # noqa: E402
import eval as eval_tool  # noqa: E402

FIRST_ID = 101  # the dataset's image ids are not the rows' positions


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four images, the tiny model's detections of each as tools/infer.py makes them (the oracle), and a COCO
    json of the images, one below a subfolder, whose ground truth is each image's two best detections that the
    report can draw (see test_analyze_of_a_batch_folder_writes_the_report_of_its_detections)."""
    folder = tmp_path_factory.mktemp("results")
    checkpoint = write_checkpoint(folder / "model.pth")
    images = folder / "images"
    paths = write_images(images, 3, unreadable=False)
    (images / "sub").mkdir()
    paths[0] = paths[0].rename(images / "sub" / paths[0].name)
    predictor = Predictor.from_checkpoint(checkpoint)
    dataset = {"images": [], "annotations": [], "categories": [
        {"id": LABEL_TO_CAT_ID[label], "name": name} for label, name in enumerate(CLASS_NAMES, start=1)]}
    oracle, instances = [], {}
    for image_id, path in enumerate(paths, start=FIRST_ID):
        instances[path] = predictor(read_image(path))
        results = instances[path].to_coco(image_id)
        assert len(results) >= 2
        oracle += results
        height, width = instances[path].image_size
        dataset["images"].append({"id": image_id, "file_name": path.relative_to(images).as_posix(),
                                  "height": height, "width": width})
        dataset["annotations"] += [{"id": 10 * image_id + k, "image_id": image_id, "category_id": r["category_id"],
                                    "bbox": r["bbox"], "segmentation": r["segmentation"], "iscrowd": 0,
                                    "area": float(mask_utils.area(r["segmentation"]))}
                                   for k, r in enumerate(results[:2])]
    save_json(folder / "instances.json", dataset)
    save_json(folder / "results.json", oracle)
    return {"folder": folder, "checkpoint": checkpoint, "images": images, "paths": paths, "ann": folder / "instances.json",
            "oracle": oracle, "instances": instances}


@pytest.fixture(scope="module", params=["parquet", "jsonl"])
def rows(request, data):
    """The batch output folder of the images, one image a batch (the predictor's results depend on the batch)."""
    output = data["folder"] / f"rows_{request.param}"
    predict_batch(list_inputs(data["paths"][0].parent) + list_inputs(data["images"]), output,
                  ModelSpec(checkpoint=str(data["checkpoint"])), batch_size=1, output_format=request.param,
                  progress=False)
    return output


def test_rows_read_back_as_the_predictors_coco_results_with_the_datasets_image_ids(data, rows):
    coco_gt = load_coco(data["ann"])
    by_image = sorted(coco_results(rows, coco_gt, data["images"]), key=lambda r: r["image_id"])
    assert by_image == data["oracle"]


def test_without_the_image_folder_rows_are_matched_by_file_name(data, rows):
    results = coco_results(rows, load_coco(data["ann"]))
    assert sorted(results, key=lambda r: r["image_id"]) == data["oracle"]


def _edited_dataset(data, tmp_path, edit):
    dataset = json.loads(data["ann"].read_text())
    edit(dataset)
    save_json(tmp_path / "edited.json", dataset)
    return load_coco(tmp_path / "edited.json")


def test_a_row_of_an_image_the_dataset_lacks_is_an_error_naming_it(data, rows, tmp_path):
    coco_gt = _edited_dataset(data, tmp_path, lambda d: d["images"].pop(2))
    with pytest.raises(InputError, match=f"{data['paths'][2]} is not an image of the dataset"):
        coco_results(rows, coco_gt, data["images"])


def test_an_image_of_the_dataset_without_a_row_is_an_error_naming_it(data, rows, tmp_path):
    coco_gt = _edited_dataset(data, tmp_path, lambda d: d["images"].append(
        {"id": 7, "file_name": "later.png", "height": 9, "width": 9}))
    with pytest.raises(InputError, match=r"1 images of the dataset have no row, e\.g\. later\.png \(image id 7\)"):
        coco_results(rows, coco_gt, data["images"])


def test_an_image_the_batch_could_not_read_is_an_error_naming_it(data, rows, tmp_path):
    broken = [dict(row, detections=[], error="OSError: cut short") if i == 1 else row
              for i, row in enumerate(read_rows(rows))]
    with pytest.raises(InputError, match=f"{broken[1]['path']}, could not be read by the batch: OSError: cut short"):
        coco_results(_write_rows(tmp_path / "broken", broken), load_coco(data["ann"]), data["images"])


def _write_rows(folder, rows):
    """A batch output folder of one JSONL shard holding ``rows``."""
    folder.mkdir()
    (folder / "part-00000.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_file_names_shared_by_two_images_need_the_image_folder(data, rows, tmp_path):
    coco_gt = _edited_dataset(data, tmp_path, lambda d: d["images"].append(
        {"id": 7, "file_name": f"elsewhere/{data['paths'][1].name}", "height": 9, "width": 9}))
    with pytest.raises(InputError, match="give the image folder"):
        coco_results(rows, coco_gt)


def test_eval_of_a_batch_folder_prints_what_eval_of_the_same_results_json_prints(data, rows, capsys):
    run(eval_tool.main, ["--results", str(data["folder"] / "results.json"), "--ann", str(data["ann"])])
    from_json = capsys.readouterr().out
    run(eval_tool.main, ["--results", str(rows), "--ann", str(data["ann"]), "--images", str(data["images"]),
                         "--output", str(rows.parent / f"eval_{rows.name}")])
    from_rows = capsys.readouterr().out
    summary = from_json.splitlines()[-1]
    assert summary.startswith("box AP ") and float(summary.split()[2].rstrip(",")) > 0.1
    assert from_rows == f"{from_json[:-1]}; written to {rows.parent / f'eval_{rows.name}'}\n"
    metrics = json.loads((rows.parent / f"eval_{rows.name}" / "metrics.json").read_text())
    assert f"box AP {metrics['bbox']['AP']:.4f}" in summary


def test_analyze_of_a_batch_folder_writes_the_report_of_its_detections(data, rows, capsys, tmp_path):
    output = tmp_path / "report"
    run(analyze_tool.main, ["--results", str(rows), "--ann", str(data["ann"]), "--images", str(data["images"]),
                            "--output", str(output)])
    detections = sum(len(row["detections"]) for row in read_rows(rows))
    assert detections > len(read_rows(rows)) and capsys.readouterr().out == \
        f"{detections} detections analysed; report: {output / 'index.html'}\n"
    assert "<html" in (output / "index.html").read_text()


def test_instances_of_a_row_are_the_predictors_with_the_same_masks(data, rows):
    for row in read_rows(rows):
        want = data["instances"][Path(row["path"])]
        got = instances_of(row, CLASS_NAMES, LABEL_TO_CAT_ID)
        assert got.image_size == want.image_size and got.class_names == want.class_names
        assert got.labels.tolist() == want.labels.tolist() and got.scores.tolist() == want.scores.tolist()
        np.testing.assert_allclose(got.boxes.numpy(), want.boxes.numpy(), rtol=0, atol=1e-4)
        decoded = mask_utils.decode(got.masks).transpose(2, 0, 1).astype(bool)
        assert np.array_equal(decoded, want.masks.numpy())
        back = got.to_coco(image_id=None)  # the row's detections again; boxes to float32 rounding (xyxy <-> xywh)
        assert [{k: v for k, v in r.items() if k not in ("bbox", "image_id")} for r in back] == \
            [{k: v for k, v in d.items() if k != "bbox"} for d in row["detections"]]
        np.testing.assert_allclose([r["bbox"] for r in back], [d["bbox"] for d in row["detections"]], rtol=0, atol=1e-4)


def test_a_category_no_label_maps_to_is_an_error_naming_the_image(rows):
    row = next(row for row in read_rows(rows) if {d["category_id"] for d in row["detections"]} - {7})
    with pytest.raises(InputError, match=f"{row['path']}: category ids .* are none of the model's \\(\\[7\\]\\)"):
        instances_of(row, CLASS_NAMES[:1], {1: 7})


def test_rows_written_as_preannotations_are_the_predictors(data, rows, tmp_path):
    """The code path of docs/batch-inference.md: read_rows -> instances_of -> PreannotationWriter, against
    the predictor's own Instances written by the same writer (as tools/infer.py --format writes them)."""
    model = read_checkpoint(data["checkpoint"])
    from_rows = PreannotationWriter("labelme", tmp_path / "rows", class_names=model["class_names"])
    for row in read_rows(rows):
        if row["error"] is None:
            from_rows.add(row["path"], instances_of(row, model["class_names"], model.get("label_to_cat_id")))
    written = from_rows.finish()
    oracle = PreannotationWriter("labelme", tmp_path / "oracle", class_names=CLASS_NAMES)
    for path, instances in data["instances"].items():
        oracle.add(path, instances)
    expected = oracle.finish()
    assert (written.images, written.polygons, written.masks) == (expected.images, expected.polygons, expected.masks)
    assert written.images == len(data["paths"]) and written.masks > 0
    for name in (path.name for path in expected.files):
        assert json.loads((tmp_path / "rows" / name).read_text()) == json.loads((tmp_path / "oracle" / name).read_text())
