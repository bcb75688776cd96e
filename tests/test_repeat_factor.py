"""Repeat-factor sampling: the LVIS factors on a hand-made dataset, the sampler's epochs, determinism,
resumption from ``start``, rank shards, batches grouped by aspect ratio, and the loader's use of them (its
resumption with them: tests/test_loader.py)."""

import json
import math
from itertools import islice

import cv2
import numpy as np
import pytest

from maskrcnn.config import Config
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.loader import build_train_dataset, build_train_loader
from maskrcnn.data.samplers import (GroupedBatchSampler, TrainingSampler, aspect_ratio_group_ids,
                                    repeat_factors_from_category_frequency)
from maskrcnn.errors import InputError
from test_loader import _take

FACTORS = np.array([1.0, 2.5, 1.0, 1.2, 3.0, 1.0, 1.7])


def _dataset(root):
    """Ten 20 x 20 images; category 1 in eight of them, category 2 in two, category 3 in one (and as a crowd
    in another, which does not count); image 10 has no instance. Image 1 holds all three."""
    images = root / "images"
    images.mkdir()
    holding = {1: [1, 2, 3], 2: [1, 2], 3: [1], 4: [1], 5: [1], 6: [1], 7: [1], 8: [1, 1], 9: [], 10: []}
    annotations = []
    for image_id, categories in holding.items():
        cv2.imwrite(str(images / f"{image_id}.png"), np.zeros((20, 20, 3), np.uint8))
        for category in categories:
            annotations.append({"image_id": image_id, "category_id": category, "iscrowd": 0, "bbox": [2, 2, 6, 6],
                                "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]], "area": 36.0})
    annotations.append({"image_id": 9, "category_id": 3, "iscrowd": 1, "bbox": [2, 2, 6, 6], "area": 36.0,
                        "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]})
    for n, annotation in enumerate(annotations):
        annotation["id"] = n + 1
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": 20, "width": 20} for i in holding],
            "annotations": annotations, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json", images


def test_factors_match_the_hand_computed_ones(tmp_path):
    ann, images = _dataset(tmp_path)
    every = CocoDetection(ann, images, repeat_factor_threshold=0.3)
    # f_1 = 0.8, f_2 = 0.2, f_3 = 0.1 of 10 images: r_1 = 1, r_2 = sqrt(1.5), r_3 = sqrt(3)
    expected = [math.sqrt(3), math.sqrt(1.5)] + [1.0] * 8
    assert every.repeat_factors() == pytest.approx(expected, abs=1e-12)
    every.drop_empty()  # 8 images left: f_2 = 0.25, f_3 = 0.125
    assert every.repeat_factors() == pytest.approx([math.sqrt(2.4), math.sqrt(1.2)] + [1.0] * 6, abs=1e-12)
    assert CocoDetection(ann, images).repeat_factors() is None


def test_factor_function_on_labels():
    labels = [np.array([1, 1, 2]), np.array([1]), np.array([], dtype=np.int64), np.array([3, 1])]
    assert repeat_factors_from_category_frequency(labels, 0.5) == pytest.approx([math.sqrt(2), 1, 1, math.sqrt(2)])
    assert repeat_factors_from_category_frequency(labels, 0.01).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors_from_category_frequency(labels, 0.0)


def test_negative_threshold_is_rejected(tmp_path):
    ann, images = _dataset(tmp_path)
    with pytest.raises(InputError, match="data.repeat_factor_threshold"):
        CocoDetection(ann, images, repeat_factor_threshold=-0.1)
    with pytest.raises(ValueError, match="repeat_factors"):
        TrainingSampler(3, seed=0, repeat_factors=[1.0, 0.5, 2.0])
    with pytest.raises(ValueError, match="repeat_factors"):
        TrainingSampler(3, seed=0, repeat_factors=[1.0, 2.0])


def test_each_epoch_rounds_every_factor_down_or_up():
    sampler = TrainingSampler(len(FACTORS), seed=4, repeat_factors=FACTORS)
    totals = np.zeros(len(FACTORS))
    epochs = 2000
    for epoch in range(epochs):
        counts = np.bincount(sampler.epoch(epoch), minlength=len(FACTORS))
        assert ((counts == np.floor(FACTORS)) | (counts == np.ceil(FACTORS))).all()
        totals += counts
    # the mean count is the factor: its standard error is at most 0.5 / sqrt(2000) = 0.011
    assert totals / epochs == pytest.approx(FACTORS, abs=0.05)


def test_stream_follows_its_epochs_and_is_fixed_by_seed():
    stream = [index for index, _ in _take(TrainingSampler(len(FACTORS), seed=4, repeat_factors=FACTORS), 200)]
    sampler = TrainingSampler(len(FACTORS), seed=4, repeat_factors=FACTORS)
    epochs = np.concatenate([sampler.epoch(e) for e in range(40)])
    assert stream == epochs[:200].tolist()
    assert len({len(sampler.epoch(e)) for e in range(40)}) > 1  # epochs differ in length
    again = [index for index, _ in _take(TrainingSampler(len(FACTORS), seed=4, repeat_factors=FACTORS), 200)]
    other = [index for index, _ in _take(TrainingSampler(len(FACTORS), seed=5, repeat_factors=FACTORS), 200)]
    assert again == stream and other != stream


def test_factors_of_one_give_the_plain_stream():
    plain = _take(TrainingSampler(9, seed=2, rank=1, world_size=2, start=5), 40)
    assert _take(TrainingSampler(9, seed=2, rank=1, world_size=2, start=5, repeat_factors=np.ones(9)), 40) == plain


@pytest.mark.parametrize("start", [0, 1, 7, 23, 101])
def test_start_resumes_the_same_stream(start):
    def sampler(start=0):
        return TrainingSampler(len(FACTORS), seed=1, rank=1, world_size=3, start=start, repeat_factors=FACTORS)

    full = _take(sampler(), start + 15)
    assert _take(sampler(start), 15) == full[start:]


def test_rank_shards_are_disjoint_and_cover_the_stream():
    world = _take(TrainingSampler(len(FACTORS), seed=6, repeat_factors=FACTORS), 60)
    shards = [_take(TrainingSampler(len(FACTORS), seed=6, rank=rank, world_size=4, repeat_factors=FACTORS), 15)
              for rank in range(4)]
    for rank, shard in enumerate(shards):
        assert shard == world[rank::4]
    seeds = [seed for shard in shards for _, seed in shard]  # a seed marks a global position
    assert sorted(seeds) == sorted(seed for _, seed in world) and len(set(seeds)) == 60


def test_grouped_batches_resume_with_repeat_factors():
    sizes = [(10, 20), (20, 10), (15, 15), (10, 30), (30, 10), (12, 10), (10, 12)]
    groups = aspect_ratio_group_ids(sizes)

    def batches(start=0):
        sampler = TrainingSampler(len(sizes), seed=3, rank=1, world_size=2, repeat_factors=FACTORS)
        return GroupedBatchSampler(sampler, groups, 2, start=start)

    full = _take(batches(), 30)
    assert _take(batches(start=11), 19) == full[11:]
    assert all(len({groups[index] for index, _ in batch}) == 1 for batch in full)


@pytest.fixture(scope="module")
def long_tailed_cfg(tmp_path_factory):
    from maskrcnn.data.shapes import generate_shapes

    root = tmp_path_factory.mktemp("long_tailed")
    generate_shapes(root, num_train=24, num_val=1, seed=0, min_size=40, max_size=64, rare_fraction=0.1)
    cfg = Config()
    cfg.data.train_ann = str(root / "annotations" / "instances_train.json")
    cfg.data.train_images = str(root / "train")
    cfg.model.input.min_size = [40]
    cfg.model.input.max_size = 64
    cfg.data.repeat_factor_threshold = 0.5
    return cfg


def test_loader_draws_with_the_datasets_factors(long_tailed_cfg):
    dataset = build_train_dataset(long_tailed_cfg)
    factors = dataset.repeat_factors()
    assert factors.max() > 1.0 and factors.min() == 1.0
    batches = _take(build_train_loader(dataset, images_per_batch=2, seed=3, num_workers=0,
                                       aspect_ratio_grouping=False), 20)
    drawn = [target["image_id"] for _, targets in batches for target in targets]
    expected = [dataset.image_ids[index] for index, _ in _take(TrainingSampler(len(dataset), 3, repeat_factors=factors),
                                                               40)]
    assert drawn == expected
