"""Batch inference on one machine (maskrcnn.batch, tools/predict_batch.py): rows as the predictor's COCO results
with RLE masks, shards that Arrow reads, unreadable images as error rows, resuming after a stop or a kill
without losing or repeating a row, a bounded read-ahead, and no full-size bitmaps on a 12-megapixel image."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_data import LABEL_TO_CAT_ID, assert_same_rows, write_checkpoint, write_images
from maskrcnn.batch import ModelSpec, list_inputs, predict_batch, read_rows
from maskrcnn.batch import local
from maskrcnn.batch.job import plan_batches
from maskrcnn.batch.rows import image_rows, load_image, rows_to_table
from maskrcnn.batch.shards import ShardFolder, list_shards
from maskrcnn.cli import run
from maskrcnn.deploy.export import export_onnx
from maskrcnn.deploy.runtime import ExportedPredictor
from maskrcnn.errors import InputError
from maskrcnn.predictor import Predictor

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import predict_batch as predict_batch_tool  # noqa: E402

BATCH, SHARD = 2, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    return {"checkpoint": write_checkpoint(folder / "model.pth"), "paths": list_inputs(write_images(folder / "images", 6)[0].parent)}


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory):
    """A job run from start to end on the local engine: its output folder and summary."""
    output = tmp_path_factory.mktemp("clean")
    summary = predict_batch(data["paths"], output, ModelSpec(checkpoint=str(data["checkpoint"])), batch_size=BATCH,
                            shard_size=SHARD, progress=False)
    return output, summary


def test_rows_are_the_predictors_coco_results_with_masks_encoded_from_regions(data):
    """Oracle: the same batch through the predictor with full bitmaps, encoded by pycocotools (Instances.to_coco)."""
    images = [load_image(path) for path in data["paths"][:2]]
    rows = image_rows(ModelSpec(checkpoint=str(data["checkpoint"])).build(), images)
    bitmaps = Predictor.from_checkpoint(data["checkpoint"], mask_format="bitmap")([image.pixels for image in images])
    for row, image, instances in zip(rows, images, bitmaps):
        want = instances.to_coco(image_id=None)
        assert len(want) > 0 and row["path"] == image.path and row["error"] is None
        assert (row["height"], row["width"]) == image.pixels.shape[:2]
        assert [d["segmentation"] for d in row["detections"]] == [w["segmentation"] for w in want]
        assert [d["category_id"] for d in row["detections"]] == [w["category_id"] for w in want]
        assert {d["category_id"] for d in row["detections"]} <= set(LABEL_TO_CAT_ID.values())
        assert [(d["bbox"], d["score"]) for d in row["detections"]] == [(w["bbox"], w["score"]) for w in want]


@pytest.mark.slow
def test_an_exported_model_gives_the_rows_its_runtime_predicts(data, tmp_path):
    """``--onnx`` on onnxruntime: rows as ExportedPredictor's COCO results with full bitmaps encoded by
    pycocotools, category ids from the export's metadata."""
    predictor = Predictor.from_checkpoint(data["checkpoint"])
    onnx = export_onnx(predictor.model, tmp_path / "model.onnx", class_names=predictor.class_names,
                       label_to_cat_id=predictor.label_to_cat_id)
    predict_batch(data["paths"], tmp_path / "rows", ModelSpec(onnx=str(onnx)), batch_size=BATCH, progress=False)
    rows = {row["path"]: row for row in read_rows(tmp_path / "rows")}
    bitmaps = ExportedPredictor(onnx, mask_format="bitmap")([load_image(path).pixels for path in data["paths"][:2]])
    for path, instances in zip(data["paths"][:2], bitmaps):
        want = [{key: result[key] for key in ("category_id", "bbox", "score", "segmentation")}
                for result in instances.to_coco(image_id=None)]
        assert len(want) > 0 and rows[path]["detections"] == want
    assert {d["category_id"] for row in rows.values() for d in row["detections"]} <= set(LABEL_TO_CAT_ID.values())
    assert len(rows) == 8 and sum(row["error"] is not None for row in rows.values()) == 2


def test_unreadable_images_become_error_rows_counted_at_the_end(data, clean):
    output, summary = clean
    rows = read_rows(output)
    errors = {Path(row["path"]).name: row for row in rows if row["error"] is not None}
    assert sorted(errors) == ["img_not_an_image.jpg", "img_truncated.png"]
    assert all(row["detections"] == [] and row["height"] is None for row in errors.values())
    assert "img_truncated.png" in errors["img_truncated.png"]["error"]
    assert summary["errors"] == 2 and summary["written"] == len(rows) == len(data["paths"]) == 8
    assert summary["detections"] == sum(len(row["detections"]) for row in rows) > 0


def test_parquet_shards_are_read_by_arrow_and_pandas_as_one_table(clean):
    output, _ = clean
    rows = read_rows(output)
    assert len(list_shards(output)) == 4  # 8 images, 2 a batch, a shard of each batch
    table = pq.read_table(output)  # Arrow's dataset reader: _run.json and .lock are skipped
    assert table.schema.equals(rows_to_table([]).schema)
    assert sorted(table.to_pylist(), key=lambda row: row["path"]) == sorted(rows, key=lambda row: row["path"])
    frame = pytest.importorskip("pandas").read_parquet(output)
    assert sorted(frame["path"]) == sorted(row["path"] for row in rows)


def test_jsonl_shards_hold_the_same_rows_as_parquet(data, clean, tmp_path):
    predict_batch(data["paths"], tmp_path, ModelSpec(checkpoint=str(data["checkpoint"])), output_format="jsonl",
                  batch_size=BATCH, shard_size=SHARD, progress=False)
    lines = [json.loads(line) for shard in list_shards(tmp_path) for line in shard.read_text().splitlines()]
    assert lines == read_rows(clean[0]) and all(shard.suffix == ".jsonl" for shard in list_shards(tmp_path))


def test_rerun_writes_only_what_is_missing_and_redoes_a_half_written_batch_whole(data, clean, tmp_path):
    """A batch whose rows a stop split (here: one of its two rows kept) runs again with the same images, so
    the new row equals the clean run's; rows already there are not written again."""
    output, _ = clean
    for shard in list_shards(output):
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    (tmp_path / "_run.json").write_bytes((output / "_run.json").read_bytes())
    first = list_shards(tmp_path)[0]
    kept = pq.read_table(first).to_pylist()[:1]
    pq.write_table(rows_to_table(kept), first)
    os.unlink(list_shards(tmp_path)[-1])
    summary = predict_batch(data["paths"], tmp_path, ModelSpec(checkpoint=str(data["checkpoint"])),
                            batch_size=BATCH, shard_size=SHARD, progress=False)
    assert summary["done_before"] == len(data["paths"]) - 3 and summary["written"] == 3
    assert_same_rows(read_rows(tmp_path), read_rows(output), score_tol=0)


def test_a_second_job_on_a_folder_in_use_or_with_other_settings_is_refused(data, clean, tmp_path):
    spec = ModelSpec(checkpoint=str(data["checkpoint"]))
    with ShardFolder(tmp_path, output_format="parquet", settings={"batch_size": 2}):
        with pytest.raises(InputError, match="another job is writing"):
            predict_batch(data["paths"], tmp_path, spec, batch_size=2, progress=False)
    with pytest.raises(InputError, match="batch_size 2 there, 3 now"):
        predict_batch(data["paths"], clean[0], spec, batch_size=3, progress=False)
    with pytest.raises(InputError, match="format 'parquet' there, 'jsonl' now"):
        predict_batch(data["paths"], clean[0], spec, batch_size=BATCH, output_format="jsonl", progress=False)


def test_batches_are_consecutive_inputs_whatever_is_done():
    assert plan_batches(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(InputError, match="at least 1"):
        plan_batches(["a"], 0)


def test_read_ahead_decodes_at_most_depth_batches_beyond_the_one_in_use(data, monkeypatch):
    submitted = []

    class CountingPool(ThreadPoolExecutor):
        def submit(self, function, path):
            submitted.append(path)
            return super().submit(function, path)

    monkeypatch.setattr(local, "ThreadPoolExecutor", CountingPool)
    batches = plan_batches(data["paths"], 1)
    reader = local.read_ahead(batches, readers=2, depth=2)
    first = next(reader)  # the generator waits here: what it has submitted stays as it is
    assert [image.path for image in first] == batches[0] and submitted == data["paths"][:3]
    assert [image.path for batch in reader for image in batch] == data["paths"][1:]


def test_inputs_from_a_folder_a_glob_a_list_and_a_parquet_column_are_the_same_paths(data, tmp_path, monkeypatch):
    folder = Path(data["paths"][0]).parent
    (tmp_path / "list.txt").write_text("# the images\n" + "\n".join(data["paths"] + data["paths"][:1]) + "\n\n")
    pq.write_table(pa.table({"image": data["paths"], "n": list(range(8))}), tmp_path / "list.parquet")
    assert list_inputs(folder / "img*") == data["paths"]
    assert list_inputs(tmp_path / "list.txt") == data["paths"]  # the repeated path counts once
    assert list_inputs(tmp_path / "list.parquet", path_column="image") == data["paths"]
    monkeypatch.chdir(folder.parent)
    assert list_inputs(folder.name) == data["paths"]  # relative paths made absolute


def _not_parquet(folder: Path) -> Path:
    (folder / "x.parquet").write_text("not parquet")
    return folder / "x.parquet"


def _no_path_column(folder: Path) -> Path:
    pq.write_table(pa.table({"file": ["a.png"]}), folder / "l.parquet")
    return folder / "l.parquet"


@pytest.mark.parametrize("make_input, message", [
    (lambda folder: folder / "absent", "error: input not found: "),
    (_no_path_column, "has no column 'path' of image paths (its columns: file)"),
    (_not_parquet, "as Parquet"),
    (lambda folder: folder / "*.none", "no file matches the pattern"),
])
def test_inputs_a_tool_cannot_list_are_one_line_errors(data, tmp_path, capsys, make_input, message):
    with pytest.raises(SystemExit) as exit_info:
        run(predict_batch_tool.main, ["--input", str(make_input(tmp_path)), "--checkpoint", str(data["checkpoint"]),
                                      "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def _tool(data, output, *extra):
    return [sys.executable, str(ROOT / "tools" / "predict_batch.py"), "--input", str(Path(data["paths"][0]).parent),
            "--checkpoint", str(data["checkpoint"]), "--output", str(output), "--batch-size", str(BATCH),
            "--shard-size", str(SHARD), *extra]


@pytest.mark.slow
def test_a_killed_local_job_resumes_to_the_clean_rows_without_importing_ray(data, clean, tmp_path):
    """The whole process killed (SIGKILL) after its first shard; the same command again finishes the job;
    the rows equal the clean run's, each once, and neither run imported ray."""
    job = subprocess.Popen(_tool(data, tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list_shards(tmp_path) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=30)
    killed_after = len(list_shards(tmp_path))
    assert job.returncode == -signal.SIGKILL and 1 <= killed_after < 4
    watch = ("import runpy, sys; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__'); print('ray imported:', 'ray' in sys.modules)")
    rerun = subprocess.run([sys.executable, "-c", watch, *_tool(data, tmp_path)[1:]], cwd=ROOT, capture_output=True,
                           text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert "ray imported: False" in rerun.stdout
    assert f"done before, {8 - 2 * killed_after} now" in rerun.stdout
    final_bar = rerun.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert " 8/8 [" in final_bar and ("img/s" in final_bar or "s/img" in final_bar)
    assert_same_rows(read_rows(tmp_path), read_rows(clean[0]))


BIG_IMAGE_JOB = """
import json, resource, sys, torch, numpy as np
sys.path.insert(0, {tests!r})
from tiny import tiny_config
from maskrcnn.batch.rows import LoadedImage, ModelSpec, image_rows
from maskrcnn.config import config_to_dict
from maskrcnn.modeling.maskrcnn import build_model

cfg = tiny_config()
m = cfg.model
m.input.min_size_test, m.input.max_size_test, m.anchors.sizes = 480, 640, [8, 16, 32, 64, 128]
m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_test = 2000, 1000
m.roi_heads.detections_per_img, m.roi_heads.score_thresh, m.roi_heads.paste_memory_mb = 300, 0.0, {budget}
torch.manual_seed(0)
torch.save({{"model": build_model(m).state_dict(), "config": config_to_dict(cfg), "class_names": ["a", "b", "c"]}},
           {checkpoint!r})
predictor = ModelSpec(checkpoint={checkpoint!r}).build()
nothing = ModelSpec(checkpoint={checkpoint!r}, score_thresh=1.0).build()
image = np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
image_rows(predictor, [LoadedImage("warm-up", image[:300, :400], None)])
size = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 4 * 2**30, resource.RLIM_INFINITY))
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak()
assert image_rows(nothing, [LoadedImage("big", image, None)])[0]["detections"] == []
no_detections = peak()
row = image_rows(predictor, [LoadedImage("big", image, None)])[0]
print(json.dumps({{"detections": len(row["detections"]), "input_bytes": no_detections - before,
                  "detection_bytes": peak() - no_detections}}))
"""


@pytest.mark.slow
def test_a_12_megapixel_image_with_300_detections_never_holds_full_size_bitmaps(tmp_path):
    """The peak memory that 300 detections of a 3000 x 4000 image add, over the same image with none, stays
    within the paste's budget and three full-size bitmaps (300 bitmaps: 3.4 GB). A child process, run under
    an address-space limit so that a regression fails at once instead of filling the machine."""
    budget = 32
    script = BIG_IMAGE_JOB.format(tests=str(ROOT / "tests"), checkpoint=str(tmp_path / "big.pth"), budget=budget)
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    bitmap = 3000 * 4000
    assert measured["detections"] == 300
    assert measured["detection_bytes"] < budget * 2**20 + 3 * bitmap, measured
