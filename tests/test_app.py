"""The web demo (scripts/app.py) in a real headless browser: Debian's chromium driven through chromedriver.

The app runs as its own process on the loopback address, as a user starts it. Without the browser the tests
are skipped, except where LDM_REQUIRE_BROWSER=1 (CI installs chromium and sets it): there they fail.
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.config.loading import load_config

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PROMPT = "a red circle in the center"

pytestmark = pytest.mark.slow


def _need(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("LDM_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def model(tiny_pipeline) -> Path:
    return tiny_pipeline


@pytest.fixture(scope="module")
def app(model, tmp_path_factory):
    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("app_log") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "app.py"), "--model", str(model), "--host",
                                 "127.0.0.1", "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read(100)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app):
    _need(Path(CHROMIUM).exists() and Path(DRIVER).exists(),
          "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless, and none of the background connections this closed network would refuse.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.get(app)
    yield driver
    driver.quit()


def _find(driver, css: str, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.find_elements("css selector", css))[0]


def _type(driver, css: str, text: str) -> None:
    """Replace a field's text as a user does (select all, delete, type): Svelte sees the input events."""
    from selenium.webdriver.common.keys import Keys

    field = _find(driver, css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.BACKSPACE)
    if text:
        field.send_keys(text)


def _shown_images(driver) -> list[str]:
    return [img.get_attribute("src") for img in driver.find_elements("css selector", "#gallery img")]


def _generate(driver, before: list[str]) -> bytes:
    """Click generate, wait until the gallery shows another image, and download it as the page links it."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element("css selector", "#generate").click()
    src = WebDriverWait(driver, 180).until(lambda d: next((s for s in _shown_images(d) if s not in before), None))
    return urllib.request.urlopen(src, timeout=30).read()


def _error_text(driver, timeout: float = 60) -> str:
    """The text of the error message the page shows; the message is then closed (and gone) before returning."""
    from selenium.webdriver.support.ui import WebDriverWait

    def shown(d):
        return " ".join(t.text for t in d.find_elements("css selector", "[data-testid='toast-text']")).strip()

    text = WebDriverWait(driver, timeout).until(shown)
    for close in driver.find_elements("css selector", "[data-testid='toast-close']"):
        close.click()
    WebDriverWait(driver, timeout).until(lambda d: not d.find_elements("css selector", "[data-testid='toast-text']"))
    return text


def test_the_page_shows_what_ldm_generate_makes_with_its_parameters(page, model):
    from ldm.images import read_png_params
    from ldm.inference.generate import generate

    _type(page, "#prompt textarea", PROMPT)
    _type(page, "#seed input", "7")
    data = _generate(page, before=[])
    shown = Image.open(io.BytesIO(data))
    expected = generate(str(model), [PROMPT], guidance_scale=3.0, num_inference_steps=20, sampler="dpm++", seed=7)[0]
    assert shown.size == expected.image.size
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(expected.image)), \
        "the page's image differs from ldm.generate with the same settings"
    assert read_png_params(io.BytesIO(data)) == expected.params  # the PNG served carries the exact parameters


def test_mistakes_show_in_the_page_and_the_app_keeps_serving(page, model):
    _type(page, "#prompt textarea", "")
    page.find_element("css selector", "#generate").click()
    assert "Type a prompt" in _error_text(page)

    _type(page, "#prompt textarea", PROMPT)
    _type(page, "#model textarea, #model input", "/no/such/model")
    page.find_element("css selector", "#generate").click()
    message = _error_text(page)
    assert "/no/such/model" in message and "Traceback" not in message

    _type(page, "#model textarea, #model input", str(model))
    _type(page, "#height input", "20")  # not a multiple of this model's 4 px
    page.find_element("css selector", "#generate").click()
    assert "multiples of" in _error_text(page)

    _type(page, "#height input", "0")
    _type(page, "#seed input", "8")
    data = _generate(page, before=_shown_images(page))
    assert Image.open(io.BytesIO(data)).size == (16, 16)


def test_the_app_can_ride_along_with_an_export_as_a_space(model, tmp_path):
    from ldm.interop.hub import upload_plan
    from ldm.interop.model_card import model_card

    folder = tmp_path / "pipeline"
    shutil.copytree(model, folder)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "app.py"), "--write-space", str(folder)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (folder / "app.py").read_text() == (ROOT / "scripts" / "app.py").read_text()
    assert "gradio" in (folder / "requirements.txt").read_text()
    uploaded, refused = upload_plan(folder)
    assert {"app.py", "requirements.txt"} <= set(uploaded) and not refused
    card = str(model_card(folder, load_config(str(folder / "ldm_config.yaml"))))
    assert "sdk: gradio" in card and "app_file: app.py" in card and "## Try it in a browser" in card

    refused_run = subprocess.run([sys.executable, str(ROOT / "scripts" / "app.py"), "--write-space", str(tmp_path)],
                                 capture_output=True, text=True)
    assert refused_run.returncode == 2 and "not an exported pipeline folder" in refused_run.stderr
    assert "Traceback" not in refused_run.stderr
