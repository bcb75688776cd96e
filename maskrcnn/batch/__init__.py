"""Batch inference over very many images, resumable, with one row per image in Parquet or JSONL shards.

- :mod:`.sources`: which images (a folder, a glob, a text file of paths, a Parquet path column);
- :mod:`.rows`: the one place a batch of images becomes rows (the predictor, masks as COCO RLE);
- :mod:`.local` and :mod:`.ray_engine`: the engines that run the batches (this process, or Ray Data actors);
- :mod:`.shards`: the output folder, written shard by shard, atomically, and read back;
- :mod:`.job`: :func:`predict_batch`, what ``tools/predict_batch.py`` runs.
"""

from maskrcnn.batch.job import BATCH_SIZE, ENGINES, RayOptions, predict_batch
from maskrcnn.batch.rows import ModelSpec
from maskrcnn.batch.shards import FORMATS, SHARD_SIZE, read_rows
from maskrcnn.batch.sources import list_inputs

__all__ = ["predict_batch", "RayOptions", "ModelSpec", "list_inputs", "read_rows", "BATCH_SIZE", "ENGINES",
           "FORMATS", "SHARD_SIZE"]
