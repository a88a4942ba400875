"""The demo app (`space/app.py` = `mage_hf.gradio_app`): its handlers on a tiny model; the real app served on
localhost under load and bad input through `gradio_client`; and driven in Debian's chromium by Playwright, with
screenshots written to `test-artifacts/space/`.

The server and browser tests need gradio, playwright and `/usr/bin/chromium` (`.ci/run` installs them). Without them
they skip locally, and fail under CI (`CI` set), so that CI cannot pass by skipping them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_modeling import tiny_config
from training_data import photo_images

from mage_hf import MageForImageClassification, MageForMaskedImageModeling, MageGenerationPipeline, MageScheduler
from mage_hf.demo import EXAMPLE_EMOJI as EMOJI_EXAMPLES

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "space"
CHROMIUM = os.environ.get("MAGE_CHROMIUM", "/usr/bin/chromium")
# As root in a sandbox with no network: no sandboxing, no GPU, and no background connections (which are refused).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
STEPS = 4


def require(what: str, available: bool):
    if not available:
        message = f"{what} is not installed (`.ci/run` installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run these tests")
        pytest.skip(message)


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


require("gradio", _importable("gradio"))

from mage_hf.gradio_app import LIMITS, Handlers, InputError, build_demo, load_models


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = MageForMaskedImageModeling(tiny_config()).eval()
    folder = tmp_path_factory.mktemp("space") / "tiny-pipeline"
    MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(model.config)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def handlers(tiny_folder) -> Handlers:
    return Handlers(load_models(str(tiny_folder), device="cpu"))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return photo_images(256)[1]


def brushed_band(size: int, rows: slice) -> Image.Image:
    """An editor layer: transparent, with an opaque white band where the user brushed."""
    layer = np.zeros((size, size, 4), dtype=np.uint8)
    layer[rows, 40:200] = 255
    return Image.fromarray(layer, "RGBA")


# ------------------------------------------------------------------------------------------------ handlers, in-process


def test_generate_is_seeded_per_image_and_limited(handlers):
    images = handlers.generate(3, STEPS, 4.5, 7)
    assert len(images) == 3 and all(im.size == (256, 256) for im in images)
    again = handlers.generate(1, STEPS, 4.5, 8)  # image 1 of the first call had seed 7 + 1
    assert np.array_equal(np.asarray(images[1]), np.asarray(again[0]))
    for count, steps, seed, message in [
        (0, STEPS, 0, "Number of images must be between 1 and 8"),
        (LIMITS.max_images + 1, STEPS, 0, "Number of images must be between"),
        (1, LIMITS.max_steps + 1, 0, "Steps must be between 1 and 50"),
        (1, STEPS, -1, "Seed must be between"),
        ("many", STEPS, 0, "Number of images must be a whole number"),
    ]:
        with pytest.raises(InputError, match=message):
            handlers.generate(count, steps, 4.5, seed)
    # An unconditional model has no Class control: whatever comes in for it is ignored.
    assert handlers._class_labels("3: cat", 2.0, 1) == (None, 1.0)


def test_class_conditional_models_get_class_and_guidance(tmp_path):
    torch.manual_seed(0)
    model = MageForMaskedImageModeling(tiny_config(num_classes=4)).eval()
    MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(model.config)).save_pretrained(
        tmp_path / "conditional"
    )
    handlers = Handlers(load_models(str(tmp_path / "conditional"), device="cpu"))
    assert handlers._class_labels("2: LABEL_2", 3.0, 2) == ([2, 2], 3.0)
    assert handlers._class_labels("unconditional", 3.0, 2) == (None, 1.0)
    a = handlers.generate(2, STEPS, 4.5, 0, "2: LABEL_2", 3.0)
    b = handlers.generate(2, STEPS, 4.5, 0, "3: LABEL_3", 3.0)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))  # the class changes the image
    for label, guidance, message in [("7", 3.0, "Class label must be between 0 and 3"),
                                     ("1", 50.0, "Guidance must be between 1 and 20")]:
        with pytest.raises(InputError, match=message):
            handlers.generate(1, STEPS, 4.5, 0, label, guidance)
    # The UI shows the Class and Guidance controls for this model.
    demo = build_demo(handlers.models)
    labels = {getattr(block, "label", None): block for block in demo.blocks.values()}
    assert labels["Class"].visible and labels["Guidance"].visible


def test_inpaint_regenerates_the_brushed_cells_and_keeps_the_rest(handlers, photo):
    editor = {"background": photo.convert("RGBA"), "layers": [brushed_band(256, slice(100, 130))], "composite": None}
    cells, result = handlers.inpaint(editor, "brush", STEPS, 0, paste_back=True)
    assert cells.size == result.size == (256, 256)
    source, out, shown = (np.asarray(im.convert("RGB")).astype(int) for im in (photo, result, cells))
    # Rows 100-129 lie in token rows 6-8 (16-pixel cells); everything outside the brushed pixels is pasted back.
    brushed = np.zeros((256, 256), dtype=bool)
    brushed[100:130, 40:200] = True
    assert np.array_equal(out[~brushed], source[~brushed])
    assert not np.array_equal(out[brushed], source[brushed])
    # The overlay tints exactly the token cells the brush touched (rows 96-143, columns 32-207) and nothing else.
    tinted = np.abs(shown - source).sum(-1) > 0
    cells_touched = np.zeros((256, 256), dtype=bool)
    cells_touched[96:144, 32:208] = True
    assert np.array_equal(tinted, cells_touched & tinted) and tinted[cells_touched].mean() > 0.95
    assert (shown[cells_touched][:, 0] >= source[cells_touched][:, 0]).all()  # tinted towards red

    # A preset mask needs no brushing; an empty brush is refused.
    _, preset = handlers.inpaint({"background": photo, "layers": [], "composite": None}, "left half", STEPS, 0)
    assert np.array_equal(np.asarray(preset)[:, 128:], np.asarray(photo)[:, 128:])
    with pytest.raises(InputError, match="The mask is empty"):
        handlers.inpaint({"background": photo, "layers": [], "composite": None}, "brush", STEPS, 0)


def test_brushing_outside_the_centre_square_is_explained(handlers):
    """A wide image is centre-cropped; a stroke on its left edge is cut away. The message says so, rather than that
    the mask is empty and to use `strength=` (which the app does not offer)."""
    wide = Image.new("RGB", (200, 64), (90, 120, 150))
    layer = np.zeros((64, 200, 4), dtype=np.uint8)
    layer[10:50, 0:30] = 255
    editor = {"background": wide, "layers": [Image.fromarray(layer, "RGBA")], "composite": None}
    with pytest.raises(InputError, match="outside the centre square the model works on"):
        handlers.inpaint(editor, "brush", STEPS, 0)


def test_outpaint_grows_the_canvas(handlers, photo):
    editor = {"background": photo, "layers": [], "composite": None}
    cells, result = handlers.outpaint(editor, "right", 0.25, STEPS, 0)
    assert result.size == (320, 256) and cells.size == (256, 256)
    assert np.array_equal(np.asarray(result)[:, :256], np.asarray(photo))  # the image's own pixels are kept
    _, uncropped = handlers.outpaint(editor, "uncrop", 0.25, STEPS, 0)
    assert uncropped.size == (256, 256)
    with pytest.raises(InputError, match="Direction must be one of"):
        handlers.outpaint(editor, "diagonal", 0.25, STEPS, 0)
    with pytest.raises(InputError, match="Amount must be between"):
        handlers.outpaint(editor, "left", 0.9, STEPS, 0)


def test_understand_finds_the_photo_itself_first(handlers):
    name, image = handlers.models.gallery[2]
    label, neighbours = handlers.understand(image)
    assert label is None and len(neighbours) == 4
    assert neighbours[0][1].startswith(f"{name}: cosine 1.0")
    scores = [float(caption.split("cosine ")[1]) for _, caption in neighbours]
    assert scores == sorted(scores, reverse=True)


def test_understand_with_a_classifier(tiny_folder, tmp_path):
    torch.manual_seed(0)
    names = {i: f"kind {i}" for i in range(7)}
    MageForImageClassification(tiny_config(use_mean_pooling=True, id2label=names)).save_pretrained(tmp_path / "clf")
    handlers = Handlers(load_models(str(tiny_folder), classifier=str(tmp_path / "clf"), device="cpu"))
    label, neighbours = handlers.understand(photo_images(128)[0])
    assert neighbours is None and len(label) == 5 and set(label) <= set(names.values())
    assert 0 < sum(label.values()) <= 1 + 1e-6


@pytest.mark.parametrize(
    "image, message",
    [
        (None, "Upload an image first"),
        (Image.new("RGB", (8, 8)), "8x8 pixels; it must be at least 32"),
        (Image.new("RGB", (5000, 40)), "5000x40 pixels; it may be at most 4096"),
    ],
)
def test_bad_uploads_are_refused_with_clear_messages(handlers, image, message):
    with pytest.raises(InputError, match=message):
        handlers.understand(image)
    with pytest.raises(InputError, match=message):
        handlers.inpaint({"background": image, "layers": [], "composite": None}, "centre square", STEPS, 0)


def test_decompression_bombs_are_refused_clearly(handlers, tmp_path):
    """A 1-bit PNG of 20000 x 20000 pixels is ~76 kB on disk; PIL refuses to decode it with its own error type,
    which neither OSError nor ValueError handling caught."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 200_000
    with pytest.raises(InputError, match="far too large; it may be at most 4096 pixels"):
        handlers.understand(str(bomb))


def test_progress_reaches_the_request_from_the_model_thread(handlers):
    """Handlers run on the app's one model thread; gr.Progress must still report to the request's event (Gradio
    finds it through context variables, which a bare submit to another thread left behind: 0 updates)."""
    import gradio as gr
    from gradio.context import LocalContext
    from types import SimpleNamespace

    updates = []
    queue = SimpleNamespace(set_progress=lambda event_id, iterables: updates.append(event_id))
    LocalContext.blocks.set(SimpleNamespace(_queue=queue))
    LocalContext.event_id.set("event-1")
    try:
        handlers.generate(1, STEPS, 4.5, 0, progress=gr.Progress())
    finally:
        LocalContext.blocks.set(None)
        LocalContext.event_id.set(None)
    assert len(updates) >= STEPS and set(updates) == {"event-1"}


def test_footer_credits_the_examples_shown(tmp_path):
    from mage_hf.gradio_app import EXAMPLES_DIR, examples_credit

    assert "scikit-image" in examples_credit(sorted(EXAMPLES_DIR.glob("*.jpg")))
    emoji = examples_credit(sorted(EMOJI_EXAMPLES.glob("*.png")))
    assert "Noto Emoji" in emoji and "scikit-image" not in emoji
    assert "--examples folder" in examples_credit([tmp_path / "mine.png"])


def test_a_folder_that_is_not_a_trained_classifier_is_refused(tiny_folder):
    with pytest.raises(SystemExit, match="is not a trained MageForImageClassification: .* missing"):
        load_models(str(tiny_folder), classifier=str(tiny_folder / "model"), device="cpu")


def test_unreadable_file_is_refused(handlers, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="not an image this app can read"):
        handlers.understand(str(bad))


def test_small_outputs_are_shown_enlarged_pixel_for_pixel(tmp_path):
    from mage_hf.gradio_app import OutputFiles

    files = OutputFiles()
    sample = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    shown = Image.open(files.save(sample))
    assert shown.size == (384, 256)  # x8: the shorter side reaches 256
    assert np.array_equal(np.asarray(shown)[::8, ::8], np.asarray(sample))  # each model pixel is an 8x8 block
    assert Image.open(files.save(Image.new("RGB", (256, 256)))).size == (256, 256)  # big enough: as it is


def test_examples_follow_the_model(monkeypatch, tmp_path):
    from mage_hf.gradio_app import EMBEDDED_MODEL, EXAMPLES_DIR, example_images

    monkeypatch.delenv("MAGE_EXAMPLES", raising=False)
    assert [p.parent for p in example_images(str(EMBEDDED_MODEL))] == [EMOJI_EXAMPLES] * 8
    assert all(p.parent == EXAMPLES_DIR for p in example_images("org/some-model"))
    Image.new("RGB", (40, 40)).save(tmp_path / "mine.webp")
    (tmp_path / "notes.txt").write_text("not an example")
    assert example_images("org/some-model", tmp_path) == [tmp_path / "mine.webp"]
    monkeypatch.setenv("MAGE_EXAMPLES", str(tmp_path))
    assert example_images(str(EMBEDDED_MODEL)) == [tmp_path / "mine.webp"]
    with pytest.raises(SystemExit, match="No example images"):
        example_images("org/some-model", tmp_path / "empty-or-missing")


def test_no_model_configured_is_a_clear_error(monkeypatch):
    from mage_hf import gradio_app

    monkeypatch.delenv("MAGE_MODEL", raising=False)
    monkeypatch.setattr(gradio_app, "EMBEDDED_MODEL", Path("/nonexistent"))
    with pytest.raises(SystemExit, match="set MAGE_MODEL"):
        gradio_app.default_model()


def test_mage_hf_demo_without_gradio_says_how_to_install_it(monkeypatch):
    """Before any model loads (the app module imports Gradio only when it builds the page)."""
    from mage_hf import cli, gradio_app

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setattr(gradio_app, "main", lambda argv: pytest.fail("the app must not start"))
    with pytest.raises(SystemExit, match=r"needs Gradio: pip install 'mage-hf\[space\]'"):
        cli.main(["demo", "--model", "org/name"])


def test_mage_hf_demo_runs_the_app(monkeypatch):
    from mage_hf import cli, gradio_app

    seen = []
    monkeypatch.setattr(gradio_app, "main", seen.append)
    assert cli.main(["demo", "--model", "org/name", "--port", "7999"]) == 0
    assert seen == [["--port", "7999", "--model", "org/name"]]
    # Unset flags leave the app's defaults, which follow Gradio's environment variables as `python space/app.py` does.
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7001")
    assert cli.main(["demo"]) == 0
    assert seen[-1] == [] and (gradio_app.parse_args(seen[-1]).host, gradio_app.parse_args(seen[-1]).port) == (
        "0.0.0.0", 7001)


# ------------------------------------------------------------------------------------------- the served app (server)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python space/app.py` on a free localhost port, with its default model: the embedded emoji model and its
    example emoji (its own working directory, so that the example cache stays out of the repository)."""
    port = _free_port()
    workdir = tmp_path_factory.mktemp("server")
    env = {k: v for k, v in os.environ.items() if k not in ("MAGE_MODEL", "MAGE_EXAMPLES", "MAGE_CLASSIFIER")}
    env.update({"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"})
    with open(workdir / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "space" / "app.py"), "--port", str(port)], cwd=workdir, env=env,
            stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited with {process.returncode}: {(workdir / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                process.kill()
                raise RuntimeError(f"the app did not start in time: {(workdir / 'server.log').read_text()}")
            time.sleep(0.5)
        yield {"url": url, "process": process, "log": workdir / "server.log"}
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def _request(client, kind: int, example: str):
    from gradio_client import handle_file

    if kind == 0:
        return client.submit(2, STEPS, 4.5, kind, "unconditional", 3.0, api_name="/generate")
    if kind == 1:
        editor = {"background": handle_file(example), "layers": [], "composite": None}
        return client.submit(editor, "centre square", STEPS, 1, True, api_name="/inpaint")
    return client.submit(handle_file(example), api_name="/understand")


def test_twenty_concurrent_requests_all_complete_with_bounded_memory(server, client, photo, tmp_path):
    example = tmp_path / "photo.png"
    photo.save(example)
    pid = server["process"].pid
    rss = []
    # Identical requests on purpose: identical outputs served concurrently once truncated downloads (see
    # `gradio_app.OutputFiles`).
    for _round in range(5):
        jobs = [_request(client, i % 3, str(example)) for i in range(20)]  # submitted at once: all queued together
        results = [job.result(timeout=300) for job in jobs]
        for i, result in enumerate(results):
            if i % 3 == 0:
                assert len(result) == 2 and all(Path(item["image"]).is_file() for item in result)
            elif i % 3 == 1:
                assert all(Image.open(path).size == (256, 256) for path in result)
            else:
                assert len(result[1]) == 4
        rss.append(_rss_mb(pid))
    # Memory is bounded: after a first round has warmed everything up, more requests do not keep adding to it
    # (with the model on Gradio's worker threads it grew by 70-150 MB per round).
    assert max(rss[1:]) - rss[1] < 96, f"resident memory kept growing: {rss} MB"
    assert server["process"].poll() is None


def test_oversized_and_malformed_inputs_get_clear_errors_and_the_app_survives(server, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8)).save(small)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (5000, 40)).save(wide)
    huge = tmp_path / "huge.png"
    huge.write_bytes(os.urandom(11 * 2**20))  # over the 10 MB upload limit
    cases = [
        (lambda: client.predict(100, STEPS, 4.5, 0, "unconditional", 3.0, api_name="/generate"), "maximum value 8"),
        (lambda: client.predict(1, 500, 4.5, 0, "unconditional", 3.0, api_name="/generate"), "maximum value 50"),
        (lambda: client.predict(handle_file(str(bad)), api_name="/understand"), "not an image this app can read"),
        (lambda: client.predict(handle_file(str(small)), api_name="/understand"), "at least 32 pixels"),
        (lambda: client.predict(handle_file(str(wide)), api_name="/understand"), "at most 4096 pixels"),
        (lambda: client.predict({"background": handle_file(str(small)), "layers": [], "composite": None},
                                "centre square", STEPS, 0, True, api_name="/inpaint"), "at least 32 pixels"),
    ]
    for call, message in cases:
        with pytest.raises(AppError, match=message):
            call()
    with pytest.raises(Exception, match="(?i)size|large|413"):  # refused by the upload route itself
        client.predict(handle_file(str(huge)), api_name="/understand")
    # Still serving.
    assert len(client.predict(1, STEPS, 4.5, 0, "unconditional", 3.0, api_name="/generate")) == 1
    assert server["process"].poll() is None


# ------------------------------------------------------------------------------------------------------ in a browser


@pytest.fixture(scope="module")
def browser():
    require("playwright", _importable("playwright"))
    require(f"chromium ({CHROMIUM})", Path(CHROMIUM).is_file())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Debian's chromium, not Playwright's own download (which needs the network).
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server["url"])
    page.wait_for_selector("#generate-button", timeout=60_000)
    yield page
    page.close()


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    with Image.open(path) as shot:
        assert shot.size == (1280, 900)
    return path


def test_browser_generate_shows_the_gallery(page):
    assert "embedded demo model" in page.locator("body").inner_text()  # the app says which model it serves
    # The embedded model is class-conditional: pick a class by its name.
    page.locator("#generate-class input").click()
    page.get_by_role("option", name="6: Smileys & Emotion").click()
    page.click("#generate-button")
    # Four decoded images (not broken links): the gallery's images, loaded.
    page.wait_for_function(
        "[...document.querySelectorAll('#generate-gallery img')].filter(e => e.complete && e.naturalWidth > 0)"
        ".length >= 4",
        timeout=120_000,
    )
    widths = page.locator("#generate-gallery img").evaluate_all("els => els.map(e => e.naturalWidth)")
    assert len(widths) >= 4 and 256 in widths  # 32 px samples, shown 8x as blocks of pixels
    _screenshot(page, "generate")


def test_browser_inpaint_with_a_brushed_mask(page, tmp_path):
    example = tmp_path / "emoji.png"  # a held-out emoji, at 256 px so that the brush is easy to place
    Image.open(sorted(EMOJI_EXAMPLES.glob("*.png"))[6]).resize((256, 256), Image.NEAREST).save(example)
    page.get_by_role("tab", name="Inpaint / Outpaint").click()
    page.locator("#inpaint-editor input[type=file]").set_input_files(str(example))
    canvas = page.locator("#inpaint-editor canvas").first
    canvas.wait_for(timeout=30_000)
    page.locator("#inpaint-editor button[aria-label='Brush']").click()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.45
    page.mouse.move(x, y)
    page.mouse.down()
    for i in range(1, 16):
        page.mouse.move(x + i * box["width"] * 0.012, y, steps=2)
    page.mouse.up()
    page.click("#inpaint-button")
    page.wait_for_selector("#inpaint-result img", timeout=120_000)
    page.wait_for_selector("#inpaint-cells img", timeout=120_000)
    page.wait_for_function(
        "[...document.querySelectorAll('#inpaint-result img, #inpaint-cells img')]"
        ".filter(e => e.complete && e.naturalWidth === 256).length === 2",
        timeout=60_000,
    )
    _screenshot(page, "inpaint")


def test_browser_bad_upload_shows_the_error(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.get_by_role("tab", name="Understand").click()
    page.locator("#understand-image input[type=file]").set_input_files(str(bad))
    page.click("#understand-button")
    page.get_by_text("not an image this app can read").first.wait_for(timeout=60_000)
    _screenshot(page, "bad-upload")


def test_browser_clicking_an_example_runs_it(page):
    page.get_by_role("tab", name="Understand").click()
    # The Understand tab's examples are the gallery photos; a click fills the input and shows the (cached) result.
    page.locator(".gallery-item, button.gallery-item, [data-testid='examples'] img").first.click()
    page.wait_for_function(
        "[...document.querySelectorAll('#understand-gallery img')].filter(e => e.complete && e.naturalWidth > 0)"
        ".length >= 4",
        timeout=120_000,
    )
    captions = page.locator("#understand-gallery").inner_text()
    assert "cosine 1.000" in captions  # the photo itself is its own nearest neighbour
    _screenshot(page, "understand-example")
