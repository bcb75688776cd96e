"""Copy-paste: pasted pixels belong to exactly one instance, boxes are the tight boxes of what is left, covered
instances and crowd regions go, the draw is fixed by the seed; polygon and RLE data through the cache."""

import json
import pickle

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from maskrcnn.config import Config
from maskrcnn.data.copy_paste import MIN_VISIBLE, CopyPaste, paste_instances
from maskrcnn.data.loader import build_train_dataset
from maskrcnn.data.transforms import Compose, build_transforms
from maskrcnn.errors import InputError
from maskrcnn.structures import BitMasks, PolygonMasks
from test_coco_dataset import _tight_boxes

H, W = 40, 50


def _blocks(blocks, height=H, width=W):
    """(M, H, W) bool, mask m the rectangle ``blocks[m] = (y0, y1, x0, x1)``."""
    bits = torch.zeros((len(blocks), height, width), dtype=torch.bool)
    for m, (y0, y1, x0, x1) in enumerate(blocks):
        bits[m, y0:y1, x0:x1] = True
    return bits


def _target(bits, labels, crowd_boxes=()):
    return {"boxes": _tight_boxes(bits), "labels": torch.tensor(labels), "masks": BitMasks(bits),
            "crowd_boxes": torch.tensor(crowd_boxes, dtype=torch.float32).reshape(-1, 4), "image_id": 7,
            "orig_size": tuple(bits.shape[1:])}


def _images(height=H, width=W, source_height=H, source_width=W):
    """A dark destination and a bright source, both uint8 with distinct pixel values."""
    destination = np.random.default_rng(0).integers(0, 100, (height, width, 3), dtype=np.uint8)
    source = np.random.default_rng(1).integers(150, 256, (source_height, source_width, 3), dtype=np.uint8)
    return destination, source


def _check_invariants(image, out, destination_image, source_image, pasted_region):
    """Pasted pixels hold the source, belong to exactly one instance; boxes are tight; masks non-empty."""
    bits = out["masks"].tensor
    assert bits.shape[1:] == image.shape[:2]
    assert len(out["boxes"]) == len(out["labels"]) == len(bits)
    assert bits.flatten(1).any(1).all()
    assert torch.equal(out["boxes"], _tight_boxes(bits))
    owners = bits.sum(0)
    assert (owners[pasted_region] == 1).all()
    region = pasted_region.numpy()
    source_on_canvas = np.zeros_like(destination_image)
    rows, cols = min(image.shape[0], source_image.shape[0]), min(image.shape[1], source_image.shape[1])
    source_on_canvas[:rows, :cols] = source_image[:rows, :cols]
    assert np.array_equal(image[region], source_on_canvas[region])
    assert np.array_equal(image[~region], destination_image[~region])


def test_pasted_pixels_belong_to_the_pasted_instance_only():
    destination, source = _images()
    target = _target(_blocks([(0, 20, 0, 20), (25, 40, 30, 50)]), [1, 2])
    pasted_bits = _blocks([(10, 30, 10, 50)])
    image, out = paste_instances(destination, target, source, {"masks": BitMasks(pasted_bits),
                                                               "labels": torch.tensor([3])})
    _check_invariants(image, out, destination, source, pasted_bits[0])
    assert out["labels"].tolist() == [1, 2, 3]
    assert torch.equal(out["masks"].tensor[0], _blocks([(0, 20, 0, 20)])[0] & ~pasted_bits[0])
    assert out["boxes"][0].tolist() == [0, 0, 20, 20]  # L-shaped remainder: its box stays
    assert out["boxes"][1].tolist() == [30, 30, 50, 40]  # cut from above: the box shrinks
    assert out["boxes"][2].tolist() == [10, 10, 50, 30]


def test_covered_instances_are_dropped_and_partly_covered_kept():
    destination, source = _images()
    # 0: fully covered; 1: 95% covered (kept); 2: 96% covered (dropped);
    # 3: half covered; 4: untouched
    target = _target(_blocks([(0, 10, 0, 10), (0, 10, 12, 22), (0, 10, 24, 34), (20, 30, 0, 10), (30, 40, 40, 50)]),
                     [1, 1, 2, 2, 3])
    paste = torch.zeros((1, H, W), dtype=torch.bool)
    paste[0, 0:10, 0:10] = True
    paste[0, 0:10, 12:22] = True
    paste[0, 5:10, 21] = False  # 5 pixels left of 100: exactly MIN_VISIBLE
    paste[0, 0:10, 24:34] = True
    paste[0, 0:4, 33] = False  # 4 pixels left of 100: below MIN_VISIBLE
    paste[0, 20:30, 0:5] = True
    image, out = paste_instances(destination, target, source, {"masks": BitMasks(paste), "labels": torch.tensor([3])})
    assert MIN_VISIBLE == 0.05
    assert out["labels"].tolist() == [1, 2, 3, 3]
    kept = out["masks"].tensor
    assert int(kept[0].sum()) == 5 and int(kept[1].sum()) == 50
    assert out["boxes"][:2].tolist() == [[21, 5, 22, 10], [5, 20, 10, 30]]
    _check_invariants(image, out, destination, source, paste[0])


def test_overlapping_pasted_instances_are_made_disjoint_smaller_on_top():
    destination, source = _images()
    big, small, tiny = _blocks([(0, 30, 0, 30), (20, 35, 20, 45), (0, 3, 0, 3)])  # tiny lies inside big
    target = _target(_blocks([(35, 40, 0, 10)]), [1])
    pasted = {"masks": BitMasks(torch.stack([big, small, tiny])), "labels": torch.tensor([1, 2, 3])}
    image, out = paste_instances(destination, target, source, pasted)
    bits = out["masks"].tensor
    assert out["labels"].tolist() == [1, 1, 2, 3]
    assert torch.equal(bits[1], big & ~small & ~tiny)
    assert torch.equal(bits[2], small)  # on top of the big one
    assert torch.equal(bits[3], tiny)
    _check_invariants(image, out, destination, source, big | small | tiny)


def test_crowd_boxes_lose_the_pasted_pixels():
    destination, source = _images()
    crowd = [[0, 0, 20, 10],  # its left half covered: shrinks to the right half
             [30, 20, 40, 30],  # fully covered: dropped
             [0, 30, 10, 40],  # untouched: kept as it was
             [20.5, 0.5, 29.5, 9.5]]  # a hole in its middle: its box stays
    target = _target(_blocks([(30, 40, 40, 50)]), [1], crowd)
    paste = _blocks([(0, 10, 0, 10)])[0] | _blocks([(18, 32, 28, 42)])[0] | _blocks([(4, 6, 24, 26)])[0]
    _, out = paste_instances(destination, target, source, {"masks": BitMasks(paste[None]), "labels": torch.tensor([2])})
    assert out["crowd_boxes"].tolist() == [[10, 0, 20, 10], [0, 30, 10, 40], [20.5, 0.5, 29.5, 9.5]]


def test_a_smaller_or_larger_source_is_pasted_at_the_top_left():
    for source_size in [(30, 35), (60, 70)]:
        destination, source = _images(source_height=source_size[0], source_width=source_size[1])
        target = _target(_blocks([(30, 40, 40, 50)]), [1])
        paste = _blocks([(20, 50, 25, 60)], *source_size)  # partly outside the destination when larger
        pasted = {"masks": BitMasks(paste), "labels": torch.tensor([2])}
        image, out = paste_instances(destination, target, source, pasted)
        on_canvas = torch.zeros((H, W), dtype=torch.bool)
        rows, cols = min(H, source_size[0]), min(W, source_size[1])
        on_canvas[:rows, :cols] = paste[0, :rows, :cols]
        _check_invariants(image, out, destination, source, on_canvas)
        assert torch.equal(out["masks"].tensor[-1], on_canvas)


def test_a_source_without_instances_changes_nothing():
    destination, source = _images()
    target = _target(_blocks([(0, 10, 0, 10)]), [1])

    class Empty:
        def __len__(self):
            return 1

        def load(self, index):
            return source, _target(torch.zeros((0, H, W), dtype=torch.bool), [])

    image, out = CopyPaste(Empty(), Compose([]))(destination, target, np.random.default_rng(0))
    assert image is destination and out is target


def test_the_draw_is_fixed_by_the_seed_and_pastes_subsets():
    destination, source = _images()
    target = _target(_blocks([(0, 10, 0, 10)]), [1])
    crowd_colour = np.array([1, 2, 3], dtype=np.uint8)

    class Source:
        """Two images of four disjoint instances and a crowd region painted ``crowd_colour``."""

        def __len__(self):
            return 2

        def load(self, index):
            image = source.copy()
            image[30:40, 0:10] = crowd_colour
            bits = _blocks([(0, 5, 20 + 5 * index, 25 + 5 * index), (10, 15, 20, 25), (20, 25, 20, 25),
                            (20, 25, 40, 45)])
            return image, _target(bits, [1, 2, 3, 1], [[0, 30, 10, 40]])

    paste = CopyPaste(Source(), Compose([]))
    counts = set()
    for seed in range(30):
        image, out = paste(destination, target, np.random.default_rng(seed))
        again_image, again = paste(destination, target, np.random.default_rng(seed))
        assert np.array_equal(image, again_image) and torch.equal(out["masks"].tensor, again["masks"].tensor)
        counts.add(len(out["labels"]) - 1)
        assert not (image == crowd_colour).all(-1).any()  # the source's crowd region is not pasted
        assert out["crowd_boxes"].shape == (0, 4)
    assert counts == {1, 2, 3, 4}


def test_bad_min_visible_is_rejected():
    with pytest.raises(InputError, match="min_visible"):
        CopyPaste([], Compose([]), min_visible=1.5)


# ---------------------------------------------------------------- through the dataset


def _write_dataset(root):
    """Three 40 x 50 images: polygons only; a polygon and an RLE; an RLE instance and an RLE crowd."""
    images = root / "images"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), np.full((H, W, 3), 40 * (i + 1), dtype=np.uint8))

    def rle(y0, y1, x0, x1):
        mask = np.zeros((H, W), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 1
        encoded = mask_utils.encode(np.asfortranarray(mask))
        return {"size": [H, W], "counts": encoded["counts"].decode()}

    def square(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]

    annotations = [
        (0, 1, square(2, 2, 20, 20), [2, 2, 18, 18], 0), (0, 2, square(25, 5, 45, 35), [25, 5, 20, 30], 0),
        (1, 1, square(5, 20, 30, 38), [5, 20, 25, 18], 0), (1, 3, rle(0, 15, 20, 50), [20, 0, 30, 15], 0),
        (2, 2, rle(10, 30, 10, 30), [10, 10, 20, 20], 0), (2, 3, rle(30, 40, 0, 50), [0, 30, 50, 10], 1),
    ]
    data = {"images": [{"id": i + 1, "file_name": f"{i}.png", "height": H, "width": W} for i in range(3)],
            "annotations": [{"id": n + 1, "image_id": image + 1, "category_id": category, "segmentation": seg,
                             "bbox": box, "area": float(box[2] * box[3]), "iscrowd": crowd}
                            for n, (image, category, seg, box, crowd) in enumerate(annotations)],
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, images


@pytest.mark.parametrize("jitter", [False, True], ids=["shortest_side", "scale_jitter"])
def test_dataset_samples_keep_the_invariants_and_their_seed(tmp_path, jitter):
    ann, images = _write_dataset(tmp_path)
    cfg = Config()
    cfg.data.train_ann, cfg.data.train_images = str(ann), str(images)
    cfg.data.copy_paste = True
    cfg.data.annotation_cache = True
    cfg.model.input.min_size = [48]
    cfg.model.input.max_size = 80
    if jitter:
        cfg.data.scale_jitter = [0.5, 1.5]
    dataset = build_train_dataset(cfg)
    assert isinstance(dataset.transforms.transforms[-1], CopyPaste)
    assert type(dataset._records).__name__ == "CachedAnnotations"
    respawned = pickle.loads(pickle.dumps(dataset))  # as a spawned loader worker receives it
    grown = 0
    for index in range(len(dataset)):
        for seed in range(6):
            image, target = dataset[(index, seed)]
            bits = target["masks"].tensor
            assert isinstance(target["masks"], BitMasks) and bits.shape[1:] == image.shape[1:]
            assert bits.flatten(1).any(1).all() and torch.equal(target["boxes"], _tight_boxes(bits))
            if jitter:
                assert image.shape[1:] == (48, 48)
            copy_image, copy_target = respawned[(index, seed)]
            assert torch.equal(copy_image, image) and torch.equal(copy_target["masks"].tensor, bits)
            grown += len(target["labels"]) > len(dataset.record(index)["labels"])
    assert grown > 0


def test_copy_paste_accepts_polygons_and_rle_masks(tmp_path):
    ann, images = _write_dataset(tmp_path)
    cfg = Config()
    cfg.data.train_ann, cfg.data.train_images = str(ann), str(images)
    cfg.data.flip_prob = 0.0
    dataset = build_train_dataset(cfg)
    _, polygons = dataset.load(0)
    _, mixed = dataset.load(1)
    assert isinstance(polygons["masks"], PolygonMasks) and isinstance(mixed["masks"], BitMasks)
    image, target = dataset.load(0)
    source_image, source = dataset.load(1)
    pasted_image, out = paste_instances(image, target, source_image, source)
    union = source["masks"].tensor.any(0)
    _check_invariants(pasted_image, out, image, source_image, union)
    assert out["labels"].tolist() == [1, 2, 1, 3]


def test_build_train_dataset_without_copy_paste_has_only_the_per_image_transforms(tmp_path):
    ann, images = _write_dataset(tmp_path)
    cfg = Config()
    cfg.data.train_ann, cfg.data.train_images = str(ann), str(images)
    dataset = build_train_dataset(cfg)
    assert [type(t) for t in dataset.transforms.transforms] == \
        [type(t) for t in build_transforms(cfg, train=True).transforms]
