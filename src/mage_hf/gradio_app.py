# Copyright 2026 The mage-hf authors. MIT licence.
"""The mage-hf demo app: generate, inpaint / outpaint and understand images with MAGE in the browser (Gradio).

It is the Hugging Face Space in `space/` (whose `app.py` only launches it) and runs locally with `mage-hf demo`:

    MAGE_MODEL=path/to/folder-or-org/name mage-hf demo --port 7860

The model is a generation pipeline or MAGE model folder, or a Hub repo id, from `--model` or `MAGE_MODEL`. The
default is the project's embedded demo model (a small class-conditional MAGE trained on emoji, see
`training/recipes/emoji`). `--classifier` / `MAGE_CLASSIFIER` adds a `MageForImageClassification` for the Understand
tab, which otherwise shows the nearest neighbours, by MAGE encoder features, among a small gallery of example images:
held-out emoji for the embedded model, photos for any other (`--examples` / `MAGE_EXAMPLES` names another folder).
The app holds no model code: every result comes from the library's pipelines and models. Needs
`pip install "mage-hf[space]"`.
"""

from __future__ import annotations

import argparse
import collections
import contextvars
import functools
import os
import random
import tempfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .demo import EMBEDDED_MODEL
from .demo import EXAMPLE_EMOJI as EMOJI_EXAMPLES_DIR
from .modeling_mage import MageForImageClassification, random_weights
from .pipeline_mage import (
    OUTPAINT_DIRECTIONS,
    MageGenerationPipeline,
    MageInpaintPipeline,
    center_square,
    make_outpaint_inputs,
    prepare_image,
    token_mask_overlay,
)

__all__ = [
    "LIMITS",
    "DemoModels",
    "Handlers",
    "InputError",
    "Limits",
    "OutputFiles",
    "build_demo",
    "default_model",
    "load_models",
    "main",
]

EXAMPLES_DIR = Path(__file__).parent / "data" / "examples"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DISPLAY_SIZE = 256  # outputs smaller than this are shown enlarged (see OutputFiles)
MASK_PRESETS = ("brush", "centre square", "left half", "right half", "top half", "bottom half")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The sliders stop there, and the handlers check again, because API clients
    bypass the sliders."""

    max_images: int = 8
    max_steps: int = 50
    min_side: int = 32
    max_side: int = 4096
    max_file_size: str = "10mb"
    queue_size: int = 64


LIMITS = Limits()


class InputError(ValueError):
    """A request the app refuses; its message is shown to the user as it is."""


def default_model() -> str:
    """`MAGE_MODEL`, else the embedded demo model; a clear error when there is neither."""
    if os.environ.get("MAGE_MODEL"):
        return os.environ["MAGE_MODEL"]
    if (EMBEDDED_MODEL / "model_index.json").is_file():
        return str(EMBEDDED_MODEL)
    raise SystemExit(
        "No model for the demo: set MAGE_MODEL (or pass --model) to a converted or trained folder, e.g. one written "
        "by `mage-hf convert` or training/train_mage.py, or to a Hub repo id."
    )


@dataclass
class DemoModels:
    """What the app runs: the generation and inpainting pipelines (sharing one model), an optional classifier, and
    the gallery the Understand tab searches."""

    name: str
    generate: MageGenerationPipeline
    inpaint: MageInpaintPipeline
    classifier: MageForImageClassification | None
    gallery: list[tuple[str, Image.Image]]
    gallery_features: torch.Tensor  # (N, D), unit length
    examples: list[Path]  # the example images of every tab, which are also the gallery

    @property
    def config(self):
        return self.generate.model.config

    @property
    def resolution(self) -> int:
        return self.generate.resolution

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """Mean MAGE encoder output over the image tokens, unit length: `(N, D)`."""
        model = self.generate.model
        pixels = prepare_image(images, self.resolution).to(model.device, model.dtype)
        hidden = model.mage(pixel_values=pixels).last_hidden_state[:, 1:]  # (N, L, D)
        return torch.nn.functional.normalize(hidden.float().mean(dim=1), dim=-1).cpu()


def _is_embedded(model: str) -> bool:
    """Whether `model` (a path or a Hub repo id) is the embedded demo model's folder."""
    return Path(model).exists() and Path(model).resolve() == EMBEDDED_MODEL.resolve()


def example_images(model: str, folder: str | os.PathLike | None = None) -> list[Path]:
    """The example images: `folder` (or `MAGE_EXAMPLES`) if given, else the held-out emoji for the embedded emoji model
    and the photos for any other model."""
    folder = folder or os.environ.get("MAGE_EXAMPLES")
    if folder is None:
        folder = EMOJI_EXAMPLES_DIR if _is_embedded(model) else EXAMPLES_DIR
    paths = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"No example images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    return paths


def load_models(model: str | None = None, classifier: str | None = None, device: str | None = None,
                examples: str | os.PathLike | None = None) -> DemoModels:
    """Load the pipelines (and classifier) on `device` (CUDA when present, else the CPU): float32 on the CPU,
    float16 on CUDA. `examples`: see [`example_images`]."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    model = model or default_model()
    generate = MageGenerationPipeline.from_pretrained(model, dtype=dtype).to(device)
    generate.set_progress_bar_config(disable=True)
    inpaint = MageInpaintPipeline(**generate.components)
    inpaint.set_progress_bar_config(disable=True)
    classifier = classifier or os.environ.get("MAGE_CLASSIFIER")
    head = None
    if classifier:
        head, loading = MageForImageClassification.from_pretrained(classifier, output_loading_info=True)
        missing = random_weights(loading)
        if missing:  # e.g. a pre-training folder: its classifier head would be random
            raise SystemExit(
                f"--classifier {classifier} is not a trained MageForImageClassification: {len(missing)} of its weights "
                f"are missing (e.g. {', '.join(missing[:3])}) and would be random. Give a folder written by "
                "training/train_classifier.py or converted from a fine-tuned checkpoint."
            )
        head = head.to(device).eval()
    paths = example_images(str(model), examples)
    gallery = [(path.stem, Image.open(path).convert("RGB")) for path in paths]
    models = DemoModels(str(model), generate, inpaint, head, gallery, torch.empty(0), paths)
    models.gallery_features = models.features([image for _, image in gallery])
    return models


# ---------------------------------------------------------------------------------------------------- validation


def _int_in(name: str, value, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number, got {value!r}.") from None
    if not low <= number <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {number}.")
    return number


def _checked_image(image, what: str = "image") -> Image.Image:
    """An uploaded image, refused with a clear message when missing, unreadable, too small or too large."""
    if image is None:
        raise InputError(f"Upload an {what} first.")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                image = opened.copy()
        except Image.DecompressionBombError:  # a tiny file that would decode to hundreds of millions of pixels
            raise InputError(
                f"The {what} is far too large; it may be at most {LIMITS.max_side} pixels on each side."
            ) from None
        except (OSError, ValueError) as error:
            raise InputError(f"The uploaded file is not an image this app can read ({error}).") from None
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    width, height = image.size
    if min(width, height) < LIMITS.min_side:
        raise InputError(
            f"The {what} is {width}x{height} pixels; it must be at least {LIMITS.min_side} pixels on each side."
        )
    if max(width, height) > LIMITS.max_side:
        raise InputError(
            f"The {what} is {width}x{height} pixels; it may be at most {LIMITS.max_side} pixels on each side. "
            "Resize it and upload it again."
        )
    return image


def _editor_image_and_mask(value) -> tuple[Image.Image, Image.Image | None]:
    """The ImageEditor's background and the brushed mask (`L`, white = brushed; `None` when nothing is brushed)."""
    if not isinstance(value, dict) or value.get("background") is None:
        raise InputError("Upload an image first (drop it on the editor, or pick an example).")
    background = _checked_image(value["background"])
    mask = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = _checked_image(layer, "mask layer")
        alpha = np.asarray(layer.convert("RGBA").resize(background.size, Image.NEAREST))[..., 3] > 0
        mask = alpha if mask is None else (mask | alpha)
    if mask is None or not mask.any():
        return background, None
    return background, Image.fromarray(mask.astype(np.uint8) * 255)


def _preset_mask(preset: str, size: int) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    half, quarter = size // 2, size // 4
    regions = {
        "centre square": (slice(quarter, size - quarter), slice(quarter, size - quarter)),
        "left half": (slice(None), slice(0, half)),
        "right half": (slice(None), slice(half, None)),
        "top half": (slice(0, half), slice(None)),
        "bottom half": (slice(half, None), slice(None)),
    }
    if preset not in regions:
        raise InputError(f"Unknown mask preset {preset!r}; choose one of {', '.join(MASK_PRESETS)}.")
    mask[regions[preset]] = 255
    return Image.fromarray(mask)


def _generators(seed, count: int) -> list[torch.Generator]:
    seed = _int_in("Seed", seed, 0, 2**63 - 1)
    return [torch.Generator().manual_seed(seed + i) for i in range(count)]  # image i is the same in any batch


def _to_pil(image: torch.Tensor) -> Image.Image:
    """`(3, H, W)` in [0, 1] -> RGB PIL image."""
    return Image.fromarray((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def _progress_callback(progress, steps: int, desc: str):
    def callback(pipeline, step, timestep, tensors):
        progress((step + 1) / steps, desc=desc)
        return {}

    return callback


# ------------------------------------------------------------------------------------------------------- handlers


def _on_model_thread(method):
    """Run a handler on the one thread that touches the model. Gradio calls handlers from a pool of worker threads;
    glibc gives each thread its own memory arena, so a model run on many threads keeps up to one arena's worth of
    freed activations per thread (resident memory grew by ~100 MB per 20 requests in the load test). One thread
    keeps it bounded, and also keeps the pipelines (which share a model and a stateful scheduler) to one job at a
    time whatever the queue settings."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        # In the request's context: gr.Progress finds its event through Gradio's context variables, which a plain
        # submit to another thread would leave behind (the progress bar then never moved).
        context = contextvars.copy_context()
        return self._model_thread.submit(context.run, method, self, *args, **kwargs).result()

    return wrapped


class Handlers:
    """The functions behind the app's buttons, on plain Python values (testable without a browser)."""

    def __init__(self, models: DemoModels):
        self.models = models
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mage-model")

    def _class_labels(self, class_label, guidance_scale, count: int):
        num_classes = self.models.config.num_classes
        if not num_classes or class_label in (None, "", "unconditional"):
            return None, 1.0
        label = _int_in("Class label", str(class_label).split(":")[0], 0, num_classes - 1)
        try:
            guidance = float(guidance_scale)
        except (TypeError, ValueError):
            raise InputError(f"Guidance must be a number, got {guidance_scale!r}.") from None
        if not 1.0 <= guidance <= 20.0:
            raise InputError(f"Guidance must be between 1 and 20, got {guidance}.")
        return [label] * count, guidance

    @_on_model_thread
    def generate(self, count, steps, choice_temperature, seed, class_label=None, guidance_scale=1.0, progress=None):
        count = _int_in("Number of images", count, 1, LIMITS.max_images)
        steps = _int_in("Steps", steps, 1, LIMITS.max_steps)
        labels, guidance = self._class_labels(class_label, guidance_scale, count)
        callback = _progress_callback(progress, steps, "Decoding tokens") if progress is not None else None
        return self.models.generate(
            num_images=count,
            num_inference_steps=steps,
            choice_temperature=float(choice_temperature),
            generator=_generators(seed, count),
            class_labels=labels,
            guidance_scale=guidance,
            callback_on_step_end=callback,
        ).images

    @_on_model_thread
    def inpaint(self, editor, preset, steps, seed, paste_back=True, progress=None):
        steps = _int_in("Steps", steps, 1, LIMITS.max_steps)
        image, brushed = _editor_image_and_mask(editor)
        if preset == "brush":
            if brushed is None:
                raise InputError(
                    "The mask is empty: brush over the area to regenerate, or choose a mask preset."
                )
            mask = center_square(brushed)
            if not np.asarray(mask).any():
                raise InputError(
                    "The brushed area lies outside the centre square the model works on (images are centre-cropped "
                    "to a square): brush inside the middle of the image, or crop it first."
                )
        else:
            mask = _preset_mask(preset, min(image.size))
        square = center_square(image)  # transparent areas are composited onto white by the pipeline
        callback = _progress_callback(progress, steps, "Inpainting") if progress is not None else None
        out = self.models.inpaint(
            square, mask_image=mask, num_inference_steps=steps, generator=_generators(seed, 1),
            paste_back=bool(paste_back), callback_on_step_end=callback,
        )
        shown = _to_pil(prepare_image(square, self.models.resolution)[0])  # what the model saw
        return token_mask_overlay(shown, out.token_mask[0]), out.images[0]

    @_on_model_thread
    def outpaint(self, editor, direction, amount, steps, seed, progress=None):
        steps = _int_in("Steps", steps, 1, LIMITS.max_steps)
        if direction not in OUTPAINT_DIRECTIONS:
            raise InputError(f"Direction must be one of {', '.join(OUTPAINT_DIRECTIONS)}, got {direction!r}.")
        amount = float(amount)
        if not 0.05 <= amount <= 0.5:
            raise InputError(f"Amount must be between 0.05 and 0.5 of the image size, got {amount}.")
        image, _ = _editor_image_and_mask(editor)
        square = center_square(image)
        callback = _progress_callback(progress, steps, "Outpainting") if progress is not None else None
        out = self.models.inpaint.outpaint(
            square, direction=direction, amount=amount, num_inference_steps=steps, generator=_generators(seed, 1),
            callback_on_step_end=callback,
        )
        window, _ = make_outpaint_inputs(prepare_image(square, self.models.resolution), direction, amount)
        shown = _to_pil(window[0])
        return token_mask_overlay(shown, out.token_mask[0]), out.images[0]

    @_on_model_thread
    @torch.no_grad()
    def understand(self, image, top_k=4):
        """Top-5 classes with a classifier, else the `top_k` nearest gallery photos by encoder features."""
        square = center_square(_checked_image(image)).convert("RGB")
        classifier = self.models.classifier
        if classifier is not None:
            pixels = prepare_image(square, classifier.config.vq_config.resolution).to(classifier.device)
            probs = classifier(pixel_values=pixels.to(classifier.dtype)).logits.float().softmax(-1)[0].cpu()
            names = classifier.config.id2label
            top = probs.topk(min(5, probs.numel()))
            return {names.get(int(i), str(int(i))): float(p) for p, i in zip(top.values, top.indices)}, None
        similarity = self.models.features([square])[0] @ self.models.gallery_features.T  # (N,)
        order = similarity.argsort(descending=True)[: int(top_k)]
        gallery = self.models.gallery
        return None, [(gallery[i][1], f"{gallery[i][0]}: cosine {float(similarity[i]):.3f}") for i in order]


class OutputFiles:
    """PNG files for the app's outputs, handed to Gradio as paths. Gradio re-writes the cache file of a returned PIL
    image in place, so two requests with identical outputs (the same seed, or the same gallery photos) could
    truncate a file that another client is downloading ("Too little data for declared Content-Length", seen in the
    load test); returned files it copies once, atomically. The newest `keep` files are kept (Gradio has copied the
    older ones long before).

    Images whose shorter side is under `display_size` (a 32 px model's samples) are saved enlarged by a whole
    factor with nearest-neighbour resampling: each pixel the model made becomes a block, rather than a blur that the
    browser would make of them."""

    def __init__(self, keep: int = 512, display_size: int = DISPLAY_SIZE):
        self.folder = Path(tempfile.mkdtemp(prefix="mage-demo-"))
        self.keep = keep
        self.display_size = display_size
        self._files: collections.deque[Path] = collections.deque()
        self._lock = threading.Lock()

    def save(self, image: Image.Image) -> str:
        path = self.folder / f"{uuid.uuid4().hex}.png"
        factor = -(-self.display_size // min(image.size))  # ceil
        if factor > 1:
            image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
        image.save(path)
        with self._lock:
            self._files.append(path)
            while len(self._files) > self.keep:
                self._files.popleft().unlink(missing_ok=True)
        return str(path)


# ------------------------------------------------------------------------------------------------------------ UI


def _gradio_errors(fn):
    """Show `InputError`s (and the library's own `ValueError`s about bad input) as Gradio error messages."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, ValueError, TypeError) as error:
            raise gr.Error(str(error), title="Cannot do that") from error

    return wrapped


def _checked_upload(component):
    """`component` (a Gradio image component), refusing unreadable uploads with a clear message instead of a
    generic server error. (Its `preprocess` is wrapped on the instance: a subclass would make Gradio write a `.pyi`
    stub next to this module.)"""
    import gradio as gr

    preprocess = component.preprocess

    def checked_preprocess(payload):
        try:
            return preprocess(payload)
        except Image.DecompressionBombError as error:  # a small file that would decode to a huge image
            raise gr.Error(
                f"The uploaded image is far too large; it may be at most {LIMITS.max_side} pixels on each side.",
                title="Image too large",
            ) from error
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three for broken files
            raise gr.Error(
                f"The uploaded file is not an image this app can read ({type(error).__name__}). "
                "Upload a PNG, JPEG or WebP image.",
                title="Cannot read the upload",
            ) from error

    component.preprocess = checked_preprocess
    return component


def examples_credit(paths: list[Path]) -> str:
    """Where the example images come from, for the page's footer: the packaged photos, the packaged emoji, or the
    user's own folder."""
    folders = {Path(path).parent.resolve() for path in paths}
    if folders == {EXAMPLES_DIR.resolve()}:
        return "Example photos: scikit-image's data set (public domain / CC0)."
    if folders == {Path(EMOJI_EXAMPLES_DIR).resolve()}:
        return "Example emoji: Google's Noto Emoji (Apache License 2.0), composited onto white."
    return "Example images: the app's --examples folder."


def _model_title(name: str) -> str:
    """How the page names the model: the embedded one by what it is, others by their path or repo id."""
    if _is_embedded(name):
        return "the embedded demo model (a small class-conditional MAGE trained on Noto emoji by mage-hf)"
    return f"`{name}`"


def build_demo(models: DemoModels):
    """The Gradio Blocks app. Every model call shares one queue slot (`concurrency_id="model"`): the pipelines
    share a model and a scheduler, and two CPU-bound jobs at once only slow each other down."""
    import gradio as gr

    handlers = Handlers(models)
    config = models.config
    conditional = config.num_classes > 0
    examples = [str(path) for path in models.examples]
    model_slot = {"concurrency_limit": 1, "concurrency_id": "model"}

    files = OutputFiles()
    track = gr.Progress()  # as a default value, it tells Gradio to pass each call its own progress tracker

    def generate(count, steps, temperature, seed, class_label, guidance, progress=track):
        images = handlers.generate(count, steps, temperature, seed, class_label, guidance, progress=progress)
        return [files.save(image) for image in images]

    def inpaint(editor, preset, steps, seed, paste_back, progress=track):
        return tuple(map(files.save, handlers.inpaint(editor, preset, steps, seed, paste_back, progress=progress)))

    def outpaint(editor, direction, amount, steps, seed, progress=track):
        return tuple(map(files.save, handlers.outpaint(editor, direction, amount, steps, seed, progress=progress)))

    def understand(image):
        label, neighbours = handlers.understand(image)
        if neighbours is not None:
            neighbours = [(files.save(photo), caption) for photo, caption in neighbours]
        return label, neighbours

    class_choices = ["unconditional"] + [
        f"{i}: {config.id2label.get(i, f'class {i}')}" if len(config.id2label) == config.num_classes else str(i)
        for i in range(config.num_classes)
    ]
    with gr.Blocks(title="MAGE: masked generative encoder") as demo:
        gr.Markdown(
            "# MAGE: MAsked Generative Encoder\n"
            "One ViT over VQGAN tokens that both generates images and learns representations "
            "([Li et al., CVPR 2023](https://arxiv.org/abs/2211.09117)), served by mage-hf. "
            f"Model: {_model_title(models.name)}, "
            f"{models.resolution}x{models.resolution} pixels, {models.generate.device.type.upper()}."
        )
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    count = gr.Slider(1, LIMITS.max_images, value=4, step=1, label="Number of images")
                    steps = gr.Slider(1, LIMITS.max_steps, value=20, step=1, label="Steps")
                    temperature = gr.Slider(0.0, 10.0, value=4.5, step=0.5, label="Choice temperature")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", scale=3)
                        dice = gr.Button("Random seed", scale=1)
                    class_label = gr.Dropdown(
                        class_choices, value="unconditional", label="Class", visible=conditional,
                        elem_id="generate-class",
                    )
                    guidance = gr.Slider(1.0, 10.0, value=3.0, step=0.5, label="Guidance", visible=conditional)
                    run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                gallery = gr.Gallery(
                    label="Samples", columns=4, height="auto", format="png", elem_id="generate-gallery"
                )
            dice.click(lambda: random.randint(0, 2**31 - 1), outputs=seed, queue=False)
            generate_inputs = [count, steps, temperature, seed, class_label, guidance]
            run.click(_gradio_errors(generate), generate_inputs, gallery, api_name="generate", **model_slot)
            if conditional:
                example_rows = [[4, 20, 4.5, 0, class_choices[1], 3.0], [8, 12, 4.5, 1, "unconditional", 1.0]]
                example_inputs, example_fn = generate_inputs, generate
            else:  # no Class / Guidance columns for a model without classes
                example_rows = [[4, 20, 4.5, 0], [8, 12, 4.5, 1]]
                example_inputs = generate_inputs[:4]

                def example_fn(count, steps, temperature, seed, progress=track):
                    return generate(count, steps, temperature, seed, "unconditional", 1.0, progress=progress)

            gr.Examples(
                example_rows, example_inputs, gallery, fn=_gradio_errors(example_fn), cache_examples=True,
                cache_mode="lazy",
            )
        with gr.Tab("Inpaint / Outpaint"):
            with gr.Row():
                with gr.Column(scale=1):
                    editor = _checked_upload(gr.ImageEditor(
                        # RGBA: the brush layer's alpha is the mask (in RGB mode Gradio drops it).
                        type="pil", image_mode="RGBA", label="Image: brush the area to regenerate",
                        brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), layers=False,
                        sources=["upload", "clipboard"], elem_id="inpaint-editor",
                    ))
                    preset = gr.Radio(list(MASK_PRESETS), value="brush", label="Mask")
                    paint_steps = gr.Slider(1, LIMITS.max_steps, value=20, step=1, label="Steps")
                    paint_seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                    paste_back = gr.Checkbox(value=True, label="Paste the untouched pixels back")
                    inpaint_button = gr.Button("Inpaint", variant="primary", elem_id="inpaint-button")
                    with gr.Row():
                        direction = gr.Dropdown(list(OUTPAINT_DIRECTIONS), value="right", label="Outpaint direction")
                        amount = gr.Slider(0.05, 0.5, value=0.25, step=0.05, label="Amount")
                    outpaint_button = gr.Button("Outpaint", elem_id="outpaint-button")
                with gr.Column(scale=1):
                    cells = gr.Image(label="Token cells regenerated (red)", format="png", elem_id="inpaint-cells")
                    result = gr.Image(label="Result", format="png", elem_id="inpaint-result")
            inpaint_inputs = [editor, preset, paint_steps, paint_seed, paste_back]
            inpaint_button.click(
                _gradio_errors(inpaint), inpaint_inputs, [cells, result], api_name="inpaint", **model_slot
            )
            outpaint_button.click(
                _gradio_errors(outpaint), [editor, direction, amount, paint_steps, paint_seed], [cells, result],
                api_name="outpaint", **model_slot,
            )
            gr.Examples(
                [[path, "centre square", 20, 0, True] for path in examples[:3]],
                inpaint_inputs, [cells, result], fn=_gradio_errors(inpaint), cache_examples=True, cache_mode="lazy",
            )
        with gr.Tab("Understand"):
            with gr.Row():
                with gr.Column(scale=1):
                    query = _checked_upload(gr.Image(type="filepath", label="Image", elem_id="understand-image"))
                    understand_button = gr.Button("Understand", variant="primary", elem_id="understand-button")
                with gr.Column(scale=1):
                    label = gr.Label(num_top_classes=5, label="Top classes", visible=models.classifier is not None)
                    neighbours = gr.Gallery(
                        label="Nearest gallery photos by MAGE encoder features", columns=4, height="auto",
                        visible=models.classifier is None, format="png", elem_id="understand-gallery",
                    )
            understand_button.click(
                _gradio_errors(understand), query, [label, neighbours], api_name="understand", **model_slot
            )
            gr.Examples(
                [[path] for path in examples], query, [label, neighbours], fn=_gradio_errors(understand),
                cache_examples=True, cache_mode="lazy",
            )
        gr.Markdown(
            f"{examples_credit(examples)} MAGE: Li et al., CVPR 2023 (MIT code); the weights belong to whoever "
            "trained them (see the model card)."
        )
    demo.queue(max_size=LIMITS.queue_size, default_concurrency_limit=1)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The mage-hf demo app (Gradio).")
    parser.add_argument("--model", default=None, help="pipeline/model folder or Hub repo id (default: $MAGE_MODEL)")
    parser.add_argument("--classifier", default=None, help="MageForImageClassification folder ($MAGE_CLASSIFIER)")
    parser.add_argument("--examples", default=None,
                        help="folder of example images, also the Understand gallery ($MAGE_EXAMPLES; default: "
                             "emoji for the embedded model, photos otherwise)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    models = load_models(args.model, args.classifier, args.device, args.examples)
    build_demo(models).launch(server_name=args.host, server_port=args.port, max_file_size=LIMITS.max_file_size)


if __name__ == "__main__":
    main()
