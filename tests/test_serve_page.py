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
from PIL import Image

from browser import chromium
from maskrcnn.data.shapes import render_image
from maskrcnn.deploy.serve import post_image
from serving import png_bytes, serve_tool, tiny_predictor, write_checkpoint

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

        shots = Path(os.environ.get("MASKRCNN_SCREENSHOTS") or tempfile.mkdtemp(prefix="maskrcnn-screens-"))
        shots.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(shots / "service_page.png"))


def test_the_page_draws_a_rotated_jpeg_as_stored_like_the_service(service, tmp_path):
    """A JPEG whose EXIF says "rotate 90°": the service decodes the pixels as stored, and so must the page,
    or every box and mask would land on the wrong pixels."""
    from selenium.webdriver.common.by import By

    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = 255  # left half white, as stored
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    picture.save(path, quality=95, exif=exif.tobytes())
    status, body = post_image(service + "/predict", path.read_bytes(), content_type="image/jpeg", token=TOKEN)
    assert status == 200 and (json.loads(body)["height"], json.loads(body)["width"]) == (32, 64)

    with chromium() as driver:
        wait = open_page(driver, service)
        slider = driver.find_element(By.ID, "score")
        driver.execute_script("arguments[0].value = 1; arguments[0].dispatchEvent(new Event('input'));", slider)
        driver.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda d: "detections." in d.find_element(By.ID, "status").text)
        red = driver.execute_script(
            "const ctx = document.getElementById('canvas').getContext('2d');"
            "return arguments[0].map(([x, y]) => ctx.getImageData(x, y, 1, 1).data[0]);",
            [[8, 4], [56, 4], [8, 28], [56, 28]])
    assert [value > 128 for value in red] == [True, False, True, False], red
