"""A real headless Chromium (Debian's chromium + chromium-driver) driven by selenium, against real `ckpt serve`s.

The browser is not optional: when it is missing these tests FAIL and say how to install it
(`scripts/setup-browser.sh`), so a CI run without it cannot pass by skipping them. Screenshots go to
`$CKPT_SCREENSHOT_DIR` (default a pytest temporary directory) so that CI can keep them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService

SETUP_HINT = "install it with scripts/setup-browser.sh (apt: chromium chromium-driver)"


def _find(env: str, *names: str) -> str:
    configured = os.environ.get(env)
    if configured:
        return configured
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(f"the browser tests need {names[0]} and it is not on PATH (or set {env}); {SETUP_HINT}",
                pytrace=False)


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("CKPT_SCREENSHOT_DIR")
    path = Path(configured) if configured else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def download_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def browser(download_dir: Path) -> Iterator[webdriver.Chrome]:
    binary = _find("CKPT_CHROMIUM", "chromium", "chromium-browser", "google-chrome")
    driver_path = _find("CKPT_CHROMEDRIVER", "chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1400", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(download_dir),
        "download.prompt_for_download": False,
        "safebrowsing.enabled": False,
    })
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
