"""The service's page (``GET /``): self-contained and same-origin, and, in headless Chromium, an upload
through its file input draws the API's detections, lists them in a table and filters them by score."""

import json
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from browser import chromium
from maskrcnn.data.shapes import render_image
from maskrcnn.deploy.serve import create_app, post_image
from maskrcnn.structures import Instances
from serving import png_bytes, serve_app, serve_tool, tiny_predictor, write_checkpoint

TOKEN = "page-token"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    checkpoint = write_checkpoint(tiny_predictor(), tmp_path_factory.mktemp("page") / "model.pth")
    with serve_tool(["--checkpoint", str(checkpoint), "--token", TOKEN, "--score-thresh", "0.05"],
                    token=TOKEN) as base:
        yield base


def open_page(driver, base: str):
    """Open the page, give it the token it asks for, wait until it is ready; returns a 60 s WebDriverWait."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.get(base + "/")
    wait.until(lambda d: d.find_element(By.ID, "token-form").is_displayed())
    driver.find_element(By.ID, "token").send_keys(TOKEN + "\n")
    wait.until(lambda d: d.find_element(By.ID, "status").text == "Ready.")
    return wait


def test_the_page_is_self_contained_and_opens_no_cross_origin_access(service):
    request = urllib.request.Request(service + "/", headers={"Origin": "http://elsewhere.example"})
    with urllib.request.urlopen(request, timeout=10) as response:  # no token needed for the page itself
        html = response.read().decode()
        headers = response.headers
    assert headers.get("Access-Control-Allow-Origin") is None
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    for external in ("http://", "https://", "//cdn", "<script src", "<link", "@import", "url("):
        assert external not in html, external


def test_an_upload_in_the_page_shows_the_apis_detections_and_the_slider_filters_them(service, tmp_path):
    from selenium.webdriver.common.by import By

    pixels, _ = render_image(np.random.default_rng(5), min_size=240, max_size=320)
    path = tmp_path / "shapes.png"
    path.write_bytes(png_bytes(pixels))
    status, body = post_image(service + "/predict", path.read_bytes(), token=TOKEN)
    assert status == 200
    expected = json.loads(body)["detections"]
    assert len(expected) >= 2, "the tiny model should find a few regions at score 0.05"

    with chromium() as driver:
        wait = open_page(driver, service)
        driver.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#detections tbody tr")) == len(expected))
        rows = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
                for row in driver.find_elements(By.CSS_SELECTOR, "#detections tbody tr")]
        for (_, _, name, score, box, area), detection in zip(rows, expected):
            assert name == detection["class_name"] and float(score) == pytest.approx(detection["score"], abs=5e-4)
            assert [float(v) for v in box.split(", ")] == pytest.approx(detection["box"], abs=0.05)
            assert int(area) == int(mask_utils.area(detection["segmentation"]))  # the page's RLE decoding
        canvas = driver.find_element(By.ID, "canvas")
        assert (int(canvas.get_attribute("height")), int(canvas.get_attribute("width"))) == pixels.shape[:2]

        scores = sorted(d["score"] for d in expected)
        threshold = round((scores[0] + scores[-1]) / 2, 2)
        slider = driver.find_element(By.ID, "score")
        driver.execute_script("arguments[0].value = arguments[1];"
                              "arguments[0].dispatchEvent(new Event('input'));", slider, str(threshold))
        visible = [row for row in driver.find_elements(By.CSS_SELECTOR, "#detections tbody tr") if row.is_displayed()]
        kept = [d for d in expected if d["score"] >= threshold]
        assert 0 < len(visible) == len(kept) < len(expected)
        assert [row.find_elements(By.TAG_NAME, "td")[2].text for row in visible] == [d["class_name"] for d in kept]
        driver.execute_script("arguments[0].value = 0; arguments[0].dispatchEvent(new Event('input'));", slider)

        save_screenshot(driver, "service_page.png")


def find_bright_square(images):
    """A predict callable that detects, in each image it is handed, the box and mask of its bright pixels:
    where the service's decoding puts the square, its answer puts the detection."""
    results = []
    for pixels in images:
        bright = torch.from_numpy(pixels.min(axis=2) > 128)
        ys, xs = torch.nonzero(bright, as_tuple=True)
        box = [[xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]]
        results.append(Instances(boxes=torch.tensor(box, dtype=torch.float32), scores=torch.tensor([0.9]),
                                 labels=torch.tensor([2]), class_names=["square"], masks=bright[None],
                                 image_size=pixels.shape[:2]))
    return results


def test_the_page_draws_a_rotated_jpeg_upright_with_its_boxes_on_the_object(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 ("turn 90° clockwise to view"): the service decodes it
    upright, and the page draws it upright, so the detection of a bright square sits on the square."""
    from selenium.webdriver.common.by import By

    height, width = 48, 96
    upright = np.full((height, width, 3), 40, np.uint8)
    upright[6:22, 60:84] = 255  # the square, top right in the upright view
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(path, quality=95, exif=exif)  # stored 48 x 96

    app = create_app(find_bright_square, class_names=["circle", "square"], draw=lambda pixels, result: b"",
                     token=TOKEN)
    with serve_app(app) as (base, _), chromium() as driver:
        wait = open_page(driver, base)
        driver.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda d: "detections." in d.find_element(By.ID, "status").text
                   or d.find_element(By.ID, "status").get_attribute("class") == "error")
        status = driver.find_element(By.ID, "status").text
        assert status == "rotated.jpg: 96×48, 1 detections.", status
        canvas = driver.find_element(By.ID, "canvas")
        size = int(canvas.get_attribute("height")), int(canvas.get_attribute("width"))
        box = [float(v) for v in driver.find_element(By.CSS_SELECTOR, "#detections td.box").text.split(", ")]
        centre = [round((box[0] + box[2]) / 2), round((box[1] + box[3]) / 2)]
        where_stored_would_be = [28, 12]  # the square of the stored pixels, stretched to the upright size
        drawn = driver.execute_script(
            "const ctx = document.getElementById('canvas').getContext('2d');"
            "return arguments[0].map(([x, y]) => Array.from(ctx.getImageData(x, y, 1, 1).data));",
            [centre, where_stored_would_be, [8, 40]])
        save_screenshot(driver, "service_page_rotated.png")
    assert size == (height, width)
    assert box == pytest.approx([60, 6, 84, 22], abs=1)
    # Under the box centre: the white square under the translucent mask; elsewhere the dark background.
    assert drawn[0][1] > 100, drawn
    assert max(drawn[1][:3]) < 80 and max(drawn[2][:3]) < 80, drawn


def save_screenshot(driver, name: str) -> None:
    """The page as it looks now, in ``MASKRCNN_SCREENSHOTS`` (or a new temporary folder)."""
    shots = Path(os.environ.get("MASKRCNN_SCREENSHOTS") or tempfile.mkdtemp(prefix="maskrcnn-screens-"))
    shots.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shots / name))
