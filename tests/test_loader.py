import copy
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.config import Config
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.loader import build_test_dataset, build_train_dataset, build_train_loader, collate
from maskrcnn.data.samplers import GroupedBatchSampler, TrainingSampler, aspect_ratio_group_ids
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.engine.trainer import train
from maskrcnn.structures import PolygonMasks
from test_trainer import read_jsonl, tiny_config


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(out, num_train=20, num_val=3, seed=0, min_size=48, max_size=96)
    cfg = Config()
    cfg.data.train_ann = str(out / "annotations" / "instances_train.json")
    cfg.data.train_images = str(out / "train")
    cfg.data.val_ann = str(out / "annotations" / "instances_val.json")
    cfg.data.val_images = str(out / "val")
    cfg.model.input.min_size = [48, 64, 80]
    cfg.model.input.max_size = 120
    return cfg


def _take(iterable, n):
    return list(islice(iterable, n))


# ---------------------------------------------------------------- samplers


def test_sampler_is_deterministic_from_the_seed():
    assert _take(TrainingSampler(10, seed=3), 25) == _take(TrainingSampler(10, seed=3), 25)
    assert _take(TrainingSampler(10, seed=3), 25) != _take(TrainingSampler(10, seed=4), 25)


def test_each_epoch_is_a_fresh_permutation():
    indices = [index for index, _ in _take(TrainingSampler(7, seed=0), 21)]
    epochs = [indices[i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(epoch) == list(range(7)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3


def test_augmentation_seeds_are_distinct():
    seeds = [seed for _, seed in _take(TrainingSampler(5, seed=0), 50)]
    assert len(set(seeds)) == 50


@pytest.mark.parametrize("start", [1, 7, 23])
def test_sampler_start_resumes_the_same_stream(start):
    full = _take(TrainingSampler(10, seed=1, rank=1, world_size=3), start + 12)
    assert _take(TrainingSampler(10, seed=1, rank=1, world_size=3, start=start), 12) == full[start:]


def test_ranks_take_interleaved_positions_of_the_global_stream():
    world = _take(TrainingSampler(12, seed=5), 36)
    for rank in range(3):
        assert _take(TrainingSampler(12, seed=5, rank=rank, world_size=3), 12) == world[rank::3]


def test_ranks_cover_disjoint_indices_within_an_epoch():
    shards = [{index for index, _ in _take(TrainingSampler(12, seed=5, rank=rank, world_size=4), 3)}
              for rank in range(4)]
    assert set.union(*shards) == set(range(12))
    assert sum(len(shard) for shard in shards) == 12


def test_grouped_batches_are_homogeneous_and_keep_stream_order():
    sizes = [(10, 20), (20, 10), (15, 15), (30, 10), (5, 40), (40, 5), (8, 9)]
    groups = aspect_ratio_group_ids(sizes)
    assert groups.tolist() == [0, 1, 0, 1, 0, 1, 0]
    stream = _take(TrainingSampler(len(sizes), seed=2), 200)
    batches = _take(GroupedBatchSampler(TrainingSampler(len(sizes), seed=2), groups, 3), 40)
    for batch in batches:
        assert len(batch) == 3 and len({groups[index] for index, _ in batch}) == 1
    for group in (0, 1):
        in_group = [key for key in stream if groups[key[0]] == group]
        batched = [key for batch in batches if groups[batch[0][0]] == group for key in batch]
        assert batched == in_group[:len(batched)]


def test_aspect_ratio_bins_run_from_wide_to_tall():
    # (height, width): ratios 4, 2, 1.3, 1, 0.77, 0.5, 0.25; 4 bins over 2..1/2 have inner edges at
    # ratios 1.41, 1 and 0.71, and the outer bins take everything beyond 2 and 1/2.
    sizes = [(10, 40), (10, 20), (10, 13), (10, 10), (13, 10), (20, 10), (40, 10)]
    assert aspect_ratio_group_ids(sizes, 4).tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert aspect_ratio_group_ids(sizes, 1).tolist() == [0] * 7
    with pytest.raises(ValueError, match="num_groups"):
        aspect_ratio_group_ids(sizes, 0)


def test_more_aspect_ratio_groups_pad_less(tmp_path):
    """What finer groups buy: after the resize to shorter side 128 (longer at most 256), batches of the
    shapes data padded to their largest height and width (a multiple of 32) hold fewer pixels."""
    generate_shapes(tmp_path, num_train=300, num_val=1, seed=0, min_size=64, max_size=128)
    dataset = CocoDetection(str(tmp_path / "annotations" / "instances_train.json"), str(tmp_path / "train"))
    sizes = dataset.image_sizes

    def resized(height, width):
        scale = min(128 / min(height, width), 256 / max(height, width))
        return round(height * scale), round(width * scale)

    def padded_pixels(groups):
        stream = GroupedBatchSampler(TrainingSampler(len(sizes), seed=0), aspect_ratio_group_ids(sizes, groups), 8)
        total = 0
        for batch in _take(stream, 100):
            heights, widths = zip(*(resized(*sizes[index]) for index, _ in batch))
            total += len(batch) * (-(-max(heights) // 32) * 32) * (-(-max(widths) // 32) * 32)
        return total

    one, two, six = padded_pixels(1), padded_pixels(2), padded_pixels(6)
    assert six < 0.9 * two < 0.9 * 0.9 * one, (one, two, six)


def test_grouped_batch_sampler_start_skips_batches():
    groups = aspect_ratio_group_ids([(10, 20), (20, 10), (15, 15), (30, 10), (5, 40)])
    full = _take(GroupedBatchSampler(TrainingSampler(5, seed=0), groups, 2), 15)
    assert _take(GroupedBatchSampler(TrainingSampler(5, seed=0), groups, 2, start=6), 9) == full[6:]


# ---------------------------------------------------------------- datasets and loader


def test_datasets_from_config(cfg):
    train = build_train_dataset(cfg)
    test = build_test_dataset(cfg)
    assert train.transforms is not None and len(train.transforms.transforms) == 2
    assert test.transforms.transforms == []
    assert len(test) == 3
    every = CocoDetection(cfg.data.train_ann, cfg.data.train_images)
    assert set(train.image_ids) < set(every.image_ids)
    assert all(len(every[every.image_ids.index(i)][1]["boxes"]) for i in train.image_ids)
    unfiltered = copy.deepcopy(cfg)
    unfiltered.data.filter_empty = False
    assert build_train_dataset(unfiltered).image_ids == every.image_ids


def test_collate_keeps_images_of_different_sizes():
    images = [torch.zeros(3, 4, 5), torch.zeros(3, 6, 2)]
    targets = [{"image_id": 1}, {"image_id": 2}]
    batch_images, batch_targets = collate(list(zip(images, targets)))
    assert [tuple(i.shape) for i in batch_images] == [(3, 4, 5), (3, 6, 2)]
    assert batch_targets == targets


def _same_batch(a, b):
    images_a, targets_a = a
    images_b, targets_b = b
    assert len(images_a) == len(images_b)
    for x, y in zip(images_a, images_b):
        assert torch.equal(x, y)
    for s, t in zip(targets_a, targets_b):
        assert s["image_id"] == t["image_id"]
        for key in ("boxes", "labels", "crowd_boxes"):
            assert torch.equal(s[key], t[key])
        assert type(s["masks"]) is type(t["masks"])
        if isinstance(s["masks"], PolygonMasks):
            for p, q in zip(s["masks"].polygons, t["masks"].polygons):
                assert all(np.array_equal(u, v) for u, v in zip(p, q))
        else:
            assert torch.equal(s["masks"].tensor, t["masks"].tensor)


LITTLE_DATA = {"scale_jitter": [0.5, 1.5], "copy_paste": True, "repeat_factor_threshold": 0.5}


@pytest.mark.parametrize("little_data", [pytest.param(False, id="plain"),
                                         pytest.param(True, id="jitter_paste_repeat", marks=pytest.mark.slow)])
def test_loader_with_workers_matches_in_process_loading(cfg, tmp_path, little_data):
    """Workers deliver the batches in-process loading does, the augmentation (copy-paste's second image
    included) done in them. The workers fork in a fresh process: a fork of this test process would inherit
    the thread pools that earlier tests left running."""
    settings = LITTLE_DATA if little_data else {}
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from maskrcnn.config import Config
from maskrcnn.data.loader import build_train_dataset, build_train_loader
from test_loader import _same_batch, _take

if __name__ == "__main__":
    cfg = Config()
    cfg.data.train_ann, cfg.data.train_images = {cfg.data.train_ann!r}, {cfg.data.train_images!r}
    cfg.model.input.min_size, cfg.model.input.max_size = {list(cfg.model.input.min_size)!r}, {cfg.model.input.max_size!r}
    for key, value in {settings!r}.items():
        setattr(cfg.data, key, value)
    dataset = build_train_dataset(cfg)
    serial = _take(build_train_loader(dataset, images_per_batch=2, seed=7, num_workers=0), 6)
    parallel = _take(build_train_loader(dataset, images_per_batch=2, seed=7, num_workers=2), 6)
    for a, b in zip(serial, parallel):
        _same_batch(a, b)
    print(len(parallel))
"""
    (tmp_path / "workers.py").write_text(script)
    done = subprocess.run([sys.executable, str(tmp_path / "workers.py")], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "6"
    if little_data:
        return
    dataset = build_train_dataset(cfg)
    serial = _take(build_train_loader(dataset, images_per_batch=2, seed=7, num_workers=0), 6)
    for images, targets in serial:
        orientations = {image.shape[2] >= image.shape[1] for image in images}
        assert len(orientations) == 1
        for image, target in zip(images, targets):
            assert target["masks"].image_size == tuple(image.shape[1:])
            assert min(image.shape[1:]) in cfg.model.input.min_size or max(image.shape[1:]) == 120


@pytest.mark.parametrize("little_data", [False, True], ids=["plain", "jitter_paste_repeat"])
@pytest.mark.parametrize("grouping", [True, False])
def test_loader_resumes_exactly_at_start_iter(cfg, grouping, little_data):
    """Resumed past the first epoch, the batches are those of the uninterrupted run, augmentation included."""
    cfg = copy.deepcopy(cfg)
    for key, value in (LITTLE_DATA if little_data else {}).items():
        setattr(cfg.data, key, value)
    dataset = build_train_dataset(cfg)
    assert (dataset.repeat_factors() is not None) == little_data
    full = _take(build_train_loader(dataset, images_per_batch=2, seed=1, num_workers=0,
                                    aspect_ratio_grouping=grouping), 16)
    resumed = _take(build_train_loader(dataset, images_per_batch=2, seed=1, num_workers=0, start_iter=13,
                                       aspect_ratio_grouping=grouping), 3)
    for a, b in zip(full[13:], resumed):
        _same_batch(a, b)


def test_loader_seed_changes_the_batches(cfg):
    dataset = build_train_dataset(cfg)
    ids = [[t["image_id"] for t in targets]
           for seed in (0, 1) for _, targets in _take(build_train_loader(dataset, images_per_batch=2, seed=seed,
                                                                           num_workers=0), 4)]
    assert ids[:4] != ids[4:]


def test_loader_splits_the_batch_between_ranks(cfg):
    dataset = build_train_dataset(cfg)
    images, targets = next(build_train_loader(dataset, images_per_batch=4, seed=0, rank=1, world_size=2,
                                              num_workers=0, aspect_ratio_grouping=False))
    assert len(images) == len(targets) == 2
    with pytest.raises(ValueError, match="multiple of world_size"):
        build_train_loader(dataset, images_per_batch=3, seed=0, world_size=2)


@pytest.mark.slow
def test_training_runs_with_jitter_copy_paste_and_repeat_factors(tmp_path):
    """A few iterations of the trainer with the three options for little data on: the losses are finite."""
    generate_shapes(tmp_path / "data", num_train=6, num_val=1, seed=0, min_size=64, max_size=96, rare_fraction=0.2)
    cfg = tiny_config(tmp_path / "data", tmp_path / "out", "solver.max_iter=3", "data.scale_jitter=[0.5,1.5]",
                      "data.copy_paste=true", "data.repeat_factor_threshold=0.5")
    assert build_train_dataset(cfg).repeat_factors().max() > 1
    train(cfg)
    records = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["total_loss"]) for r in records)
