"""The Gradio demo, launched on a free local port and driven through gradio_client (and a headless browser)."""

import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import tiny  # noqa: E402
from vlmkit.app import Demo, DemoConfig, make_examples  # noqa: E402
from vlmkit.models.vlm import VLM  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, proc = tiny.build("llava", pad=True)
    tmp = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(port=_free_port(), max_pixels=200_000, examples=make_examples(tmp / "ex", 2))
    demo = Demo(cfg, vlm=VLM(model, proc))
    app, (_, url, _) = demo.launch(prevent_thread_lock=True)
    client = gradio_client.Client(url, verbose=False)
    yield demo, url, client, cfg, tmp
    app.close()


def _png(tmp: Path, name="img.png", size=(48, 32)) -> str:
    p = tmp / name
    Image.fromarray((np.random.RandomState(0).rand(size[1], size[0], 3) * 255).astype("uint8")).save(p)
    return str(p)


def test_binds_to_localhost_and_names_endpoints(served):
    _, url, client, _, _ = served
    assert url.startswith("http://127.0.0.1:")
    api = client.view_api(print_info=False, return_format="dict")
    assert {"/ask", "/fixes", "/carve"} <= set(api["named_endpoints"])


def test_ask_endpoint_returns_answer_and_heatmap(served):
    demo, _, client, _, tmp = served
    answer, heat = client.predict(gradio_client.handle_file(_png(tmp)), "is there a red circle ?", 0, 1, "mean",
                                  api_name="/ask")
    assert isinstance(answer, str)
    assert np.asarray(Image.open(heat)).shape[:2] == (32, 48)  # heat map over the original image
    _, heat_head = client.predict(gradio_client.handle_file(_png(tmp)), "is there a red circle ?", 1, 1, "2",
                                  api_name="/ask")
    assert not np.array_equal(np.asarray(Image.open(heat)), np.asarray(Image.open(heat_head)))


def test_carve_endpoint(served):
    _, _, client, _, tmp = served
    orig, new, refined, contrast = client.predict(gradio_client.handle_file(_png(tmp)), "what color ?",
                                                  api_name="/carve")
    assert isinstance(orig, str) and isinstance(new, str)
    assert np.asarray(Image.open(contrast)).shape[:2] == (32, 48)
    assert np.asarray(Image.open(refined)).ndim == 3


def test_fixes_endpoint_lists_methods(served):
    _, _, client, _, tmp = served
    out = client.predict(gradio_client.handle_file(_png(tmp)), "what color ?", api_name="/fixes")
    rows = out["data"] if isinstance(out, dict) else out
    from vlmkit.app import FIX_METHODS

    assert [r[0] for r in rows] == list(FIX_METHODS)  # none, paint, vhr, var, vcd, pai side by side
    assert all(isinstance(r[1], str) for r in rows)


def test_concurrent_calls_to_different_tabs(served):
    _, _, client, _, tmp = served
    results, errors = {}, []

    def call(key, *args, api):
        try:
            results[key] = client.predict(*args, api_name=api)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    img = gradio_client.handle_file(_png(tmp))
    threads = [threading.Thread(target=call, args=("ask", img, "what color ?", 0, 1, "mean"), kwargs={"api": "/ask"}),
               threading.Thread(target=call, args=("fixes", img, "what color ?"), kwargs={"api": "/fixes"})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and set(results) == {"ask", "fixes"}
    assert results["ask"][0] == client.predict(img, "what color ?", 0, 1, "mean", api_name="/ask")[0]


def test_oversized_and_non_image_uploads_are_refused(served):
    _, _, client, _, tmp = served
    big = _png(tmp, "big.png", size=(600, 500))  # 300k pixels > the 200k cap of this test server
    with pytest.raises(Exception, match="pixel"):
        client.predict(gradio_client.handle_file(big), "what color ?", 0, 1, "mean", api_name="/ask")
    txt = tmp / "notes.png"
    txt.write_text("this is not an image")
    with pytest.raises(Exception):
        client.predict(gradio_client.handle_file(str(txt)), "what color ?", 0, 1, "mean", api_name="/ask")
    with pytest.raises(Exception, match="question"):
        client.predict(gradio_client.handle_file(_png(tmp)), "  ", 0, 1, "mean", api_name="/ask")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-quic"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_runs_ask_tab_on_an_example(served):
    """Headless Chromium loads the page, picks an example, clicks Ask; the answer appears in the DOM."""
    sync_api = pytest.importorskip("playwright.sync_api")
    _, url, client, cfg, tmp = served
    demo = served[0]
    expected = client.predict(gradio_client.handle_file(cfg.examples[0]), "Is there a red circle in the image?", 0,
                              demo.num_layers - 1, "mean", api_name="/ask")[0]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="networkidle", timeout=60_000)
            page.locator("[data-testid='dataset-cell-0-0']").first.click(timeout=30_000)
            page.wait_for_timeout(1000)
            page.click("#ask-button")
            box = page.locator("#ask-answer textarea")
            page.wait_for_function("() => { const t = document.querySelector('#ask-answer textarea');"
                                   " return t && t.value.length > 0; }", timeout=60_000)
            answer = box.input_value()
            page.screenshot(path=str(tmp / "demo.png"), full_page=True)
        finally:
            browser.close()
    assert answer == expected
    assert (tmp / "demo.png").stat().st_size > 10_000
