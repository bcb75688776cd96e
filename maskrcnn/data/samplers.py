"""Training order: an endless, seeded, rank-sharded stream of samples, and batches grouped by aspect ratio.

Shorthand: N images in the dataset, E the length of one epoch of the stream (N, or more with repeat factors).

A sample is a key ``(index, augmentation_seed)`` that :class:`maskrcnn.data.coco.CocoDetection` accepts.
Both parts depend only on the run's seed and the sample's global position ``p`` in the stream (0, 1, 2,
... over all ranks), so a run resumed at any iteration sees exactly the data and augmentation that the
uninterrupted run would have seen:
- epoch ``e`` is a permutation of ``range(N)`` drawn from a generator seeded by ``(seed, e)``, the same on
  every rank; with repeat factors (:func:`repeat_factors_from_category_frequency`) it is a permutation of
  the indices each repeated its factor's floor or ceiling times, the ceiling with probability the factor's
  fractional part (stochastic rounding, from a second generator seeded by ``(seed, e)``), so epochs differ
  in length and epoch ``e`` starts after the lengths of epochs ``0 .. e - 1``;
- rank ``r`` of ``world_size`` takes the positions ``p = r, r + world_size, r + 2 * world_size, ...``.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from maskrcnn.config import DataConfig
from maskrcnn.errors import InputError

_PERMUTATION_STREAM = 0  # seed-sequence tags keeping the epoch order, the augmentation seeds and the
_AUGMENTATION_STREAM = 1  # rounding of repeat factors independent
_REPEAT_STREAM = 2


class TrainingSampler:
    """Endless stream of ``(index, augmentation_seed)`` for this rank.

    size: dataset length N. seed: run seed. rank, world_size: this process's shard. start: number of this
    rank's samples already consumed; the stream starts after them without reading an image (with repeat
    factors, the lengths of the epochs before are drawn again: N random numbers per epoch).
    repeat_factors: ``(N,)`` float, each >= 1, the mean number of times an epoch holds each index (see the
    module docstring); None: each index once.
    augmentation_seed is a 64-bit int fixed by ``(seed, global position)``.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 repeat_factors: Optional[Sequence[float]] = None):
        if size <= 0:
            raise InputError(f"cannot sample from an empty dataset (size={size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"start must be non-negative, got {start}")
        if repeat_factors is not None:
            repeat_factors = np.asarray(repeat_factors, dtype=np.float64)
            if repeat_factors.shape != (size,) or not np.all((repeat_factors >= 1) & np.isfinite(repeat_factors)):
                raise ValueError(f"repeat_factors must be {size} finite values >= 1, got shape "
                                 f"{repeat_factors.shape}, smallest {repeat_factors.min(initial=np.inf)}")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start
        self.repeat_factors = repeat_factors

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        position = self.start * self.world_size + self.rank
        epoch, epoch_start, length = 0, 0, self._epoch_length(0)
        while position >= epoch_start + length:  # the epochs before the start: their lengths only
            epoch, epoch_start = epoch + 1, epoch_start + length
            length = self._epoch_length(epoch)
        order = self.epoch(epoch)
        while True:
            if position >= epoch_start + len(order):
                epoch_start += len(order)
                epoch += 1
                order = self.epoch(epoch)
            seed = np.random.SeedSequence([self.seed, _AUGMENTATION_STREAM, position]).generate_state(1, np.uint64)
            yield int(order[position - epoch_start]), int(seed[0])
            position += self.world_size

    def epoch(self, epoch: int) -> np.ndarray:
        """``(E,)`` int64: the dataset indices of epoch ``epoch`` of the stream, in order (all ranks)."""
        order = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
        if self.repeat_factors is None:
            return order.permutation(self.size)
        indices = np.repeat(np.arange(self.size), self._repeats(epoch))
        return indices[order.permutation(len(indices))]

    def _repeats(self, epoch: int) -> np.ndarray:
        """``(N,)`` int64: how many times epoch ``epoch`` holds each index (the repeat factors rounded)."""
        whole = np.floor(self.repeat_factors)
        draws = np.random.default_rng([self.seed, _REPEAT_STREAM, epoch]).random(self.size)
        return (whole + (draws < self.repeat_factors - whole)).astype(np.int64)

    def _epoch_length(self, epoch: int) -> int:
        return self.size if self.repeat_factors is None else int(self._repeats(epoch).sum())


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


def repeat_factors_from_category_frequency(image_labels: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """``(N,)`` float64 repeat factors of N images, as Detectron2 and LVIS define them (Gupta et al., 2019).

    image_labels: per image, the ``(M,)`` labels of its instances (crowd regions left out). threshold: ``t``,
    a fraction of images. With ``f_c`` the fraction of the N images holding category ``c``, the category's
    factor is ``r_c = max(1, sqrt(t / f_c))``, and an image's is the largest ``r_c`` among its categories
    (1 for an image with none): images holding a category rarer than ``t`` are seen more often.
    """
    if not 0 < threshold < np.inf:
        raise ValueError(f"the repeat-factor threshold must be a positive fraction of images, got {threshold}")
    # (image, category) pairs, each once
    images = np.repeat(np.arange(len(image_labels)), [len(labels) for labels in image_labels])
    labels = np.concatenate([np.asarray(labels, dtype=np.int64) for labels in image_labels] + [np.zeros(0, np.int64)])
    pairs = np.unique(np.stack([images, labels], axis=1), axis=0)
    categories, images_holding = np.unique(pairs[:, 1], return_counts=True)
    category_factor = np.maximum(1.0, np.sqrt(threshold / (images_holding / len(image_labels))))
    factors = np.ones(len(image_labels), dtype=np.float64)
    np.maximum.at(factors, pairs[:, 0], category_factor[np.searchsorted(categories, pairs[:, 1])])
    return factors
