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
from vlmkit.app import Demo, DemoConfig, make_examples, make_gui_examples  # noqa: E402
from vlmkit.models.vlm import VLM  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, proc = tiny.build("llava", pad=True)
    tmp = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(port=_free_port(), max_pixels=200_000, examples=make_examples(tmp / "ex", 2),
                     gui_examples=make_gui_examples(tmp / "gui", 2))
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
    assert {"/ask", "/fixes", "/carve", "/detect", "/ground"} <= set(api["named_endpoints"])


def test_ask_endpoint_returns_answer_and_heatmap(served):
    _, _, client, _, tmp = served
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


def _check_detections(annotated, rows, size):
    """The AnnotatedImage payload and the JSON rows agree, and every box / mask lies inside the image."""
    W, H = size
    base = np.asarray(Image.open(annotated["image"]))
    assert base.shape[:2] == (H, W)
    assert len(annotated["annotations"]) == len(rows)
    for ann, row in zip(annotated["annotations"], rows):
        assert isinstance(row["label"], str) and row["label"]
        assert ann["label"].split(". ", 1)[1].startswith(row["label"])  # legend "k. label score"
        assert 0.0 <= row["score"] <= 1.0
        x0, y0, x1, y1 = row["box"]
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        layer = np.asarray(Image.open(ann["image"]))
        assert layer.shape == (H, W, 4)
        ys, xs = np.nonzero(layer[..., 3])  # mask + box outline: nothing outside the box
        assert len(xs) and xs.min() >= int(x0) and xs.max() < np.ceil(x1) and ys.min() >= int(y0) \
            and ys.max() < np.ceil(y1)
        assert 0 < row["area"] <= (x1 - x0) * (y1 - y0)


def test_detect_endpoint_open_ended_and_named(served):
    _, _, client, cfg, _ = served
    scene = gradio_client.handle_file(cfg.examples[0])
    annotated, rows = client.predict(scene, "", 1, False, api_name="/detect")
    _check_detections(annotated, rows, (224, 224))
    annotated, rows = client.predict(scene, "red circle, Blue Star", 2, False, api_name="/detect")
    _check_detections(annotated, rows, (224, 224))
    assert {r["label"] for r in rows} <= {"red circle", "blue star"}  # open vocabulary: only the given names
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    with pytest.raises(Exception, match="at most"):
        client.predict(scene, ",".join(f"n{i}" for i in range(40)), 1, False, api_name="/detect")


class _DiscSegmenter:
    """A stand-in SAM: a disc of radius 10 around the first positive point, predicted IoU 0.9."""

    def set_image(self, image):
        self.shape = np.asarray(image).shape[:2]

    def predict(self, points, labels, *, mask_input=None, multimask=True):
        from vlmkit.grounding.segmenters import Segmentation

        h, w = self.shape
        x, y = np.asarray(points)[np.asarray(labels) == 1][0]
        yy, xx = np.mgrid[:h, :w]
        masks = ((xx - x) ** 2 + (yy - y) ** 2 <= 100)[None].repeat(3 if multimask else 1, 0)
        return Segmentation(masks, np.full(len(masks), 0.9), np.zeros((len(masks), 64, 64), np.float32))


def test_detect_renders_masks_and_boxes(served):
    """With a segmenter whose masks are known, every detection's layer holds its mask and its box outline."""
    demo, _, _, cfg, _ = served
    img = Image.open(cfg.examples[0]).convert("RGB")
    (base, layers), rows = Demo(cfg, vlm=demo.vlm, segmenter=_DiscSegmenter()).detect(img, "", 1, False)
    assert rows and len(layers) == len(rows) and base.shape == (224, 224, 3)
    for (layer, label), row in zip(layers, rows):
        x0, y0, x1, y1 = (round(v) for v in row["box"])
        assert layer.shape == (224, 224) and row["label"] in label
        assert 0 < row["area"] <= 21 * 21 and (x1 - x0) <= 21 and (y1 - y0) <= 21  # the disc's mask and box
        px, py = (int(v) for v in row["point"])
        assert x0 <= px < x1 and y0 <= py < y1
        assert layer[y0, x0] == 1.0 and layer[y1 - 1, x1 - 1] == 1.0  # box corners outlined
        assert int((layer > 0).sum()) >= row["area"] and layer.max() == 1.0


def test_detect_segmenter_checkpoint_errors(served, tmp_path, monkeypatch):
    demo, _, _, cfg, _ = served
    from vlmkit.errors import ModelLoadError

    missing = tmp_path / "no-sam.pth"
    with pytest.raises(ModelLoadError, match="no-sam.pth"):  # an explicit --sam-checkpoint must load
        Demo(DemoConfig(sam_checkpoint=str(missing)), vlm=demo.vlm)
    from vlmkit.grounding import segmenters

    monkeypatch.setattr(segmenters, "default_sam_path", lambda: tmp_path / "gone")
    degraded = Demo(DemoConfig(), vlm=demo.vlm)  # shipped SAM missing: the demo starts, Detect says why
    assert degraded.segmenter is None and "gone" in degraded.segmenter_error
    with pytest.raises(ValueError, match="unavailable"):
        degraded.detect(Image.open(cfg.examples[0]), "", 1, False)


def test_ground_tab_uses_the_ground_model_with_its_head(served, tmp_path):
    from vlmkit.default import shipped_dir
    from vlmkit.errors import ModelLoadError

    demo = served[0]
    assert "attention" in demo.grounder_name  # a passed-in model without a head: attention-only
    if (shipped_dir("gui") / "config.json").is_file():
        gui_demo = Demo(DemoConfig(ground_model="gui"), vlm=demo.vlm)
        assert gui_demo.grounder_name == "gui+pointer"
    with pytest.raises(ModelLoadError, match="nowhere"):  # an explicit --ground-model must load
        Demo(DemoConfig(ground_model=str(tmp_path / "nowhere")), vlm=demo.vlm)


def test_ground_endpoint(served):
    _, _, client, cfg, _ = served
    screen, instruction = cfg.gui_examples[0]
    W, H = Image.open(screen).size
    marked, heat, action, details = client.predict(gradio_client.handle_file(screen), instruction, api_name="/ground")
    x, y = details["point"]
    assert 0 <= x < W and 0 <= y < H and details["size"] == [W, H]
    act = details["action"]
    assert action == f"click(x={act['x']}, y={act['y']})" and abs(act["x"] - x) <= 0.6 and abs(act["y"] - y) <= 0.6
    assert np.allclose(details["point_norm"], [x / W, y / H], atol=1e-3)
    scores = [c[2] for c in details["candidates"]]
    assert scores == sorted(scores, reverse=True) and details["candidates"][0][:2] == details["point"]
    shot = np.asarray(Image.open(screen).convert("RGB"))
    for out in (marked, heat):
        arr = np.asarray(Image.open(out).convert("RGB"))
        assert arr.shape == shot.shape  # heat map and marker drawn over the screenshot at its own size
        assert not np.array_equal(arr, shot)
    with pytest.raises(Exception, match="instruction"):
        client.predict(gradio_client.handle_file(screen), " ", api_name="/ground")


def test_concurrent_calls_to_different_tabs(served):
    _, _, client, cfg, tmp = served
    results, errors = {}, []

    def call(key, *args, api):
        try:
            results[key] = client.predict(*args, api_name=api)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    img = gradio_client.handle_file(_png(tmp))
    scene = gradio_client.handle_file(cfg.examples[0])
    screen, instruction = cfg.gui_examples[0]
    threads = [threading.Thread(target=call, args=("ask", img, "what color ?", 0, 1, "mean"), kwargs={"api": "/ask"}),
               threading.Thread(target=call, args=("fixes", img, "what color ?"), kwargs={"api": "/fixes"}),
               threading.Thread(target=call, args=("detect", scene, "", 1, False), kwargs={"api": "/detect"}),
               threading.Thread(target=call, args=("ground", gradio_client.handle_file(screen), instruction),
                                kwargs={"api": "/ground"})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and set(results) == {"ask", "fixes", "detect", "ground"}
    assert results["ask"][0] == client.predict(img, "what color ?", 0, 1, "mean", api_name="/ask")[0]
    # the model lock keeps captures apart: results under load equal those of lone calls
    assert results["detect"][1] == client.predict(scene, "", 1, False, api_name="/detect")[1]
    assert results["ground"][3] == client.predict(gradio_client.handle_file(screen), instruction,
                                                  api_name="/ground")[3]


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
