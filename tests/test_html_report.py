"""The HTML report opens from disk in a real headless browser (Debian's chromium through its driver, Selenium):
it renders (a screenshot that is not blank), logs no console error, and every image decodes."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                   "(apt-get install chromium chromium-driver; .ci/run installs them)")


def open_page(path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1280,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.get(path.resolve().as_uri())
    return driver


@pytest.fixture(scope="module")
def report(tiny_run):
    """The report folder of the shared tiny run (tests/conftest.py)."""
    return tiny_run[0] / "reports" / "tiny" / "fast"


def test_the_page_holds_everything_and_needs_no_network(report):
    page = (report / "index.html").read_text()
    for section in ('id="run"', 'id="tables"', 'id="localisation"', 'id="heads"', 'id="plots"', 'id="maps"',
                    'id="trials"', "gradcam combined", "guided gradcam", "deconvnet", "CPU-hours"):
        assert section in page, section
    assert "http://" not in page and "https://" not in page and 'src="data:image/png;base64,' in page


@pytest.mark.integration
@needs_browser
def test_the_page_renders_in_headless_chromium(report, tmp_path):
    driver = open_page(report / "index.html")
    try:
        driver.implicitly_wait(10)
        body = driver.find_element("tag name", "body")
        images = int(body.get_attribute("data-images"))
        assert images > 10 and body.get_attribute("data-broken-images") == "0"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # text and images, not a blank page
