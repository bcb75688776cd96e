"""Datasets from the configuration and the endless, resumable training loader.

A batch is ``(images, targets)``: ``images`` a list of ``(3, H, W)`` float32 RGB tensors in [0, 1] whose
sizes may differ (the model pads them), ``targets`` the matching list of target dicts (see
:mod:`maskrcnn.data.coco`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Tuple

import cv2
import torch
from torch.utils.data import BatchSampler, DataLoader

from maskrcnn.config import Config, DataConfig
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.copy_paste import CopyPaste
from maskrcnn.data.samplers import GroupedBatchSampler, TrainingSampler, aspect_ratio_group_ids
from maskrcnn.data.transforms import Compose, build_transforms
from maskrcnn.errors import InputError


def build_train_dataset(cfg: Config) -> CocoDetection:
    """The training set of ``cfg.data`` with the training augmentation of ``cfg``: the transforms of
    :func:`~maskrcnn.data.transforms.build_transforms`, then, with ``data.copy_paste``, instances pasted from
    another image of this set that went through the same transforms
    (:class:`~maskrcnn.data.copy_paste.CopyPaste`); and the repeat factors of
    ``data.repeat_factor_threshold`` for the sampler."""
    dataset = CocoDetection(cfg.data.train_ann, cfg.data.train_images, transforms=build_transforms(cfg, train=True),
                            skip_bad_annotations=cfg.data.skip_bad_annotations, cache=cfg.data.annotation_cache,
                            cache_dir=cfg.data.annotation_cache_dir,
                            repeat_factor_threshold=cfg.data.repeat_factor_threshold)
    if cfg.data.filter_empty:
        dataset.drop_empty()
    if cfg.data.copy_paste:
        per_image = dataset.transforms
        dataset.transforms = Compose([*per_image.transforms, CopyPaste(dataset, per_image)])
    return dataset


def build_test_dataset(cfg: Config) -> CocoDetection:
    """The validation set of ``cfg.data``, every image kept, no transform (the model resizes)."""
    return CocoDetection(cfg.data.val_ann, cfg.data.val_images, transforms=build_transforms(cfg, train=False),
                         skip_bad_annotations=cfg.data.skip_bad_annotations, cache=cfg.data.annotation_cache,
                         cache_dir=cfg.data.annotation_cache_dir)


def build_train_loader(dataset: CocoDetection, *, images_per_batch: int, seed: int, rank: int = 0,
                       world_size: int = 1, start_iter: int = 0, num_workers: int = DataConfig.num_workers,
                       aspect_ratio_grouping: bool = DataConfig.aspect_ratio_grouping,
                       aspect_ratio_groups: int = DataConfig.aspect_ratio_groups
                       ) -> Iterator[Tuple[List[torch.Tensor], List[dict]]]:
    """Endless iterator over this rank's training batches.

    images_per_batch: images per iteration summed over the ``world_size`` ranks (each rank gets
    ``images_per_batch // world_size``). seed: fixes the order and the augmentation. start_iter: batches
    already consumed (when resuming); the iterator yields exactly what the uninterrupted run would yield
    from there. With ``aspect_ratio_grouping`` a batch holds images of one of ``aspect_ratio_groups``
    aspect-ratio bins only (see :func:`~maskrcnn.data.samplers.aspect_ratio_group_ids`; 2: landscape or
    portrait), judged from the json sizes. Images are drawn as often as ``dataset.repeat_factors()`` says
    (see :class:`~maskrcnn.data.samplers.TrainingSampler`). The augmentation runs in the ``num_workers``
    worker processes (0 loads in this process), and the result is the same for any number of them.
    """
    if images_per_batch <= 0 or images_per_batch % world_size:
        raise InputError(f"images_per_batch={images_per_batch} must be a positive multiple of "
                         f"world_size={world_size}")
    per_rank = images_per_batch // world_size
    repeat_factors = dataset.repeat_factors()
    if aspect_ratio_grouping:
        sampler = TrainingSampler(len(dataset), seed, rank=rank, world_size=world_size, repeat_factors=repeat_factors)
        groups = aspect_ratio_group_ids(dataset.image_sizes, aspect_ratio_groups)
        batches = GroupedBatchSampler(sampler, groups, per_rank, start=start_iter)
    else:
        sampler = TrainingSampler(len(dataset), seed, rank=rank, world_size=world_size, start=start_iter * per_rank,
                                  repeat_factors=repeat_factors)
        batches = BatchSampler(sampler, per_rank, drop_last=True)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                        worker_init_fn=_single_threaded_worker if num_workers else None,
                        persistent_workers=num_workers > 0)
    with workers_fork_safely():
        return iter(loader)


def collate(batch: List[Tuple[torch.Tensor, dict]]) -> Tuple[List[torch.Tensor], List[dict]]:
    """Samples -> ``(images, targets)`` lists; images keep their own sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


@contextmanager
def workers_fork_safely() -> Iterator[None]:
    """Start loader workers (``iter(loader)``) inside this: OpenCV's thread pool is parked (one thread) while
    they fork, then restored.

    A fork copies the caller's locks and condition variables but not its threads: once OpenCV's pool has run
    (a large resize or decode, in any thread), a forked worker that reconfigures or uses that pool waits
    forever on threads that do not exist in it.
    """
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def _single_threaded_worker(worker_id: int) -> None:
    """Each loader worker decodes and resizes on one thread; the workers are the parallelism."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
