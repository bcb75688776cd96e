"""What the batch inference tests share: a tiny checkpoint whose labels map to dataset category ids, a folder
of small generated images of several sizes with unreadable files among them, and the comparison of rows."""

from pathlib import Path
from typing import List, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import torch

from tiny import save_tiny_checkpoint

CLASS_NAMES = ["circle", "square", "triangle"]
LABEL_TO_CAT_ID = {1: 7, 2: 9, 3: 11}  # the dataset's category ids, not the labels 1..3


def write_checkpoint(path: Path) -> Path:
    """The tiny random model's checkpoint, with a label -> dataset category id map."""
    save_tiny_checkpoint(path, CLASS_NAMES)
    checkpoint = torch.load(path, weights_only=True)
    torch.save({**checkpoint, "label_to_cat_id": LABEL_TO_CAT_ID}, path)
    return path


def write_images(folder: Path, count: int, *, unreadable: bool = True) -> List[Path]:
    """``count`` PNGs of differing sizes (so that a batch's padding differs from each image's own), and with
    ``unreadable`` a file that is not an image and a PNG cut short. Returns the paths, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        height, width = (48, 80) if i % 2 else (90, 64 + 2 * i)
        image = np.tile(np.linspace(30, 220, width, dtype=np.uint8)[None, :, None], (height, 1, 3))
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[y:y + height // 2, x:x + width // 3] = rng.integers(0, 255, 3, dtype=np.uint8)
        cv2.imwrite(str(folder / f"img{i:03d}.png"), image)
    if unreadable:
        (folder / "img_not_an_image.jpg").write_bytes(b"this is text, not a JPEG")
        whole = (folder / "img000.png").read_bytes()
        (folder / "img_truncated.png").write_bytes(whole[: len(whole) // 3])
    return sorted(folder.iterdir())


def assert_same_rows(rows: Sequence[dict], expected: Sequence[dict], *, score_tol: float = 1e-5) -> None:
    """The same images, each once, with the same size, error and detections: category ids equal, every mask
    of IoU 1.0 with its counterpart (by pycocotools; two empty masks, whose IoU it gives as 0, are equal),
    scores within ``score_tol`` and boxes within 1e-3 px."""
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "a path has more than one row"
    assert sorted(by_path) == sorted(row["path"] for row in expected)
    for want in expected:
        got = by_path[want["path"]]
        assert (got["height"], got["width"], got["error"]) == (want["height"], want["width"], want["error"])
        assert [d["category_id"] for d in got["detections"]] == [d["category_id"] for d in want["detections"]]
        if not want["detections"]:
            continue
        np.testing.assert_allclose([d["score"] for d in got["detections"]], [d["score"] for d in want["detections"]],
                                   rtol=0, atol=score_tol)
        np.testing.assert_allclose([d["bbox"] for d in got["detections"]], [d["bbox"] for d in want["detections"]],
                                   rtol=0, atol=1e-3)
        masks, wanted = [d["segmentation"] for d in got["detections"]], [d["segmentation"] for d in want["detections"]]
        ious = np.diag(mask_utils.iou(masks, wanted, [0] * len(wanted)))
        both_empty = (mask_utils.area(masks) == 0) & (mask_utils.area(wanted) == 0)
        assert np.where(both_empty, 1.0, ious).tolist() == [1.0] * len(wanted), want["path"]
