"""EXIF orientation: every reader of images sees a phone photo upright, as the annotation tools show it.

Each photo is a JPEG whose stored pixels are the upright picture turned the other way, with the EXIF
Orientation tag (0x0112) that turns it back: 3 (180 degrees), 6 (90 clockwise), 8 (90 counter-clockwise).
Oracles: OpenCV's ``cv2.imread`` with its default flags and PIL's ``ImageOps.exif_transpose``.
"""

import io
import json
import runpy
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, PngImagePlugin

from maskrcnn.config import config_to_dict
from maskrcnn.data.check import check_dataset
from maskrcnn.data.coco import CocoDetection
from maskrcnn.data.formats import read_cvat, read_labelme, read_yolo, to_coco
from maskrcnn.fileio import decode_image, exif_orientation, image_header, orient, read_image
from maskrcnn.inference import to_image_tensor
from maskrcnn.modeling.maskrcnn import build_model
from maskrcnn.predictor import Predictor
from maskrcnn.visualize import write_ground_truth_overlays

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORIENTATIONS = (3, 6, 8)
H, W = 48, 80  # the upright picture: wider than high
BLOCK = (slice(8, 24), slice(48, 72))  # a bright block in the upright picture's top right (y, x)
# the stored pixels of each orientation: the upright picture turned so that the tag turns it back
STORED_TURNS = {3: 2, 6: 1, 8: -1}  # np.rot90 counter-clockwise quarter turns


def _upright():
    """``(H, W, 3)`` uint8: dark, with a bright block and a red stripe that fix which way is up."""
    pixels = np.full((H, W, 3), 40, dtype=np.uint8)
    pixels[BLOCK] = 230
    pixels[40:48, 0:16] = (220, 30, 30)
    return pixels


def _jpeg_bytes(orientation):
    stored = np.ascontiguousarray(np.rot90(_upright(), STORED_TURNS[orientation]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _photo(path, orientation):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes(orientation))
    return path


def _close_to_upright(pixels, atol=12):
    """The decoded photo is the upright picture (up to JPEG error)."""
    assert pixels.shape == (H, W, 3)
    assert np.abs(pixels.astype(int) - _upright()).mean() < atol / 4
    assert pixels[BLOCK].mean() > 200 and pixels[40:48, 0:16, 0].mean() > 180


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_read_image_turns_the_photo_upright_as_opencv_and_pil_do(tmp_path, orientation):
    path = _photo(tmp_path / "photo.jpg", orientation)
    ours = read_image(path)
    np.testing.assert_array_equal(ours, cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
    pil = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert pil.shape == ours.shape and np.abs(pil.astype(int) - ours).mean() < 2
    _close_to_upright(ours)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_reads_as_pil_transposes_it(tmp_path, orientation, suffix):
    """All eight orientations, the four mirrored ones (2, 4, 5, 7) too, against PIL's
    ``ImageOps.exif_transpose`` of the same file: random pixels, so that every turn and mirror gives other
    pixels, 6 x 10 so that a turn by 90 degrees gives another shape. The PNG (its eXIf chunk) is lossless,
    compared exactly; the JPEG decoded by OpenCV and by PIL may differ by a level here and there, where a
    wrong orientation differs by about 60 on average."""
    stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert expected.shape == ((10, 6, 3) if orientation >= 5 else (6, 10, 3))
    assert image_header(path) == (*expected.shape[:2], orientation)
    read = {"read_image": read_image(path), "decode_image": decode_image(path.read_bytes())}
    if suffix == ".png":
        read["orient"] = orient(stored, orientation)
    for name, got in read.items():
        assert got.shape == expected.shape, name
        if suffix == ".png":
            np.testing.assert_array_equal(got, expected, err_msg=name)
        else:
            assert np.abs(got.astype(int) - expected).mean() < 2, name


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_decoded_bytes_and_header_size_agree_with_the_file(tmp_path, orientation):
    path = _photo(tmp_path / "photo.jpg", orientation)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), read_image(path))
    assert image_header(path) == (H, W, orientation)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_image_tensor_of_a_path_bytes_and_a_pil_image_is_upright(tmp_path, orientation):
    path = _photo(tmp_path / "photo.jpg", orientation)
    expected = torch.from_numpy(read_image(path)).permute(2, 0, 1).float() / 255
    for image in (path, str(path), path.read_bytes(), Image.open(path)):
        tensor = to_image_tensor(image)
        assert (tensor - expected).abs().mean() < 2 / 255
        _close_to_upright((tensor.permute(1, 2, 0) * 255).round().byte().numpy())


def test_predictor_on_a_path_bytes_and_pil_sees_the_upright_photo(tmp_path):
    torch.manual_seed(0)
    predictor = Predictor(tiny_config(), build_model(tiny_config().model).state_dict(), score_thresh=0.0)
    path = _photo(tmp_path / "photo.jpg", 6)
    reference = predictor(read_image(path))
    for image in (path, path.read_bytes()):
        result = predictor(image)
        assert result.image_size == (H, W)
        torch.testing.assert_close(result.boxes, reference.boxes)
    assert predictor(Image.open(path)).image_size == (H, W)


def _labelme_photo(root, orientation):
    """A labelme file of an upright-drawn rectangle over the bright block, on a sideways-stored JPEG."""
    _photo(root / "photo.jpg", orientation)
    shape = {"label": "block", "points": [[48, 8], [72, 24]], "group_id": None, "shape_type": "rectangle",
             "flags": {}}
    (root / "photo.json").write_text(json.dumps({"version": "5.5.0", "flags": {}, "shapes": [shape],
                                                 "imagePath": "photo.jpg", "imageData": None,
                                                 "imageHeight": H, "imageWidth": W}))
    return root


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_converted_labelme_annotations_fit_the_training_image(tmp_path, orientation):
    root = _labelme_photo(tmp_path / "lm", orientation)
    convert = runpy.run_path(str(ROOT / "tools" / "convert_dataset.py"))["main"]
    convert(["--from", "labelme", str(root), "--out", str(tmp_path / "inst.json")])
    coco = json.loads((tmp_path / "inst.json").read_text())
    assert (coco["images"][0]["height"], coco["images"][0]["width"]) == (H, W)
    image, target = CocoDetection(tmp_path / "inst.json", root)[0]
    assert image.shape == (3, H, W)
    x0, y0, x1, y1 = target["boxes"][0].round().int().tolist()
    assert (x0, y0, x1, y1) == (48, 8, 72, 24)
    assert image[:, y0:y1, x0:x1].mean() > 200 / 255  # the box lies on the bright block


def test_cvat_and_yolo_sizes_are_those_of_the_upright_photo(tmp_path):
    _photo(tmp_path / "cvat" / "images" / "photo.jpg", 6)
    (tmp_path / "cvat" / "annotations.xml").write_text(
        f'<annotations><version>1.1</version><image id="0" name="photo.jpg" width="{W}" height="{H}">'
        '<box label="block" xtl="48" ytl="8" xbr="72" ybr="24"/></image></annotations>')
    cvat = read_cvat(tmp_path / "cvat" / "annotations.xml")
    assert to_coco(cvat.records, cvat.class_names)["annotations"][0]["bbox"] == [48, 8, 24, 16]
    _photo(tmp_path / "yolo" / "images" / "photo.jpg", 8)
    (tmp_path / "yolo" / "labels").mkdir()
    (tmp_path / "yolo" / "labels" / "photo.txt").write_text("0 0.75 0.3333333 0.3 0.3333333\n")
    (tmp_path / "yolo" / "data.yaml").write_text("names: [block]\n")
    yolo = read_yolo(tmp_path / "yolo")
    np.testing.assert_allclose(to_coco(yolo.records, yolo.class_names)["annotations"][0]["bbox"],
                               [48, 8, 24, 16], atol=1e-4)


def _coco_file(path, height, width):
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "photo.jpg", "height": height, "width": width}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
                         "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "block"}]}))
    return path


@pytest.mark.parametrize("orientation", (6, 8))
def test_check_dataset_names_a_json_that_gives_the_sideways_size(tmp_path, orientation):
    _photo(tmp_path / "photo.jpg", orientation)
    upright = check_dataset(_coco_file(tmp_path / "upright.json", H, W), tmp_path)
    assert upright.errors == []
    sideways = check_dataset(_coco_file(tmp_path / "sideways.json", W, H), tmp_path)
    assert [p.kind for p in sideways.errors] == ["exif orientation"]
    assert f"EXIF orientation {orientation}" in sideways.errors[0].message
    assert "photo.jpg" in sideways.errors[0].message and "image id 1" in sideways.errors[0].message


def test_ground_truth_overlays_and_infer_overlays_are_upright(tmp_path):
    _photo(tmp_path / "in" / "photo.jpg", 6)
    ann = _coco_file(tmp_path / "inst.json", H, W)
    files = write_ground_truth_overlays(ann, tmp_path / "in", tmp_path / "gt", count=1)
    assert cv2.imread(str(files[0])).shape[:2] == (H, W)
    checkpoint = tmp_path / "model.pth"
    torch.manual_seed(0)
    torch.save({"model": build_model(tiny_config().model).state_dict(), "config": config_to_dict(tiny_config()),
                "class_names": ["a", "b", "c"], "iteration": 0}, checkpoint)
    infer = runpy.run_path(str(ROOT / "tools" / "infer.py"))["main"]
    infer(["--checkpoint", str(checkpoint), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert cv2.imread(str(tmp_path / "out" / "photo.png")).shape[:2] == (H, W)


def test_training_check_of_the_image_files_accepts_an_upright_size(tmp_path):
    _photo(tmp_path / "photo.jpg", 6)
    CocoDetection(_coco_file(tmp_path / "inst.json", H, W), tmp_path).check_images()


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_service_upload_is_decoded_upright(orientation):
    from maskrcnn.deploy.serve import decode_upload

    pixels = decode_upload(_jpeg_bytes(orientation), "image/jpeg", max_bytes=1 << 20, max_pixels=1 << 20)
    _close_to_upright(pixels)


def _png_bytes(orientation=None):
    """The upright picture as a PNG, with an eXIf chunk (before the pixel data) when ``orientation`` is given."""
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(_upright()).save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


def test_orientation_is_read_from_the_header_without_decoding_a_png(monkeypatch):
    """PIL's PNG plugin decodes every pixel of a PNG without eXIf before it answers; the header is enough."""
    def no_decoding(self):
        raise AssertionError("the PNG's pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    for orientation, data in ((1, _png_bytes()), (6, _png_bytes(6))):
        assert exif_orientation(data) == orientation
        assert exif_orientation(Image.open(io.BytesIO(data))) == orientation


def test_labelme_file_giving_the_sideways_size_is_named_with_the_orientation(tmp_path):
    root = _labelme_photo(tmp_path / "lm", 6)
    data = json.loads((root / "photo.json").read_text())
    (root / "photo.json").write_text(json.dumps(dict(data, imageHeight=W, imageWidth=H)))
    with pytest.raises(ValueError, match=r"photo.json: the annotations give 48x80 \(WxH\) but .*photo.jpg is 80x48 "
                                         r"upright; that is its size as stored, before its EXIF orientation 6"):
        read_labelme(root)
