"""The local engine: the batches through one predictor in this process, images decoded ahead by threads."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Sequence

from maskrcnn.batch.rows import LoadedImage, ModelSpec, image_rows, load_image

READERS = 2  # threads decoding images while the model runs (OpenCV's decoders release the GIL)
READ_AHEAD = 2  # batches decoded ahead of the one the model runs: memory holds at most this many more


def local_rows(batches: Sequence[Sequence[str]], model: ModelSpec, *, readers: int = READERS) -> Iterator[List[dict]]:
    """Rows of each batch of image paths, batch after batch, in order."""
    predictor = model.build()
    for images in read_ahead(batches, readers=readers):
        yield image_rows(predictor, images)


def read_ahead(batches: Sequence[Sequence[str]], *, readers: int = READERS,
               depth: int = READ_AHEAD) -> Iterator[List[LoadedImage]]:
    """Each batch's images, decoded by ``readers`` threads up to ``depth`` batches ahead of the consumer."""
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="read") as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append([pool.submit(load_image, path) for path in batch])
            if len(pending) > depth:
                yield [future.result() for future in pending.popleft()]
        while pending:
            yield [future.result() for future in pending.popleft()]
