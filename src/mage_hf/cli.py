# Copyright 2026 The mage-hf authors. MIT licence.
"""The `mage-hf` command line: `convert`, `push`, `features`, `generate`, `inpaint`, `outpaint` and `demo`."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def _convert(args: argparse.Namespace) -> int:
    from .convert_mage import convert_checkpoint

    report = convert_checkpoint(
        args.checkpoint,
        args.output,
        vqgan=args.vqgan,
        kind=args.kind,
        num_attention_heads=args.num_heads,
        decoder_num_attention_heads=args.decoder_num_heads,
        overwrite=args.overwrite,
    )
    print(
        f"Converted a {report.kind} checkpoint in {report.seconds:.1f} s: {report.mapped} tensors mapped "
        f"(max difference {report.max_abs_diff:g}), {len(report.unused)} unused keys left out "
        f"({', '.join(report.unused) or 'none'})."
    )
    print(f"Wrote {args.output}. Load it with from_pretrained after `import mage_hf`.")
    return 0


def _features(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from . import MageImageProcessor, MageModel

    model = MageModel.from_pretrained(args.model).eval()
    try:
        processor = MageImageProcessor.from_pretrained(args.model)
    except OSError:  # a folder saved without its processor config: MAGE's own preprocessing at the model's size
        side = model.config.vq_config.resolution
        processor = MageImageProcessor(size=side, crop_size=side)
        print(f"note: {args.model} has no preprocessor_config.json; using MageImageProcessor at {side} px.",
              file=sys.stderr)
    paths = [Path(p) for p in args.images]
    images = []
    for path in paths:
        try:
            images.append(Image.open(path))
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: cannot read {path} as an image: {err}") from None
    with torch.no_grad():
        inputs = processor(images, return_tensors="pt")
        outputs = model(**inputs)
    pooled = outputs.pooler_output  # (N, D)
    normed = torch.nn.functional.normalize(pooled, dim=-1)
    print(f"{len(paths)} images -> last_hidden_state {tuple(outputs.last_hidden_state.shape)}, "
          f"pooled {tuple(pooled.shape)}")
    if len(paths) > 1:
        similarity = normed @ normed.T
        for i, path in enumerate(paths):
            row = "  ".join(f"{v:+.3f}" for v in similarity[i].tolist())
            print(f"  {path.name:>24}  {row}")
    if args.output:
        # Copies: the pooled class position can be a view of last_hidden_state (one image), which safetensors refuses.
        tensors = {"pooler_output": pooled.clone(), "last_hidden_state": outputs.last_hidden_state.clone()}
        save_file(tensors, args.output)
        print(f"Wrote {args.output}.")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .publishing import format_report, publish

    result = publish(
        args.folder,
        args.repo_id,
        dry_run=args.dry_run,
        output=args.output,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        license=args.license,
        replace_readme=args.replace_readme,
        samples=args.samples,
        steps=args.steps,
        seed=args.seed,
        token=args.token,
        space=args.space,
        model=args.model,
        log=lambda message: print(message, file=sys.stderr),
    )
    print(format_report(result))
    return 0


# ---------------------------------------------------------------------------------------------- generation commands


def _load_pipeline(args: argparse.Namespace, cls):
    import torch

    if args.num_images < 1 or args.batch_size < 1 or args.steps < 1:
        raise ValueError("--num-images, --batch-size and --steps must be positive.")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    device = _device(args.device)
    if device == "cpu" and dtype != torch.float32:
        print(f"note: {args.dtype} on the CPU is slow (often emulated); float32 is the CPU default.", file=sys.stderr)
    if args.model is None:
        from .demo import default_model

        args.model = default_model()
    pipe = cls.from_pretrained(args.model, dtype=dtype)
    return pipe.to(device)


def _device(name: str | None) -> str:
    """`--device`, checked before any model is loaded (default: cuda when available)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA GPU (a CPU build, or no GPU); use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0.")
    return name


def _seeded(seed: int, count: int, start: int = 0):
    """One generator per image, seeded `seed + index`: image n is the same whatever the batch size."""
    import torch

    return [torch.Generator().manual_seed(seed + start + i) for i in range(count)]


def _write_images(images, output: Path, prefix: str, grid_rows: int | None = None, extra=()) -> None:
    from diffusers.utils import make_image_grid

    output.mkdir(parents=True, exist_ok=True)
    for n, image in enumerate(images):
        image.save(output / f"{prefix}{n:04d}.png")
    tiles = [*extra, *images]
    size = tiles[-1].size
    tiles = [t.resize(size) if t.size != size else t for t in tiles]
    cols = min(len(tiles), 8) if grid_rows is None else math.ceil(len(tiles) / grid_rows)
    rows = math.ceil(len(tiles) / cols)
    tiles += [tiles[-1].copy().point(lambda _: 255)] * (rows * cols - len(tiles))  # white padding tiles
    make_image_grid(tiles, rows=rows, cols=cols).save(output / "grid.png")
    print(f"Wrote {len(images)} images and grid.png to {output}.")


def _open_square(path: str, what: str):
    """Open an image file; non-square images are centre-cropped to a square (the model works on squares)."""
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read {path} as an image ({what}): {err}") from None
    from .pipeline_mage import center_square

    if image.width != image.height:
        side = min(image.size)
        print(f"note: {path} is {image.width}x{image.height}; using its centre {side}x{side} square.", file=sys.stderr)
    return center_square(image)


def _generate(args: argparse.Namespace) -> int:
    from .pipeline_mage import MageGenerationPipeline

    pipe = _load_pipeline(args, MageGenerationPipeline)
    images = []
    for start in range(0, args.num_images, args.batch_size):
        count = min(args.batch_size, args.num_images - start)
        images += pipe(
            num_images=count,
            num_inference_steps=args.steps,
            choice_temperature=args.choice_temperature,
            generator=_seeded(args.seed, count, start),
            class_labels=args.class_label,
            guidance_scale=args.guidance_scale,
        ).images
    _write_images(images, Path(args.output), "sample_")
    return 0


def _inpaint(args: argparse.Namespace) -> int:
    from PIL import Image

    from .pipeline_mage import MageInpaintPipeline, token_mask_overlay
    from .training_utils import to_rgb

    pipe = _load_pipeline(args, MageInpaintPipeline)
    image = to_rgb(_open_square(args.image, "--image"))  # transparency onto white, as the pipeline composites it
    if args.mask is not None and args.box is not None:
        raise ValueError("Pass --mask or --box, not both.")
    mask = None
    if args.mask is not None:
        mask = _open_square(args.mask, "--mask")
        if mask.size != image.size:
            raise ValueError(f"--mask is {mask.width}x{mask.height} but --image is {image.width}x{image.height}.")
    elif args.box is not None:
        try:
            x0, y0, x1, y1 = (int(v) for v in args.box.split(","))
        except ValueError:
            raise ValueError(f"--box must be x0,y0,x1,y1 in pixels of the (square) image, got {args.box!r}.") from None
        side = image.width
        if not (0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side):
            raise ValueError(
                f"--box {args.box} is empty or outside the {side}x{side} image (the centre square of a non-square "
                "one): give 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height."
            )
        mask = Image.new("L", image.size, 0)
        mask.paste(255, (x0, y0, x1, y1))
    elif args.strength is None:
        raise ValueError("Pass --mask (white = regenerate), --box x0,y0,x1,y1, or --strength for variations.")
    results, overlay = [], None
    for start in range(0, args.num_images, args.batch_size):
        count = min(args.batch_size, args.num_images - start)
        out = pipe(
            [image] * count,
            mask_image=mask,
            strength=args.strength,
            num_inference_steps=args.steps,
            choice_temperature=args.choice_temperature,
            generator=_seeded(args.seed, count, start),
            paste_back=args.paste_back,
        )
        results += out.images
        overlay = token_mask_overlay(image.resize(results[0].size), out.token_mask[0])
    _write_images(results, Path(args.output), "inpaint_", extra=(image.resize(results[0].size), overlay))
    return 0


def _outpaint(args: argparse.Namespace) -> int:
    from .pipeline_mage import MageInpaintPipeline
    from .training_utils import to_rgb

    pipe = _load_pipeline(args, MageInpaintPipeline)
    image = to_rgb(_open_square(args.image, "--image"))  # transparency onto white, as the pipeline composites it
    results = []
    for start in range(0, args.num_images, args.batch_size):
        count = min(args.batch_size, args.num_images - start)
        results += pipe.outpaint(
            [image] * count,
            direction=args.direction,
            amount=args.amount,
            num_inference_steps=args.steps,
            choice_temperature=args.choice_temperature,
            generator=_seeded(args.seed, count, start),
        ).images
    _write_images(results, Path(args.output), f"outpaint_{args.direction}_")
    return 0


def _class_label(value: str) -> int | str:
    """`--class-label`: an integer id, or a class name the pipeline looks up in the model's `id2label`."""
    try:
        return int(value)
    except ValueError:
        return value


def _add_sampling_arguments(parser: argparse.ArgumentParser, num_images: int) -> None:
    parser.add_argument(
        "--model", help="a pipeline or MAGE model folder, or a Hub repo id (default: the embedded demo model)"
    )
    parser.add_argument("--output", default="outputs", help="folder for the PNGs and grid.png")
    parser.add_argument("--num-images", type=int, default=num_images, help="how many images to make")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass")
    parser.add_argument("--steps", type=int, default=20, help="decoding steps")
    parser.add_argument("--choice-temperature", type=float, help="re-masking noise (default: the scheduler's, 4.5)")
    parser.add_argument("--seed", type=int, default=0, help="image n uses seed + n")
    parser.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")


def _demo(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401  (the app module imports it only when it builds the page, after loading models)

        from .gradio_app import main as run_app
    except ImportError as err:
        raise SystemExit(f"error: the demo app needs Gradio: pip install 'mage-hf[space]' ({err})") from None
    if args.device is not None:
        _device(args.device)  # checked as for the other commands, before Gradio starts
    argv = []
    for flag in ("host", "port", "model", "classifier", "device", "examples"):
        if getattr(args, flag) is not None:  # unset: the app's default (GRADIO_SERVER_NAME/PORT, MAGE_MODEL, ...)
            argv += [f"--{flag}", str(getattr(args, flag))]
    run_app(argv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mage-hf", description="MAGE in the Hugging Face ecosystem.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an original MAGE or VQGAN checkpoint to a folder")
    convert.add_argument("--checkpoint", required=True, help="mage-vitb-1600.pth, a fine-tuned .pth or a VQGAN .ckpt")
    convert.add_argument("--vqgan", help="VQGAN checkpoint, for a MAGE checkpoint that lacks vqgan.* weights")
    convert.add_argument("--output", required=True, help="folder to write (a new or empty folder)")
    convert.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    convert.add_argument("--kind", choices=["pretrain", "finetune", "vqgan"], help="override the detected kind")
    convert.add_argument("--num-heads", type=int, help="encoder heads (only for shapes other than ViT-B/L)")
    convert.add_argument("--decoder-num-heads", type=int, help="decoder heads (only for shapes other than ViT-B/L)")
    convert.set_defaults(func=_convert)

    push = commands.add_parser("push", help="publish a folder (or the demo Space) to the Hub, with a model card")
    push.add_argument("--folder", required=True, help="a pipeline or MAGE model folder (--space: the Space folder)")
    push.add_argument("--repo-id", required=True, help="the Hub repo to publish to, ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="upload to this branch (created when missing)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--dry-run", action="store_true", help="write and check the staging folder, upload nothing")
    push.add_argument("--output", help="the staging folder (default: <folder>-hub beside the folder)")
    push.add_argument("--license", help="Hub licence id for the card (default: mit; other for MAGE's own weights)")
    push.add_argument("--replace-readme", action="store_true",
                      help="replace the folder's own README.md (not one mage-hf wrote) with the generated card")
    push.add_argument("--samples", type=int, default=8, help="images in the card's samples.png (0: none)")
    push.add_argument("--steps", type=int, default=12, help="decoding steps for the samples")
    push.add_argument("--seed", type=int, default=0, help="sample n uses seed + n")
    push.add_argument("--space", action="store_true", help="publish the Gradio Space folder instead of a model")
    push.add_argument("--model", help="with --space: the Hub model the Space serves (sets MAGE_MODEL)")
    push.add_argument("--token", help="Hub token (default: the one `hf auth login` saved)")
    push.set_defaults(func=_push)

    features = commands.add_parser("features", help="extract MAGE features from images")
    features.add_argument("--model", required=True, help="a converted folder or Hub repo id")
    features.add_argument("images", nargs="+", help="image files")
    features.add_argument("--output", help="write the features to this .safetensors file")
    features.set_defaults(func=_features)

    generate = commands.add_parser("generate", help="generate images")
    _add_sampling_arguments(generate, num_images=8)
    generate.add_argument(
        "--class-label",
        type=_class_label,
        help="class id or name, for class-conditional models (the embedded emoji model: 0-8 or e.g. 'Flags')",
    )
    generate.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1 = off)")
    generate.set_defaults(func=_generate)

    inpaint = commands.add_parser("inpaint", help="regenerate the masked part of an image (or make variations)")
    _add_sampling_arguments(inpaint, num_images=4)
    inpaint.add_argument("--image", required=True, help="the image (non-square images are centre-cropped)")
    inpaint.add_argument("--mask", help="mask image of the same size: white = regenerate")
    inpaint.add_argument("--box", help="or a rectangle to regenerate: x0,y0,x1,y1 in pixels (of the centre square "
                         "of a non-square image)")
    inpaint.add_argument("--strength", type=float, help="or, without a mask: fraction of tokens to regenerate")
    inpaint.add_argument("--paste-back", action="store_true", help="keep the original pixels outside the mask")
    inpaint.set_defaults(func=_inpaint)

    outpaint = commands.add_parser("outpaint", help="extend an image beyond its borders")
    _add_sampling_arguments(outpaint, num_images=4)
    outpaint.add_argument("--image", required=True, help="the image (non-square images are centre-cropped)")
    outpaint.add_argument("--direction", choices=["left", "right", "up", "down", "uncrop"], default="right")
    outpaint.add_argument("--amount", type=float, default=0.25, help="fraction of the image size to add (0-1)")
    outpaint.set_defaults(func=_outpaint)

    demo = commands.add_parser("demo", help="run the Gradio demo app (the Space in space/) locally")
    demo.add_argument(
        "--model", help="pipeline/model folder or Hub repo id (default: $MAGE_MODEL, else the embedded demo model)"
    )
    demo.add_argument("--classifier", help="a MageForImageClassification folder for the Understand tab")
    demo.add_argument("--examples", help="a folder of example images (default: emoji for the embedded model, photos)")
    demo.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    demo.add_argument("--host", help="address to serve on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; 0.0.0.0 for "
                      "every interface)")
    demo.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .convert_mage import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
