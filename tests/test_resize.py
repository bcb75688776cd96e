"""The inference resize (``modeling.maskrcnn.resize_image``, torch) gives the pixels of the training resize
(``data.transforms.ResizeShortestEdge``, OpenCV on float32): the same size, and the same values to float
rounding.

Both sample bilinearly at pixel centres; what is left is the float32 rounding of the sampling positions,
times the steepest step of the image. The check is ``max |train / 255 - inference| <= 0.02 / 255`` (a
fiftieth of a grey level), measured on images of independent random pixels, where neighbours differ by up
to 255 grey levels and any other sampling of the source moves values by a large fraction of the range. That
the check can fail is shown on the usual mistakes: nearest instead of bilinear, corner-aligned instead of
centre-aligned sampling (off by half a pixel), sides rounded to the nearest pixel instead of down
(torchvision's rule, which both follow), and OpenCV's uint8 resize (11-bit fixed-point weights, each
output rounded to an integer: up to 0.8 of a grey level off), which training used before.
"""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskrcnn.data.transforms import ResizeShortestEdge
from maskrcnn.modeling.maskrcnn import resize_image
from maskrcnn.structures import BitMasks

MIN_SIZE, MAX_SIZE = 320, 512
# Upscaled and downscaled, landscape and portrait, capped by MAX_SIZE or not, and sizes at which rounding
# the sides down and to the nearest pixel differ (37 x 61, 77 x 77, 300 x 120).
SIZES = [(37, 61), (77, 77), (200, 300), (300, 120), (40, 400), (480, 640), (1000, 333), (123, 457)]
TOLERANCE = 0.02 / 255


def _train_resize(image: np.ndarray) -> np.ndarray:
    target = {"boxes": torch.zeros(0, 4), "crowd_boxes": torch.zeros(0, 4),
              "masks": BitMasks(torch.zeros(0, *image.shape[:2], dtype=torch.bool))}
    return ResizeShortestEdge([MIN_SIZE], MAX_SIZE)(image, target, np.random.default_rng(0))[0]


def _worst_difference(image: np.ndarray, resize) -> float:
    """Largest difference between the training resize and ``resize`` ((3, H, W) 0-1 float -> (3, h, w)),
    in units of the 0-1 range; infinite when the sizes differ."""
    expected = torch.from_numpy(_train_resize(image)).permute(2, 0, 1).float() / 255
    got = resize(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    if got.shape != expected.shape:
        return float("inf")
    return float((got - expected).abs().max())


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_inference_resize_gives_the_training_pixels(size):
    assert _worst_difference(_noise(*size, seed=size[0]), lambda x: resize_image(x, MIN_SIZE, MAX_SIZE)) <= TOLERANCE


def _scaled_size(x, round_to_nearest=False):
    h, w = x.shape[-2:]
    scale = min(MIN_SIZE / min(h, w), MAX_SIZE / max(h, w))
    return (int(h * scale + 0.5), int(w * scale + 0.5)) if round_to_nearest else (int(h * scale), int(w * scale))


def _uint8_opencv(x):
    pixels = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    h, w = _scaled_size(x)
    return torch.from_numpy(cv2.resize(pixels, (w, h), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1).float() / 255


WRONG_RESIZES = {
    "nearest": lambda x: F.interpolate(x[None], size=_scaled_size(x), mode="nearest")[0],
    "OpenCV on uint8": _uint8_opencv,
    "corner-aligned": lambda x: F.interpolate(x[None], size=_scaled_size(x), mode="bilinear", align_corners=True)[0],
    "sides rounded to the nearest pixel": lambda x: F.interpolate(x[None], size=_scaled_size(x, round_to_nearest=True),
                                                                  mode="bilinear", align_corners=False)[0],
}


@pytest.mark.parametrize("name", WRONG_RESIZES)
def test_a_wrong_resize_fails_the_check(name):
    worst = max(_worst_difference(_noise(*size, seed=size[0]), WRONG_RESIZES[name]) for size in SIZES)
    assert worst > 10 * TOLERANCE, f"{name}: worst difference {worst * 255:.2f} grey levels"
