"""The Ray Data engine: the batches as a dataset, each through a pool of actors that load the model once.

Imported only when a job runs on Ray: the local engine never imports ``ray``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator, List, Optional, Sequence

import pyarrow as pa

from maskrcnn.batch.rows import ModelSpec, image_rows, load_image, rows_to_table
from maskrcnn.errors import MissingPackageError

try:
    import ray
    import ray.data
except ImportError:
    raise MissingPackageError("--engine ray needs Ray Data: pip install 'ray[data]'") from None


class BatchPredictor:
    """The ``map_batches`` function: each actor builds the predictor once, then turns batches of paths into
    rows. Images are read and masks encoded in the actor: only the rows (masks as RLE) leave it."""

    def __init__(self, model: ModelSpec):
        self.predictor = model.build()

    def __call__(self, batches: pa.Table) -> pa.Table:
        rows = [row for paths in batches.column("paths").to_pylist()
                for row in image_rows(self.predictor, [load_image(path) for path in paths])]
        return rows_to_table(rows)


def ray_rows(batches: Sequence[Sequence[str]], model: ModelSpec, *, address: Optional[str], actors: int,
             cpus_per_actor: float, gpus_per_actor: float) -> Iterator[List[dict]]:
    """Rows of the batches of image paths, as the actors finish them (in no fixed order); the options are
    :class:`maskrcnn.batch.job.RayOptions`. A batch is one dataset row, so that each goes through the model
    as it does on the local engine."""
    started = not ray.is_initialized()
    if started:
        where = {"address": address} if address else {"_node_ip_address": "127.0.0.1"}
        ray.init(include_dashboard=False, **where)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # the job's own bar counts images
        if model.onnx is not None and model.threads is None:
            model = replace(model, threads=max(1, int(cpus_per_actor)))
        resources = {"num_cpus": cpus_per_actor}
        if gpus_per_actor:
            resources["num_gpus"] = gpus_per_actor
        dataset = ray.data.from_items([{"paths": list(batch)} for batch in batches]).map_batches(
            BatchPredictor, fn_constructor_kwargs={"model": model}, batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors), **resources)
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield table.to_pylist()
    finally:
        if started:
            ray.shutdown()
