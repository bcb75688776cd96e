"""The HTTP service: upload checks, and tools/serve.py on a free loopback port with real, concurrent and
malformed requests."""

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from maskrcnn.deploy.serve import UploadError, decode_upload, is_loopback, load_test, post_image
from maskrcnn.fileio import read_image
from serving import ROOT, get_json, png_bytes, serve_tool, tiny_predictor, write_checkpoint

TOKEN = "s3cret"
MAX_BYTES = 200_000


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG of a few dozen bytes whose header declares ``width`` x ``height`` RGB pixels (no pixel data)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_a_decompression_bomb_is_refused_from_its_header():
    data = bomb_png()
    assert len(data) < 100
    with pytest.raises(UploadError, match="2500000000 pixels") as error:
        decode_upload(data, "image/png", max_bytes=MAX_BYTES, max_pixels=10**7)
    assert error.value.status == 413
    # Under the pixel limit the same kind of file reaches the decoder, which finds no pixel data: a 400.
    with pytest.raises(UploadError, match="cannot decode the uploaded image") as error:
        decode_upload(bomb_png(300, 300), "image/png", max_bytes=MAX_BYTES, max_pixels=10**7)
    assert error.value.status == 400


@pytest.mark.parametrize("data, content_type, status, message", [
    (b"", "image/png", 400, "empty"),
    (b"hello, not an image", "image/png", 400, "not an image"),
    (png_bytes(image(8, 8, 0)), "text/plain", 415, "content type"),
    (b"\0" * (MAX_BYTES + 1), "image/png", 413, "limit"),
])
def test_bad_uploads_are_refused(data, content_type, status, message):
    with pytest.raises(UploadError, match=message) as error:
        decode_upload(data, content_type, max_bytes=MAX_BYTES, max_pixels=10**7)
    assert error.value.status == status


def test_a_good_upload_decodes_to_rgb():
    gray = np.random.default_rng(1).integers(0, 256, (9, 7), dtype=np.uint8)
    decoded = decode_upload(png_bytes(gray), "image/png", max_bytes=MAX_BYTES, max_pixels=100)
    assert decoded.shape == (9, 7, 3) and np.array_equal(decoded[..., 1], gray)


def jpeg_bytes(stored: np.ndarray, orientation: int) -> bytes:
    """A JPEG of the ``stored`` pixels whose EXIF orientation tag is ``orientation``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_uploads_decode_as_the_package_reads_the_same_file(tmp_path):
    """Upright (EXIF orientation 6: stored 40 wide, 24 high, seen 24 wide, 40 high) and 16-bit depth scaled to
    8 bits, as ``read_image`` reads the file."""
    deep = np.random.default_rng(2).integers(0, 2**16, (9, 7), dtype=np.uint16)
    for name, data, content_type in (("rotated.jpg", jpeg_bytes(image(24, 40, 3), 6), "image/jpeg"),
                                     ("deep.png", png_bytes(deep), "image/png")):
        (tmp_path / name).write_bytes(data)
        decoded = decode_upload(data, content_type, max_bytes=MAX_BYTES, max_pixels=10**7)
        np.testing.assert_array_equal(decoded, read_image(tmp_path / name), err_msg=name)
    assert decoded.shape == (9, 7, 3) and np.array_equal(decoded[..., 1], (deep >> 8).astype(np.uint8))


def test_the_pixel_limit_names_the_upright_size():
    with pytest.raises(UploadError, match=r"declares 24x40 = 960 pixels \(upright\); the limit is 959") as error:
        decode_upload(jpeg_bytes(image(24, 40, 3), 6), "image/jpeg", max_bytes=MAX_BYTES, max_pixels=959)
    assert error.value.status == 413
    assert decode_upload(jpeg_bytes(image(24, 40, 3), 6), "image/jpeg", max_bytes=MAX_BYTES,
                         max_pixels=960).shape == (40, 24, 3)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """tools/serve.py on a tiny random model, guarded by a token; yields (base url, predictor of the same model)."""
    predictor = tiny_predictor(score_thresh=0.2)
    checkpoint = write_checkpoint(predictor, tmp_path_factory.mktemp("serve") / "model.pth")
    with serve_tool(["--checkpoint", str(checkpoint), "--token", TOKEN, "--score-thresh", "0.2",
                     "--max-batch-size", "4", "--max-wait-ms", "200", "--max-bytes", str(MAX_BYTES),
                     "--max-pixels", "1000000"], token=TOKEN) as base:
        yield base, predictor


def test_concurrent_requests_are_batched_and_match_the_predictor(service):
    base, predictor = service
    # One size: the padded batch is then the same whatever the batch, and so are the detections.
    images = [image(60, 90, i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda a: post_image(base + "/predict", png_bytes(a), token=TOKEN), images))
    assert [status for status, _ in answers] == [200] * 8
    for array, (_, body) in zip(images, answers):
        answer = json.loads(body)
        expected = predictor(array)
        assert (answer["height"], answer["width"]) == array.shape[:2]
        assert len(answer["detections"]) == len(expected)
        for detection, box, score, name, rle in zip(answer["detections"], expected.boxes.tolist(),
                                                    expected.scores.tolist(), expected.class_names, expected.masks):
            assert detection["box"] == pytest.approx(box, abs=1e-3)
            assert detection["score"] == pytest.approx(score, abs=1e-5)
            assert detection["class_name"] == name and detection["segmentation"] == rle
    stats = get_json(base + "/health", TOKEN)
    assert stats["images"] >= 8 and 1 < stats["largest_batch"] <= 4, stats


def test_a_rotated_jpeg_is_answered_as_the_predictor_sees_its_bytes(service):
    base, predictor = service
    data = jpeg_bytes(image(60, 90, 9), 6)
    status, body = post_image(base + "/predict", data, content_type="image/jpeg", token=TOKEN)
    assert status == 200
    answer, expected = json.loads(body), predictor(data)
    assert (answer["height"], answer["width"]) == expected.image_size == (90, 60)
    assert len(answer["detections"]) == len(expected) > 0
    np.testing.assert_allclose([d["box"] for d in answer["detections"]], expected.boxes.tolist(), atol=1e-3)
    status, body = post_image(base + "/predict?overlay=1", data, content_type="image/jpeg", token=TOKEN)
    assert status == 200 and Image.open(io.BytesIO(body)).size == (60, 90)


def test_overlay_returns_a_png_of_the_image_size(service):
    base, _ = service
    status, body = post_image(base + "/predict?overlay=1", png_bytes(image(70, 50, 1)), token=TOKEN)
    assert status == 200
    assert Image.open(io.BytesIO(body)).size == (50, 70)


def test_malformed_requests_get_4xx_and_the_service_keeps_serving(service):
    base, _ = service
    cases = [
        (post_image(base + "/predict", b"", token=TOKEN), 400, "empty"),
        (post_image(base + "/predict", b"not an image at all", token=TOKEN), 400, "not an image"),
        (post_image(base + "/predict", png_bytes(image(8, 8, 0)), content_type="text/plain", token=TOKEN), 415,
         "content type"),
        (post_image(base + "/predict", b"\0" * (MAX_BYTES + 10), token=TOKEN), 413, "limit"),
        (post_image(base + "/predict", bomb_png(), token=TOKEN), 413, "2500000000 pixels"),
        (post_image(base + "/predict", png_bytes(np.zeros((1100, 1000, 3), np.uint8)), token=TOKEN), 413,
         "1100000 pixels"),
        (post_image(base + "/predict", png_bytes(image(8, 8, 0))), 401, "token"),
        (post_image(base + "/predict", png_bytes(image(8, 8, 0)), token="wrong"), 401, "token"),
    ]
    for (status, body), expected_status, message in cases:
        assert status == expected_status, body
        assert message in json.loads(body)["detail"]
    with ThreadPoolExecutor(4) as pool:  # bad and good uploads at once
        mixed = list(pool.map(lambda data: post_image(base + "/predict", data, token=TOKEN)[0],
                              [b"junk", png_bytes(image(40, 40, 2)), bomb_png(), png_bytes(image(50, 30, 3))]))
    assert mixed == [400, 200, 413, 200]


def test_load_test_counts_answers_refusals_and_errors(service):
    base, _ = service
    data = png_bytes(image(40, 50, 4))
    good = load_test(base + "/predict", data, content_type="image/png", concurrency=2, requests=4, max_seconds=60,
                     token=TOKEN)
    assert (good["requests"], good["refused"], good["errors"]) == (4, 0, 0) and good["p95_s"] >= good["p50_s"] > 0
    bad = load_test(base + "/predict", data, content_type="image/png", concurrency=1, requests=2, max_seconds=60)
    assert (bad["requests"], bad["refused"], bad["errors"]) == (2, 0, 2)  # no token: 401


def serve_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "tools/serve.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)


def test_only_loopback_addresses_and_localhost_count_as_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.10", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.2", "::", "some.name", "localhost.example"]))


def test_serve_refuses_to_listen_off_loopback_without_a_token():
    done = serve_cli("--checkpoint", "unused.pth", "--host", "some.name")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "--token" in done.stderr


def test_serve_accepts_a_host_name_with_a_token():
    # Past the address check, the next thing it meets is the missing checkpoint (nothing is bound).
    done = serve_cli("--checkpoint", "missing.pth", "--host", "some.name", "--token", TOKEN)
    assert done.returncode == 2 and "missing.pth" in done.stderr and "--token" not in done.stderr, done.stderr
