"""Choosing the next images to label (maskrcnn/active.py, tools/select_images.py): the uncertainty of one image,
the greedy choice on constructed informativeness and embeddings, and the tool end to end on a tiny checkpoint."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.active import (PoolImage, binary_entropy, image_uncertainty, informativeness, score_image,
                             select_images)
from maskrcnn.cli import run
from maskrcnn.data.formats import read_labelme
from maskrcnn.data.shapes import generate_shapes
from maskrcnn.errors import InputError
from maskrcnn.predictor import Predictor
from tiny import save_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import select_images as select_tool  # noqa: E402

CLASSES = ["circle", "square", "triangle"]


def unit(*vectors) -> np.ndarray:
    array = np.array(vectors, dtype=np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def pool_image(detections: int, mask: float, score: float) -> PoolImage:
    return PoolImage(Path(f"{detections}-{mask}-{score}.png"), detections, mask, score, np.ones(2, np.float32))


def test_binary_entropy_is_one_bit_at_a_half_and_zero_at_the_ends():
    values = binary_entropy(torch.tensor([0.0, 0.5, 1.0, 0.25]))
    expected = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    np.testing.assert_allclose(values.numpy(), [0.0, 1.0, 0.0, expected], atol=1e-5)


def test_image_uncertainty_weights_each_mask_by_its_score_and_sums_over_detections():
    scores = torch.tensor([0.5, 0.9])
    probs = torch.stack([torch.full((28, 28), 0.5), torch.zeros(28, 28)])  # a fully unsure mask, a sure one
    mask, score = image_uncertainty(scores, probs)
    assert mask == pytest.approx(0.5 * 1.0, abs=1e-5)
    assert score == pytest.approx(1.0 + float(binary_entropy(torch.tensor(0.9))), abs=1e-5)
    assert image_uncertainty(torch.zeros(0), torch.zeros(0, 28, 28)) == (0.0, 0.0)


def test_an_image_without_detections_gets_the_median_of_those_with_detections():
    pool = [pool_image(3, 1.0, 2.0), pool_image(0, 0.0, 0.0), pool_image(1, 0.5, 0.5), pool_image(2, 4.0, 4.0)]
    np.testing.assert_allclose(informativeness(pool), [3.0, 3.0, 1.0, 8.0])
    np.testing.assert_allclose(informativeness([pool_image(0, 0.0, 0.0)]), [0.0])


def test_the_more_uncertain_image_ranks_first_when_all_are_equally_far_apart():
    chosen = select_images(np.array([1.0, 3.0, 2.0]), np.eye(3), budget=3)
    assert chosen.index.tolist() == [1, 2, 0]
    np.testing.assert_allclose(chosen.distance, [1.0, np.sqrt(2), np.sqrt(2)])
    np.testing.assert_allclose(chosen.gain, [3.0, 2 * np.sqrt(2), np.sqrt(2)])


def test_of_two_identical_images_one_is_chosen_and_a_distinct_less_uncertain_one_next():
    embeddings = unit([1, 0, 0], [1, 0, 0], [0.6, 0.8, 0], [0, 0, 1])
    chosen = select_images(np.array([3.0, 3.0, 2.5, 1.0]), embeddings, budget=2)
    assert chosen.index.tolist() == [0, 2]
    assert select_images(np.array([3.0, 3.0, 2.5, 1.0]), embeddings, budget=4).index.tolist() == [0, 2, 3, 1]


def test_distance_can_outweigh_uncertainty():
    """A near-copy of the first choice, though more uncertain, loses to a distant image."""
    embeddings = unit([1, 0], [1, 0.05], [0, 1])
    chosen = select_images(np.array([2.0, 1.9, 1.0]), embeddings, budget=2)
    assert chosen.index.tolist() == [0, 2]


def test_the_budget_is_respected_and_the_choice_is_deterministic():
    rng = np.random.default_rng(0)
    values, embeddings = rng.random(50), unit(*rng.normal(size=(50, 8)))
    first = select_images(values, embeddings, budget=7)
    assert len(first.index) == len(set(first.index.tolist())) == 7
    np.testing.assert_array_equal(select_images(values, embeddings, budget=7).index, first.index)
    ties = select_images(np.ones(3), np.zeros((3, 2)), budget=3)  # all equal: by index
    assert ties.index.tolist() == [0, 1, 2]


@pytest.mark.parametrize("budget", [0, 4])
def test_a_budget_outside_the_pool_is_an_error(budget):
    with pytest.raises(InputError, match="between 1 and the pool's size, 3 images"):
        select_images(np.ones(3), np.eye(3), budget=budget)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    save_tiny_checkpoint(root / "model.pth", CLASSES)
    generate_shapes(root / "shapes", num_train=6, num_val=0)
    return root


def test_score_image_counts_the_detections_the_predictor_returns_and_leaves_the_model_as_it_was(pool):
    predictor = Predictor.from_checkpoint(pool / "model.pth", score_thresh=0.05, precision="fp32")
    path = pool / "shapes" / "train" / "000001.jpg"
    scored = score_image(predictor, path)
    assert scored.detections == len(predictor(path)) > 0
    assert scored.embedding.shape == (predictor.config.model.backbone.fpn_channels,)
    assert np.linalg.norm(scored.embedding) == pytest.approx(1.0, abs=1e-5)
    assert not predictor.inference_model.fpn._forward_hooks
    again = score_image(predictor, path)
    assert (again.mask_uncertainty, again.score_uncertainty) == (scored.mask_uncertainty, scored.score_uncertainty)


def files_under(folder: Path) -> set:
    return {path for path in folder.rglob("*") if path.is_file()}


def test_the_tool_writes_the_list_the_scores_and_labelme_preannotations_of_the_chosen(pool, tmp_path, capsys):
    images = pool / "shapes" / "train"
    exclude = tmp_path / "labelled.txt"
    exclude.write_text(f"{images / '000002.jpg'}\n\n")
    before = files_under(pool) | files_under(tmp_path)
    out = tmp_path / "out"
    run(select_tool.main, ["--checkpoint", str(pool / "model.pth"), "--images", str(images), "--budget", "3",
                           "--output", str(out), "--exclude", str(exclude), "--precision", "fp32"])
    printed = capsys.readouterr()
    assert "pool: 100%" in printed.err and "5/5" in printed.err
    assert printed.out.splitlines()[0] == f"{out / 'selected.txt'}: 3 of 5 images, best first"
    listed = (out / "selected.txt").read_text().splitlines()
    report = json.loads((out / "selection.json").read_text())
    assert [entry["path"] for entry in report["chosen"]] == listed
    assert len(set(listed)) == 3 and str(images / "000002.jpg") not in listed
    assert all(Path(path).parent == images for path in listed)
    assert report["pool"] == 5 and [entry["rank"] for entry in report["chosen"]] == [1, 2, 3]
    for entry in report["chosen"]:
        assert entry["informativeness"] == pytest.approx(entry["mask_uncertainty"] + entry["score_uncertainty"])
        assert entry["gain"] == pytest.approx(entry["informativeness"] * entry["distance"])
    assert report["chosen"][0]["distance"] == 1.0
    gains = [entry["gain"] for entry in report["chosen"]]
    assert gains == sorted(gains, reverse=True)  # greedy gains never rise: each new choice only adds a centre

    conversion = read_labelme(out / "labelme", image_dir=images, class_names=CLASSES)
    assert sorted(record.file_name for record in conversion.records) == sorted(Path(p).name for p in listed)
    assert sum(len(record.instances) for record in conversion.records) > 0
    assert files_under(tmp_path) - before == {out / "selected.txt", out / "selection.json"} | {
        out / "labelme" / f"{Path(p).stem}.json" for p in listed}
    assert files_under(pool) == before & files_under(pool)


@pytest.mark.parametrize("case, expected", [
    ("empty", "error: no image files"),
    ("budget 0", "error: --budget must be at least 1, got 0"),
    ("budget 7", "error: --budget 7 is more than the 6 images of"),
    ("unreadable", "error: cannot read image file"),
])
def test_bad_input_is_a_one_line_error(pool, tmp_path, capsys, case, expected):
    images = pool / "shapes" / "train"
    budget = case.split()[1] if case.startswith("budget") else "1"
    if case == "empty":
        images = tmp_path / "none"
        images.mkdir()
    elif case == "unreadable":
        images = tmp_path / "broken"
        images.mkdir()
        (images / "a.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        run(select_tool.main, ["--checkpoint", str(pool / "model.pth"), "--images", str(images), "--budget", budget,
                               "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(expected), err
    assert not (tmp_path / "out").exists()
