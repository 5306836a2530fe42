"""``accel demo`` in a real browser (Debian's Chromium driven by playwright), checked against the library.

The app is started once for the module on a free localhost port; the browser is started once too.
"""
from __future__ import annotations

import io
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

import accel
from accel.eval.side_by_side import enlarge
from accel.pipelines import load
from accel.pipelines.fashion_sd import pipeline_images

CHROMIUM = "/usr/bin/chromium"
STEPS, SEED = 4, 7
ARTIFACTS = Path(os.environ.get("ACCEL_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from accel.demo import launch

    port = free_port()
    app = launch("127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}"
    app.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def library_pipe():
    return load("fashion-sd")


def reference(pipe, prompt: str, seed: int, **methods) -> np.ndarray:
    """What the library draws: ``pipe(...)`` on one seeded generator, optionally patched."""
    def draw(p):
        out = p([prompt], num_inference_steps=STEPS, guidance_scale=3.0, output_type="pt",
                generator=[torch.Generator().manual_seed(seed)]).images
        return enlarge(pipeline_images(out)[0])

    if not methods:
        return draw(pipe)
    with accel.patched(pipe, **methods):
        return draw(pipe)


def shown(page, selector: str) -> np.ndarray:
    """The pixels of the image the page shows in ``selector``, fetched as the browser got them."""
    src = page.locator(f"{selector} img").first.get_attribute("src")
    body = page.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def run_generation(page, url, prompt: str, deepcache: int):
    page.goto(url)
    page.locator("#prompt textarea").fill(prompt)
    for control, value in (("steps", STEPS), ("seed", SEED), ("deepcache", deepcache)):
        box = page.locator(f"#{control} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
    page.locator("#run-generate").click()
    page.wait_for_function("document.querySelector('#timing-generate')?.innerText.includes('x with')",
                           timeout=120_000)
    page.wait_for_selector("#patched-image img")


def test_the_page_shows_what_the_library_draws_and_what_deepcache_did(browser, url, library_pipe):
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    run_generation(page, url, "a photo of a bag", deepcache=2)
    assert np.array_equal(shown(page, "#baseline-image"), reference(library_pipe, "a photo of a bag", SEED))
    assert np.array_equal(shown(page, "#patched-image"),
                          reference(library_pipe, "a photo of a bag", SEED, deepcache=2))
    timing = page.locator("#timing-generate").inner_text()
    assert "unpatched" in timing and "patched" in timing and "deepcache" in timing
    page.wait_for_selector("#views-generate img")
    assert shown(page, "#views-generate").shape[1] >= 400  # the DeepCache timeline
    captions = page.locator("#captions-generate").inner_text()
    assert f"2 of {STEPS} steps" in captions  # DeepCache ran steps 0 and 2 in full
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000
    # the identity setting: DeepCache 1 runs every step in full, so both images are the same
    run_generation(page, url, "a photo of a bag", deepcache=1)
    assert np.array_equal(shown(page, "#baseline-image"), shown(page, "#patched-image"))
    page.close()


def test_bad_input_shows_a_message_and_the_app_keeps_serving(browser, url):
    page = browser.new_page()
    page.goto(url)
    page.locator("#prompt textarea").fill("")
    page.locator("#run-generate").click()
    page.wait_for_function("document.querySelector('#message-generate')?.innerText.includes('prompt: empty')",
                           timeout=60_000)
    model = page.locator("#model input")
    model.fill("/no/such/pipeline")
    model.press("Enter")
    page.locator("#prompt textarea").fill("a photo of a bag")
    page.locator("#run-generate").click()
    page.wait_for_function("document.querySelector('#message-generate')?.innerText.includes('is neither built in')",
                           timeout=60_000)
    page.close()


def test_two_requests_at_once_each_get_their_own_result(url, library_pipe):
    from gradio_client import Client

    client = Client(url, verbose=False)

    def ask(prompt: str, deepcache: int):
        return client.predict("fashion-sd", prompt, SEED, STEPS, 3.0, 0.0, "merge", deepcache, 0, 0.0,
                              api_name="/generate")

    with ThreadPoolExecutor(2) as pool:
        bag, shoe = pool.submit(ask, "a photo of a bag", 2), pool.submit(ask, "a photo of a sneaker", 3)
        bag, shoe = bag.result(timeout=300), shoe.result(timeout=300)
    for result, prompt, interval in ((bag, "a photo of a bag", 2), (shoe, "a photo of a sneaker", 3)):
        baseline, accelerated = (np.asarray(Image.open(result[i]).convert("RGB")) for i in (0, 1))
        assert np.array_equal(baseline, reference(library_pipe, prompt, SEED))
        assert np.array_equal(accelerated, reference(library_pipe, prompt, SEED, deepcache=interval))
        assert f"interval\": {interval}" in result[2] and f"of {STEPS} steps" in result[4]


def test_the_page_opens_no_connection_outside_localhost(browser, url):
    page, hosts = browser.new_page(viewport={"width": 1280, "height": 1200}), set()
    page.on("request", lambda request: hosts.add(urlparse(request.url).hostname or request.url.split(":")[0]))
    page.goto(url)
    page.wait_for_load_state("networkidle")
    page.get_by_role("tab", name="Classification").click()
    page.locator("#run-classify").click()
    page.wait_for_function("document.querySelector('#timing-classify')?.innerText.includes('x with')",
                           timeout=120_000)
    page.wait_for_load_state("networkidle")
    assert hosts and hosts <= {"127.0.0.1", "localhost", "data", "blob"}, hosts
    # the default classification run: ToMe r=3 on a test image, its merges shown as a source map
    assert "ToMe" in page.locator("#captions-classify").inner_text()
    page.wait_for_selector("#views-classify img")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-classify.png"), full_page=True)
    page.close()


def test_choosing_the_dit_shows_regioncache_and_runs_it(browser, url):
    page = browser.new_page()
    page.goto(url)
    model = page.locator("#model input")
    model.fill("fashion-dit")
    model.press("Enter")
    page.get_by_text("RegionCache ratio (0: off; DiTs)").wait_for()  # shown for a DiT; DeepCache hidden
    assert not page.locator("#deepcache").is_visible()
    page.locator("#prompt textarea").fill("sneaker")
    box = page.locator("#steps input[type=number]")
    box.fill(str(STEPS))
    box.press("Enter")
    page.locator("#run-generate").click()
    page.wait_for_function("document.querySelector('#timing-generate')?.innerText.includes('region_cache')",
                           timeout=120_000)
    assert "RegionCache" in page.locator("#captions-generate").inner_text()
    page.close()
