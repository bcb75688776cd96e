import cv2
import numpy as np
import pytest
import torch

from maskrcnn.rle import encode_masks
from maskrcnn.structures import Instances
from maskrcnn.visualize import add_legend, colors, draw_instances, label_map, place_labels, save_png

SIZE = (60, 80)


def _instances(masks_format="bitmap"):
    """Three detections: two rectangles of class 2 and an overlapping square of class 1 scoring 0.3."""
    masks = torch.zeros(3, *SIZE, dtype=torch.bool)
    masks[0, 30:50, 10:30] = True
    masks[1, 30:50, 50:70] = True
    masks[2, 35:45, 20:40] = True
    boxes = torch.tensor([[10.0, 30, 30, 50], [50, 30, 70, 50], [20, 35, 40, 45]])
    masks = encode_masks(masks) if masks_format == "rle" else masks
    return Instances(boxes=boxes, scores=torch.tensor([0.9, 0.8, 0.3]), labels=torch.tensor([2, 2, 1]),
                     class_names=["b", "b", "a"], masks=masks, image_size=SIZE)


def _label_size(text):
    """(width, height) of a drawn label: the text of draw_instances' font, with a 1-pixel margin."""
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    return width + 2, height + baseline + 2


@pytest.fixture
def image():
    return np.full((*SIZE, 3), 100, dtype=np.uint8)


def test_overlay_changes_mask_pixels_and_leaves_the_rest(image):
    result = _instances()
    out = draw_instances(image, result, score_thresh=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (image == 100).all()  # input untouched
    changed = (out != image).any(axis=2)
    masks = result.masks[:2].numpy()
    assert changed[masks.any(0)].all()
    # Only the masks, the box outlines and the "name score" labels where place_labels puts them are drawn.
    drawn_zone = masks.any(0).copy()
    boxes = result.boxes[:2].int().tolist()
    sizes = [_label_size(text) for text in ("b 0.90", "b 0.80")]
    for (x0, y0, x1, y1), (x, y), (w, h) in zip(boxes, place_labels(boxes, sizes, SIZE), sizes):
        drawn_zone[y0:y1 + 1, x0:x1 + 1] = True
        drawn_zone[y:y + h, x:x + w] = True
    assert not changed[~drawn_zone].any()
    assert not changed[52:].any()
    # the score-0.3 square is not drawn: its pixels outside the kept masks keep their value
    assert not changed[36:44, 31:39].any()


def test_fill_blends_instance_colour(image):
    out = draw_instances(image, _instances(), alpha=0.5)
    expected = np.round(0.5 * 100 + 0.5 * colors([0])[0].astype(float)).astype(np.uint8)
    assert (out[40, 20] == expected).all()  # inside mask 0, away from its outline


def test_class_colors_are_stable_per_label(image):
    per_class = draw_instances(image, _instances(), class_colors=True)
    assert (per_class[47, 20] == per_class[47, 60]).all()  # two detections of class 2, below their labels
    per_instance = draw_instances(image, _instances(), class_colors=False)
    assert not (per_instance[47, 20] == per_instance[47, 60]).all()


def test_rle_masks_draw_like_bitmaps(image):
    assert np.array_equal(draw_instances(image, _instances("rle"), score_thresh=0.0),
                          draw_instances(image, _instances(), score_thresh=0.0))


def test_overlay_rejects_an_image_of_another_size():
    with pytest.raises(ValueError, match="image is 40x60 but the detections are for a 80x60 image"):
        draw_instances(np.zeros((60, 40, 3), np.uint8), _instances())


def test_label_map_colours_pixels_by_class_highest_score_on_top():
    result = _instances()
    out = label_map(result.masks, result.labels, num_classes=2, scores=result.scores)
    assert out.shape == (*SIZE, 3) and out.dtype == np.uint8
    class_1, class_2 = colors([1, 2])
    assert (out[40, 22] == class_2).all()  # overlap of detection 0 (score 0.9) and 2 (score 0.3)
    assert (out[40, 35] == class_1).all()  # square alone
    assert (out[40, 60] == class_2).all()
    background = ~result.masks.any(0).numpy()
    assert (out[background] == 0).all()
    reversed_scores = label_map(result.masks, result.labels, 2, scores=torch.tensor([0.1, 0.2, 0.3]))
    assert (reversed_scores[40, 22] == class_1).all()


def test_label_map_from_rle_and_empty_input():
    result = _instances()
    assert np.array_equal(label_map(encode_masks(result.masks), result.labels, 2),
                          label_map(result.masks, result.labels, 2))
    assert not label_map([], [], 2, image_size=SIZE).any()
    with pytest.raises(ValueError, match="labels must be in 1..1"):
        label_map(result.masks, result.labels, 1)


def test_add_legend_keeps_image_and_lists_classes():
    image = np.full((10, 20, 3), 50, np.uint8)
    out = add_legend(image, [1, 2, 3], ["a", "b", "c"])
    assert out.shape[0] == 3 * 18 and out.shape[1] > 20
    assert np.array_equal(out[:10, :20], image)
    for row, color in enumerate(colors([1, 2, 3])):
        assert (out[row * 18 + 9, 20 + 9] == color).all()


def test_save_png_round_trips(tmp_path, image):
    out = draw_instances(image, _instances())
    path = tmp_path / "sub" / "overlay.png"
    save_png(path, out)
    assert np.array_equal(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB), out)
    assert [p.name for p in path.parent.iterdir()] == ["overlay.png"]


def _intersect(a, b):
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_labels_of_boxes_sharing_an_edge_do_not_cover_each_other():
    boxes = [[50, 30, 90, 60], [10, 30, 50, 60], [10, 60, 50, 90], [0, 0, 8, 6]]  # touching, and one in a corner
    sizes = [(62, 14), (70, 14), (66, 14), (60, 14)]
    corners = place_labels(boxes, sizes, (100, 120))
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(corners, sizes)]
    for i, rect in enumerate(rects):
        assert 0 <= rect[0] and rect[2] <= 120 and 0 <= rect[1] and rect[3] <= 100, rect
        assert not any(_intersect(rect, other) for other in rects[:i]), (i, rects)
    assert corners[0] == (50, 16)  # the best detection keeps the usual spot, above its box


def test_drawn_labels_follow_place_labels(image):
    result = Instances(boxes=torch.tensor([[20.0, 30.0, 40.0, 50.0], [40.0, 30.0, 60.0, 50.0]]),
                       scores=torch.tensor([0.9, 0.8]), labels=torch.tensor([1, 2]), class_names=["square", "circle"],
                       masks=None, image_size=image.shape[:2])
    drawn = draw_instances(image, result)
    sizes = [_label_size(text) for text in ("square 0.90", "circle 0.80")]
    for (x, y), (w, h), color in zip(place_labels([[20, 30, 40, 50], [40, 30, 60, 50]], sizes, image.shape[:2]),
                                     sizes, colors(range(2))):
        assert (drawn[y, x] == color).all() and (drawn[y + h - 1, x + w - 1] == color).all()
