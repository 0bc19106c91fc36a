"""A real browser (Debian's headless Chromium via chromedriver) loads the playground, submits a prompt
and sees the image appear. .ci/run installs chromium and chromium-driver."""

from __future__ import annotations

import shutil

import pytest
from live_server import LiveServer

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_playground_generates_and_shows_an_image(browser, tiny_pipe, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from srpo_infer.server import create_app

    with LiveServer(create_app(tiny_pipe, output_dir=tmp_path / "out")) as live:
        browser.get(live.url + "/")
        assert "srpo_infer playground" in browser.title
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a lighthouse at dusk")
        _fill(browser, width=640, height=512, steps=2, seed=42)
        Select(browser.find_element(By.ID, "format")).select_by_value("png")
        browser.find_element(By.ID, "generate").click()
        image = _result_image(browser)
        assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [
            640,
            512,
        ]
        assert image.get_attribute("src").startswith(live.url + "/files/") and image.get_attribute("src").endswith(
            ".png"
        )
        assert "seed 42" in browser.find_element(By.ID, "status").text
        assert "inference" in browser.find_element(By.ID, "timings").text
        browser.save_screenshot(str(tmp_path / "playground.png"))


def test_playground_shows_previews_as_they_arrive_then_the_image(browser, tiny_pipe, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from srpo_infer.server import create_app

    with LiveServer(create_app(tiny_pipe, output_dir=tmp_path / "out")) as live:
        browser.get(live.url + "/")
        # Every status the page shows, in order (the previews come and go faster than a poll could see).
        browser.execute_script(
            "window.seen = []; new MutationObserver(() => window.seen.push(document.getElementById('status')"
            ".textContent)).observe(document.getElementById('status'), {childList: true, characterData: true,"
            " subtree: true});"
        )
        _fill(browser, width=512, height=512, steps=4, seed=7)
        Select(browser.find_element(By.ID, "previews")).select_by_value("2")
        browser.find_element(By.ID, "generate").click()
        image = _result_image(browser)
        seen = browser.execute_script("return window.seen")
        assert "Preview 1…" in seen and "Preview 2…" in seen and seen[-1].startswith("Done in"), seen
        assert image.get_attribute("src").startswith("data:image/jpeg;base64,")
        assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image) == [
            512,
            512,
        ]


def _fill(browser, **fields) -> None:
    """A custom size and the other numeric fields, typed into the form."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "size")).select_by_value("custom")
    for field, value in fields.items():
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))


def _result_image(browser):
    """The final image, once it has loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = WebDriverWait(browser, 120).until(ec.presence_of_element_located((By.CSS_SELECTOR, "img.result-image")))
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return arguments[0].naturalWidth", image) > 0)
    return image
