"""A batch job: image paths -> batches -> an engine -> rows -> shards, resumable, with a progress bar.

    summary = predict_batch(list_inputs("photos/"), "output/rows", ModelSpec(checkpoint="model_final.pth"))
    summary = predict_batch(paths, "output/rows", spec, engine="ray", ray=RayOptions(actors=4))
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

from tqdm import tqdm

from maskrcnn.batch.local import READERS, local_rows
from maskrcnn.batch.rows import ModelSpec
from maskrcnn.batch.shards import SHARD_SIZE, ShardFolder
from maskrcnn.errors import InputError

ENGINES = ("local", "ray")
BATCH_SIZE = 4  # images per forward pass; a batch shares its padding, so a row depends on its batch slightly


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a job runs on Ray (``engine="ray"``).

    address: a running cluster to join ("auto", "ray://host:10001", ...); None starts a local instance on
        this machine for the job's length, listening on loopback only (a Ray already initialised in this
        process is used as it is).
    actors: model replicas working at once; cpus_per_actor, gpus_per_actor: what each reserves (Ray sets an
        actor's ``OMP_NUM_THREADS`` to its CPUs; give the model ``device="cuda"`` with GPUs).
    """

    address: Optional[str] = None
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


def plan_batches(paths: Sequence[str], batch_size: int) -> List[List[str]]:
    """The inputs cut into batches of ``batch_size`` consecutive paths: the same batches on every engine and
    every rerun, so that an image's row does not depend on where the job ran or was stopped."""
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1 image, got {batch_size}")
    return [list(paths[i:i + batch_size]) for i in range(0, len(paths), batch_size)]


def predict_batch(paths: Sequence[str], output: Union[str, Path], model: ModelSpec, *, engine: str = "local",
                  output_format: str = "parquet", batch_size: int = BATCH_SIZE, shard_size: int = SHARD_SIZE,
                  readers: int = READERS, ray: RayOptions = RayOptions(), progress: bool = True) -> dict:
    """Write one row per image of ``paths`` (:mod:`maskrcnn.batch.rows`) to shards in ``output``.

    Images the folder's shards already cover are skipped; a batch that a stopped job left half written runs
    whole again (for the same padding) and only its missing rows are kept, so no row is lost or repeated.
    engine: "local" (this process; ``readers`` threads decode ahead) or "ray" (``ray`` says where).
    output_format: "parquet" or "jsonl" shards of at least ``shard_size`` rows.
    Returns ``images`` (inputs), ``done_before`` (already in the folder), ``written`` (rows this run),
    ``errors`` (rows with an error in the whole folder), ``detections`` (written this run), ``seconds`` and
    ``images_per_s`` (this run's rows per second).
    """
    model.check()
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}, got {engine!r}")
    if readers < 1 or ray.actors < 1:
        raise InputError(f"a job needs at least 1 reader thread and 1 Ray actor, got {readers} and {ray.actors}")
    batches = plan_batches(paths, batch_size)
    settings = {**model.identity(), "batch_size": batch_size}
    start, written, detections = time.perf_counter(), 0, 0
    with ShardFolder(output, output_format=output_format, settings=settings, shard_size=shard_size) as shards:
        done_before = sum(path in shards.done for path in paths)
        todo = [batch for batch in batches if not all(path in shards.done for path in batch)]
        rows = _engine_rows(engine, todo, model, readers=readers, ray=ray)
        with contextlib.closing(rows), tqdm(total=len(paths), initial=done_before, unit="img", desc="predict",
                                            disable=not progress) as bar:
            for batch_rows in rows:
                fresh = list({row["path"]: row for row in batch_rows if row["path"] not in shards.done}.values())
                shards.add(fresh)
                written += len(fresh)
                detections += sum(len(row["detections"]) for row in fresh)
                bar.update(len(fresh))
        shards.flush()
        errors = shards.errors
    seconds = time.perf_counter() - start
    return {"images": len(paths), "done_before": done_before, "written": written, "errors": errors,
            "detections": detections, "seconds": seconds, "images_per_s": written / seconds if seconds > 0 else 0.0}


def _engine_rows(engine: str, batches: List[List[str]], model: ModelSpec, *, readers: int,
                 ray: RayOptions) -> Iterator[List[dict]]:
    """The rows of each batch from the engine; nothing started when there is nothing to do."""
    if not batches:
        return
    if engine == "local":
        yield from local_rows(batches, model, readers=readers)
    else:
        from maskrcnn.batch.ray_engine import ray_rows
        yield from ray_rows(batches, model, **asdict(ray))
