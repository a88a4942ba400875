# Copyright 2026 The mage-hf authors. MIT licence.
"""The main job, as `make demo` runs it: MAGE generates, inpaints and outpaints, offline, with the embedded demo model.

    python -m mage_hf.demo [--model FOLDER] [--output outputs]

The embedded model (`mage_hf/data/demo-model`) is a small class-conditional MAGE that this project trained on Google's
Noto emoji with its own scripts (`training/recipes/emoji`; the model card in the folder gives its numbers). The
inpainting and outpainting inputs are held-out emoji shipped beside it (`mage_hf/data/emoji-examples`, Apache-2.0).
Any other pipeline folder or Hub repo id works too (`--model`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

from .pipeline_mage import MageGenerationPipeline, MageInpaintPipeline

__all__ = ["EMBEDDED_MODEL", "EXAMPLE_EMOJI", "default_model", "main"]

EMBEDDED_MODEL = Path(__file__).parent / "data" / "demo-model"
EXAMPLE_EMOJI = Path(__file__).parent / "data" / "emoji-examples"


def default_model() -> str:
    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        raise SystemExit(
            f"The embedded demo model is missing from {EMBEDDED_MODEL} (a broken install?). Pass --model with a "
            "pipeline folder or Hub repo id, or rebuild it with training/recipes/emoji/train.sh."
        )
    return str(EMBEDDED_MODEL)


def _upscaled(images: list[Image.Image], size: int) -> list[Image.Image]:
    return [image.resize((size * image.width // image.height, size), Image.NEAREST) for image in images]


def _grid(rows: list[list[Image.Image]], size: int = 128, gap: int = 4) -> Image.Image:
    """Rows of images (upscaled to `size` px high, nearest neighbour: the model's pixels, bigger) on white."""
    rows = [_upscaled(row, size) for row in rows]
    width = max(sum(image.width for image in row) + gap * (len(row) - 1) for row in rows)
    canvas = Image.new("RGB", (width, len(rows) * size + gap * (len(rows) - 1)), "white")
    for r, row in enumerate(rows):
        x = 0
        for image in row:
            canvas.paste(image, (x, r * (size + gap)))
            x += image.width + gap
    return canvas


def _masked_view(image: Image.Image, mask: Image.Image) -> Image.Image:
    grey = Image.new("RGB", image.size, (128, 128, 128))
    return Image.composite(grey, image.convert("RGB"), mask)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a pipeline folder or Hub repo id (default: the embedded demo model)")
    parser.add_argument("--output", default="outputs", help="where to write the pictures")
    parser.add_argument("--per-class", type=int, default=6, help="samples per class (class-conditional models)")
    parser.add_argument("--steps", type=int, default=12, help="decoding steps")
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.steps < 1 or args.guidance_scale < 1 or args.seed < 0:
        parser.error("--per-class and --steps must be positive, --guidance-scale at least 1 and --seed at least 0.")
    return args


@torch.no_grad()
def main(args: argparse.Namespace) -> dict[str, Path]:
    start = time.perf_counter()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    pipe = MageGenerationPipeline.from_pretrained(args.model or default_model())
    pipe.set_progress_bar_config(disable=True)
    config = pipe.model.config
    steps = {"num_inference_steps": args.steps}

    # 1. Generation: one row per class (with guidance) for a class-conditional model, else 4 rows of 8.
    rows = []
    classes = range(config.num_classes) if config.num_classes else [None] * 4
    per_row = args.per_class if config.num_classes else 8
    for row, label in enumerate(classes):
        generators = [torch.Generator().manual_seed(args.seed + 100 * row + i) for i in range(per_row)]
        extra = {"class_labels": [label] * per_row, "guidance_scale": args.guidance_scale} if label is not None else {}
        rows.append(pipe(num_images=per_row, generator=generators, **steps, **extra).images)
    paths = {"samples": output / "demo_samples.png"}
    _grid(rows).save(paths["samples"])
    names = [config.id2label.get(i, str(i)) for i in classes] if config.num_classes else []

    # 2. Inpainting (the centre regenerated) and 3. outpainting (extended to the right), on held-out emoji.
    inpaint = MageInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    examples = [Image.open(path).convert("RGB") for path in sorted(EXAMPLE_EMOJI.glob("*.png"))]
    if not examples:
        raise SystemExit(f"No example images in {EXAMPLE_EMOJI}.")
    size = examples[0].width
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, size - size // 4, size - size // 4))
    filled, uncropped, wider = [], [], []
    for i, image in enumerate(examples):
        generator = torch.Generator().manual_seed(args.seed + i)
        filled.append(inpaint(image, mask_image=mask, paste_back=True, generator=generator, **steps).images[0])
        if i < 4:
            generator = torch.Generator().manual_seed(args.seed + i)
            uncropped.append(inpaint.outpaint(image, direction="uncrop", amount=0.25, generator=generator,
                                              **steps).images[0])
            generator = torch.Generator().manual_seed(args.seed + i)
            wider.append(inpaint.outpaint(image, direction="right", amount=0.5, generator=generator,
                                          **steps).images[0])
    resolution = pipe.resolution
    shown = [image.resize((resolution, resolution), Image.BICUBIC) for image in examples]
    paths["inpainting"] = output / "demo_inpainting.png"
    _grid([shown, [_masked_view(im, mask.resize(im.size)) for im in shown], filled]).save(paths["inpainting"])
    paths["outpainting"] = output / "demo_outpainting.png"
    _grid([list(row) for row in zip(shown, uncropped, wider)]).save(paths["outpainting"])

    seconds = time.perf_counter() - start
    print(f"MAGE demo ({pipe.model.config.num_hidden_layers}-layer model, {resolution}x{resolution} px), "
          f"{seconds:.0f} s:")
    print(f"  {paths['samples']}: generated samples" + (f", one row per class ({', '.join(names)})" if names else ""))
    print(f"  {paths['inpainting']}: inpainting (rows: held-out emoji, the centre masked, the centre regenerated)")
    print(f"  {paths['outpainting']}: outpainting (each emoji; zoomed out, the new border generated; extended to "
          "the right by half its width)")
    return paths


if __name__ == "__main__":
    main(parse_args())
