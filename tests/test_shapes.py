import dataclasses
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO

from maskrcnn.data.shapes import (CATEGORIES, EDGE_CATEGORIES, LAYOUTS, NOVEL_CATEGORIES, generate_shapes,
                                 mask_to_polygons, render_image, uncompressed_rle)

SMALL = dict(num_train=40, num_val=5, seed=0, min_size=64, max_size=112)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert generate_shapes(out, **SMALL)
    return out


def _load(out, split="train"):
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def _kind(ann):
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return "polygon"
    return "compressed_rle" if isinstance(seg["counts"], str) else "uncompressed_rle"


def test_generation_is_deterministic_from_the_seed(shapes_dir, tmp_path):
    again = tmp_path / "again"
    generate_shapes(again, **SMALL)
    assert _load(again) == _load(shapes_dir)
    assert _load(again, "val") == _load(shapes_dir, "val")
    for image in _load(shapes_dir)["images"]:
        name = image["file_name"]
        assert (again / "train" / name).read_bytes() == (shapes_dir / "train" / name).read_bytes()
    other = tmp_path / "other"
    generate_shapes(other, **dict(SMALL, seed=1))
    assert _load(other)["annotations"] != _load(shapes_dir)["annotations"]


def test_train_and_val_differ(shapes_dir):
    train = (shapes_dir / "train" / "000001.jpg").read_bytes()
    val = (shapes_dir / "val" / "000001.jpg").read_bytes()
    assert train != val


def test_writes_every_segmentation_form_crowds_and_empty_images(shapes_dir):
    data = _load(shapes_dir)
    kinds = Counter(_kind(a) for a in data["annotations"] if not a["iscrowd"])
    assert kinds["polygon"] > kinds["compressed_rle"] > 0
    assert kinds["uncompressed_rle"] > 0
    assert any(len(a["segmentation"]) > 1 for a in data["annotations"] if _kind(a) == "polygon")
    crowds = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowds and all(_kind(a) != "polygon" for a in crowds)
    annotated = {a["image_id"] for a in data["annotations"]}
    assert any(image["id"] not in annotated for image in data["images"])


def test_categories_have_non_contiguous_ids(shapes_dir):
    data = _load(shapes_dir)
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "square"), (3, "circle"), (7, "triangle")]
    assert {a["category_id"] for a in data["annotations"]} == {c["id"] for c in CATEGORIES}


def test_pycocotools_decodes_masks_whose_tight_box_is_the_bbox(shapes_dir):
    coco = COCO(str(shapes_dir / "annotations" / "instances_train.json"))
    assert len(coco.getAnnIds()) == len(_load(shapes_dir)["annotations"])
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann).astype(bool)
        ys, xs = np.nonzero(mask)
        x0, y0 = xs.min(), ys.min()
        assert ann["bbox"] == [x0, y0, xs.max() + 1 - x0, ys.max() + 1 - y0]
        assert ann["area"] == mask.sum()


def test_later_shapes_occlude_earlier_ones(shapes_dir):
    coco = COCO(str(shapes_dir / "annotations" / "instances_train.json"))
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        if len(anns) > 1:
            coverage = sum(coco.annToMask(a).astype(np.int32) for a in anns)
            assert coverage.max() == 1, f"instances of image {image_id} overlap"


def test_image_files_match_the_json_sizes(shapes_dir):
    for split in ("train", "val"):
        for image in _load(shapes_dir, split)["images"]:
            pixels = cv2.imread(str(shapes_dir / split / image["file_name"]))
            assert pixels.shape == (image["height"], image["width"], 3)
            assert SMALL["min_size"] <= min(pixels.shape[:2]) <= max(pixels.shape[:2]) <= SMALL["max_size"]
    sizes = {(i["height"], i["width"]) for i in _load(shapes_dir)["images"]}
    assert any(h > w for h, w in sizes) and any(w > h for h, w in sizes)


def test_rerun_with_same_options_reuses_the_output(shapes_dir):
    ann_file = shapes_dir / "annotations" / "instances_train.json"
    before = ann_file.stat().st_mtime_ns
    assert not generate_shapes(shapes_dir, **SMALL)
    assert ann_file.stat().st_mtime_ns == before


def test_rerun_with_other_options_regenerates(tmp_path):
    assert generate_shapes(tmp_path, **dict(SMALL, num_train=3, num_val=1))
    assert generate_shapes(tmp_path, **dict(SMALL, num_train=4, num_val=1))
    assert len(_load(tmp_path)["images"]) == 4
    assert json.loads((tmp_path / "meta.json").read_text())["num_train"] == 4


def test_uncompressed_rle_round_trips_through_pycocotools():
    rng = np.random.default_rng(0)
    for first_pixel in (False, True):
        mask = rng.random((7, 9)) < 0.4
        mask[0, 0] = first_pixel
        rle = mask_utils.frPyObjects(uncompressed_rle(mask), 7, 9)
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)


def test_polygons_rasterise_back_to_the_mask():
    mask = np.zeros((40, 50), dtype=np.uint8)
    cv2.circle(mask, (12, 15), 7, 1, -1)
    cv2.fillPoly(mask, [np.array([[30, 5], [45, 20], [28, 33]], dtype=np.int32)], 1)
    polygons = mask_to_polygons(mask.astype(bool))
    assert len(polygons) == 2
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 40, 50)))
    np.testing.assert_array_equal(decoded, mask)


def test_generation_speed(tmp_path):
    start = time.perf_counter()
    assert generate_shapes(tmp_path, num_train=200, num_val=0, seed=3, min_size=128, max_size=256)
    elapsed = time.perf_counter() - start
    print(f"\nshapes generation: {200 / elapsed:.0f} images/s (128-256 px)")
    assert len(list((tmp_path / "train").glob("*.jpg"))) == 200


def test_novel_set_has_its_own_categories_and_same_layout(shapes_dir, tmp_path):
    assert generate_shapes(tmp_path, **SMALL, categories="novel")
    data, basic = _load(tmp_path), _load(shapes_dir)
    assert data["categories"] == NOVEL_CATEGORIES
    assert {a["category_id"] for a in data["annotations"]} == {c["id"] for c in NOVEL_CATEGORIES}
    assert [im["height"] for im in data["images"]] == [im["height"] for im in basic["images"]]  # same draws
    assert json.loads((tmp_path / "meta.json").read_text())["categories"] == "novel"
    assert "categories" not in json.loads((shapes_dir / "meta.json").read_text())
    assert not generate_shapes(tmp_path, **SMALL, categories="novel")
    assert generate_shapes(tmp_path, **SMALL)  # the basic set replaces it


def test_long_tailed_training_split_draws_the_last_category_rarely(shapes_dir, tmp_path):
    """rare_fraction=0.1: the last category holds about a tenth of each other one's training instances; the
    validation split is the balanced one, image for image."""
    options = dict(SMALL, num_train=150)
    assert generate_shapes(tmp_path, **options, rare_fraction=0.1)
    counts = Counter(a["category_id"] for a in _load(tmp_path)["annotations"] if not a["iscrowd"])
    rare, others = counts[CATEGORIES[-1]["id"]], [counts[c["id"]] for c in CATEGORIES[:-1]]
    assert min(others) > 100 and 0.03 * np.mean(others) < rare < 0.2 * np.mean(others), counts
    assert _load(tmp_path, "val") == _load(shapes_dir, "val")
    assert json.loads((tmp_path / "meta.json").read_text())["rare_fraction"] == 0.1
    with pytest.raises(ValueError, match="rare_fraction"):
        generate_shapes(tmp_path, **options, rare_fraction=0.0)


def test_the_tool_generates_what_the_library_generates_by_default(tmp_path, monkeypatch):
    """tools/make_shapes.py without options asks for generate_shapes's own defaults (maskrcnn.config's
    ShapesConfig), so `make demo` and a script calling the library make the same dataset."""
    import inspect
    import runpy

    from maskrcnn.config import ShapesConfig
    seen = {}
    tool = runpy.run_path(str(Path(__file__).parents[1] / "tools" / "make_shapes.py"))
    monkeypatch.setitem(tool["main"].__globals__, "generate_shapes", lambda out, **kwargs: seen.update(kwargs))
    tool["main"](["--out", str(tmp_path)])
    defaults = {name: p.default for name, p in inspect.signature(generate_shapes).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name != "progress"}
    assert {k: v for k, v in seen.items() if k != "progress"} == defaults == dataclasses.asdict(ShapesConfig())


@pytest.mark.parametrize("categories, digest", [
    ("basic", "1dd4dff4a0a2e4f706275af8e923b7c7b6e35001ac9da034ab5c4d55e4408a6d"),
    ("novel", "dfc019efbab69806e70947c06eff2ccecb206ac19d6f1f68e658d2210a0d6660"),
])
def test_existing_sets_generate_the_annotations_of_their_format_version(tmp_path, categories, digest):
    """The annotations of the basic and novel sets are pinned: a change to the generator that moves them must
    bump FORMAT_VERSION (and these digests), so that folders made before are not silently reused."""
    generate_shapes(tmp_path, **SMALL, categories=categories)
    text = b"".join((tmp_path / "annotations" / f"instances_{split}.json").read_bytes() for split in ("train", "val"))
    assert hashlib.sha256(text).hexdigest() == digest


def _outline_ratio(mask):
    """Perimeter squared over area of a bool mask's outer contours: 4 pi for a disc, 16 for a square."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return sum(cv2.arcLength(c, True) for c in contours) ** 2 / mask.sum()


def test_edge_set_draws_large_thin_sharp_shapes(tmp_path):
    """categories="edges" on 512-800 px images: sunbursts, gears and combs up to 60 % of the short side across,
    at least one over a third of it; whole sunbursts and combs with several times the outline of a basic shape of
    their area (perimeter^2 / area over 100, where basic shapes stay under 25), gears above any basic shape's."""
    options = dict(num_train=12, num_val=2, seed=0, min_size=512, max_size=800)
    assert generate_shapes(tmp_path, **options, categories="edges")
    coco = COCO(str(tmp_path / "annotations" / "instances_train.json"))
    assert _load(tmp_path)["categories"] == EDGE_CATEGORIES
    assert {a["category_id"] for a in coco.loadAnns(coco.getAnnIds())} == {c["id"] for c in EDGE_CATEGORIES}
    sides = []
    for image in coco.loadImgs(coco.getImgIds()):
        short = min(image["height"], image["width"])
        assert 512 <= short and max(image["height"], image["width"]) <= 800
        sides += [max(a["bbox"][2:]) / short for a in coco.loadAnns(coco.getAnnIds(imgIds=image["id"], iscrowd=False))]
    assert 1 / 3 < max(sides) <= 0.6 + 2 / 512, sides
    names = {c["id"]: c["name"] for c in EDGE_CATEGORIES}
    ratios = {name: [] for name in names.values()}
    for i in range(10):
        _, instances = render_image(np.random.default_rng([0, 0, i]), min_size=512, max_size=800,
                                    categories=EDGE_CATEGORIES, layout=LAYOUTS["edges"])
        for category_id, mask, occluded, crowd in instances:
            inside = not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
            if inside and not occluded and not crowd:
                ratios[names[category_id]].append(_outline_ratio(mask))
    assert all(ratios.values()), ratios
    assert min(ratios["sunburst"] + ratios["comb"]) > 100 and min(ratios["gear"]) > 25, ratios
    again = tmp_path / "again"
    generate_shapes(again, **options, categories="edges")
    assert _load(again) == _load(tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text())["categories"] == "edges"
