"""The web UI: its actions without a browser, then end to end in headless Chromium.

The browser test drives Debian's chromium (apt-get install chromium) with Playwright for
Python (pip install playwright; its own browser download is never used). It skips, with
the reason, only where one of them is not installed.
"""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import tiny_pipeline

gr = pytest.importorskip("gradio", reason="the web UI needs gradio: pip install 'anystory[ui]'")

from anystory import matting
from anystory.cli import TINY_LABEL
from anystory.webui import MAX_SLOTS, SAMPLE_SCRIPT, Settings, Studio, build_app, launch

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PROMPT = "on the left, a red star; on the right, a blue circle"
SMALL = {"steps": 2, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def studio():
    return Studio(tiny_pipeline(), TINY_LABEL, tiny=True)


def slots(*images):
    return [*images, *[None] * (MAX_SLOTS - len(images))], [None] * MAX_SLOTS


def example(studio, i):
    return Image.open(studio.examples[i])


def test_generate_gives_the_image_and_its_routing_overlay(studio):
    images, masks = slots(example(studio, 0), None, example(studio, 1))  # a removed slot in between
    image, overlay, status = studio.generate(PROMPT, images, masks, Settings(**SMALL))
    assert image.size == overlay.size == (64, 64)
    assert status.count("class='swatch'") == 2
    image_off, overlay_off, status_off = studio.generate(PROMPT, images, masks, Settings(use_router=False, **SMALL))
    assert overlay_off is None and "router off" in status_off
    assert not np.array_equal(np.asarray(image), np.asarray(image_off))


def test_a_slot_without_mask_or_backend_uses_the_whole_image(studio, monkeypatch):
    monkeypatch.setattr(matting, "available_backends", list)
    images, masks = slots(example(studio, 0).convert("RGB"))
    _, _, status = studio.generate(PROMPT, images, masks, Settings(**SMALL))
    assert "subject 1: no mask and no matting backend, so the whole image is the subject" in status


def test_bad_requests_name_the_problem(studio):
    with pytest.raises(ValueError, match="write a prompt"):
        studio.generate("  ", *slots(), Settings(**SMALL))
    with pytest.raises(ValueError, match="multiples of 8"):
        studio.generate(PROMPT, *slots(example(studio, 0)), Settings(steps=1, height=60, width=64))


def test_storyboard_tab_tells_the_sample_story(studio):
    sheet, frames, status = studio.storyboard(SAMPLE_SCRIPT, None, Settings(**SMALL))
    assert len(frames) == 3 and frames[1][1] == "2. on the left, Star; on the right, Moon"
    assert all(image.size == (64, 64) for image, _ in frames) and sheet.width > 64
    assert "2 characters" in status


@pytest.fixture
def served(studio):
    app = build_app(studio)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(app, port=port, max_file_size="200kb", block=False)
    yield app, f"http://127.0.0.1:{port}/"
    app.close()


def test_server_binds_localhost_and_bounds_uploads(served):
    import httpx

    app, url = served
    assert app.server_name == "127.0.0.1"
    small = httpx.post(url + "gradio_api/upload", files={"files": ("a.png", b"x" * 1000)})
    large = httpx.post(url + "gradio_api/upload", files={"files": ("b.png", b"x" * 300_000)})
    assert small.status_code == 200 and large.status_code == 413


def test_browser_two_subjects_generate_image_and_routing_overlay(served, studio, tmp_path):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is not installed: pip install playwright (never `playwright install`)"
    )
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed at /usr/bin/chromium: apt-get install -y chromium")
    _, url = served
    expect = sync_api.expect
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#generate")).to_be_visible(timeout=60_000)
            expect(page.locator("#model-label")).to_contain_text("tiny RANDOM weights")
            expect(page.locator("#slot-2")).to_be_hidden()
            page.click("#add-subject")
            expect(page.locator("#slot-2")).to_be_visible()
            page.click("#remove-2")
            expect(page.locator("#slot-2")).to_be_hidden()
            for i in range(2):
                page.locator(f"#subject-{i} input[type=file]").set_input_files(str(studio.examples[i]))
                expect(page.locator(f"#subject-{i} img")).to_be_visible()
            page.locator("#prompt textarea").fill(PROMPT)
            page.click("#generate")
            for output in ("#result img", "#routing img"):
                expect(page.locator(output)).to_be_visible(timeout=60_000)
                page.wait_for_function(f"document.querySelector('{output}').naturalWidth > 0")
                assert page.eval_on_selector(output, "img => [img.naturalWidth, img.naturalHeight]") == [64, 64]
            expect(page.locator("#status")).to_contain_text("subject 2")
            page.screenshot(path=os.environ.get("ANYSTORY_SCREENSHOT", str(tmp_path / "webui.png")), full_page=True)
        finally:
            browser.close()
