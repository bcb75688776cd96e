"""Batch inference on Ray Data (maskrcnn.batch.ray_engine): the same rows as the local engine, a progress bar in
images, and no row lost or repeated when a worker is killed mid-run.

One local Ray instance for the module: 2 CPUs, its node address 127.0.0.1 (Ray 2.60's servers still listen on
every interface), token authentication as a new local Ray has it by default, with a random token given in the
environment (so none is written under ~/.ray), shut down at the end.
"""

import os
import secrets
import signal
import threading
import time

import psutil
import pytest

from batch_data import assert_same_rows, write_checkpoint, write_images
from maskrcnn.batch import ModelSpec, RayOptions, list_inputs, predict_batch, read_rows
from maskrcnn.batch.shards import list_shards

ray = pytest.importorskip("ray")

BATCH, SHARD = 2, 2
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    saved = {name: os.environ.pop(name, None) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The images, the model, and the rows of a local run over them."""
    folder = tmp_path_factory.mktemp("batch_ray")
    spec = ModelSpec(checkpoint=str(write_checkpoint(folder / "model.pth")))
    paths = list_inputs(write_images(folder / "images", 6)[0].parent)
    predict_batch(paths, folder / "local", spec, batch_size=BATCH, shard_size=SHARD, progress=False)
    return {"spec": spec, "paths": paths, "rows": read_rows(folder / "local")}


def test_the_ray_engine_gives_the_local_engines_rows_with_a_progress_bar(cluster, data, tmp_path, capsys):
    summary = predict_batch(data["paths"], tmp_path, data["spec"], engine="ray", batch_size=BATCH, shard_size=SHARD,
                            ray=RayOptions(actors=2))
    assert summary["written"] == 8 and summary["errors"] == 2
    assert_same_rows(read_rows(tmp_path), data["rows"])
    final_bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert " 8/8 [" in final_bar and ("img/s" in final_bar or "s/img" in final_bar)
    assert ray.is_initialized()  # a Ray this process started is left running


def _map_workers():
    return [p for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::MapWorker")]


def test_a_ray_job_loses_no_row_when_its_worker_is_killed(cluster, data, tmp_path):
    """The only actor is killed (SIGKILL) once the first shard is written; Ray restarts it and retries its
    batches, and the folder ends with the local run's rows, each once."""
    killed, earlier = {}, {worker.pid for worker in _map_workers()}  # an earlier job's, if still exiting

    def kill_the_worker():
        deadline = time.monotonic() + 120
        while not list_shards(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = [worker for worker in _map_workers() if worker.pid not in earlier]
        killed["shards"], killed["pids"] = len(list_shards(tmp_path)), [w.pid for w in workers]
        for worker in workers:
            os.kill(worker.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker)
    killer.start()
    summary = predict_batch(data["paths"], tmp_path, data["spec"], engine="ray", batch_size=BATCH, shard_size=SHARD,
                            ray=RayOptions(actors=1), progress=False)
    killer.join()
    assert len(killed["pids"]) == 1 and 1 <= killed["shards"] < 4 and summary["written"] == 8
    assert_same_rows(read_rows(tmp_path), data["rows"])
