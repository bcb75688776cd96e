"""Training order: an endless, seeded, rank-sharded stream of samples, and batches grouped by aspect ratio.

A sample is a key ``(index, augmentation_seed)`` that :class:`maskrcnn.data.coco.CocoDetection` accepts.
Both parts depend only on the run's seed and the sample's global position ``p`` in the stream (0, 1, 2,
... over all ranks), so a run resumed at any iteration sees exactly the data and augmentation that the
uninterrupted run would have seen:
- epoch ``e = p // size`` is a permutation of ``range(size)`` drawn from a generator seeded by
  ``(seed, e)``, the same on every rank;
- rank ``r`` of ``world_size`` takes the positions ``p = r, r + world_size, r + 2 * world_size, ...``.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import numpy as np

from maskrcnn.config import DataConfig
from maskrcnn.errors import InputError

_PERMUTATION_STREAM = 0  # seed-sequence tags keeping the epoch order and the augmentation seeds independent
_AUGMENTATION_STREAM = 1


class TrainingSampler:
    """Endless stream of ``(index, augmentation_seed)`` for this rank.

    size: dataset length. seed: run seed. rank, world_size: this process's shard. start: number of this
    rank's samples already consumed; the stream starts after them without generating them.
    augmentation_seed is a 64-bit int fixed by ``(seed, global position)``.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if size <= 0:
            raise InputError(f"cannot sample from an empty dataset (size={size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"start must be non-negative, got {start}")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        position = self.start * self.world_size + self.rank
        epoch, permutation = -1, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                permutation = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch]).permutation(self.size)
            seed = np.random.SeedSequence([self.seed, _AUGMENTATION_STREAM, position]).generate_state(1, np.uint64)
            yield int(permutation[position % self.size]), int(seed[0])
            position += self.world_size


class GroupedBatchSampler:
    """Batches of ``batch_size`` samples that all share a group id, in stream order.

    sampler: iterable of ``(index, augmentation_seed)`` keys. group_ids: group per dataset index (here the
    aspect-ratio bin of :func:`aspect_ratio_group_ids`). Each sample waits in its group's buffer until the
    buffer holds a full batch. start: number of batches to skip; they are replayed from the
    beginning of the stream (no image is read), so the buffers are exactly as in the uninterrupted run.
    """

    def __init__(self, sampler, group_ids: Sequence[int], batch_size: int, start: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler, self.group_ids = sampler, np.asarray(group_ids)
        self.batch_size, self.start = batch_size, start

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        buffers = {}
        emitted = 0
        for key in self.sampler:
            buffer = buffers.setdefault(int(self.group_ids[key[0]]), [])
            buffer.append(key)
            if len(buffer) == self.batch_size:
                if emitted >= self.start:
                    yield buffer[:]
                emitted += 1
                buffer.clear()


def aspect_ratio_group_ids(image_sizes: Sequence[Tuple[int, int]],
                           num_groups: int = DataConfig.aspect_ratio_groups) -> np.ndarray:
    """``(N,)`` int64 group ids from per-image ``(height, width)``: the bin of ``log2(width / height)``
    among ``num_groups`` equal bins over aspect ratios 2 (wide) to 1/2 (tall), the outer bins open-ended.

    Group 0 holds the widest images. With 2 groups: 0 if width >= height (landscape or square), else 1.
    More groups pad less: a batch is padded to its largest height and width, so images of one shape class
    waste fewer pixels together.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be at least 1, got {num_groups}")
    sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
    ratios = np.log2(sizes[:, 1] / sizes[:, 0])
    edges = np.linspace(1.0, -1.0, num_groups + 1)[1:-1]  # descending inner bin edges
    return (ratios[:, None] < edges[None, :]).sum(axis=1).astype(np.int64)
