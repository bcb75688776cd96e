"""A headless Chromium for the page tests, driven by Selenium through Debian's ``chromium-driver``.

Where no Chromium is installed the page tests are skipped, except under CI (``CI`` set), where they fail:
``.ci/run`` installs ``chromium`` and ``chromium-driver`` from Debian's packages, so a missing browser there
is a broken set-up, not a reason to pass.
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def _which(names) -> Optional[str]:
    for name in names:
        found = shutil.which(name) or (f"/usr/lib/chromium/{name}" if Path(f"/usr/lib/chromium/{name}").exists()
                                       else None)
        if found:
            return found
    return None


@contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator["object"]:
    """A Selenium WebDriver of headless Chromium, ``width`` x ``height`` CSS pixels; quit on exit.

    Skips the calling test where Chromium or its driver is missing and ``CI`` is unset; fails under CI.
    """
    browser, driver_path = _which(BROWSERS), _which(DRIVERS)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:  # pragma: no cover - selenium is in the test extras
        browser = None
    if browser is None or driver_path is None:
        message = "headless Chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", "--allow-file-access-from-files"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()
