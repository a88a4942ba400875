# Copyright 2026 The mage-hf authors. MIT licence.
"""Sample N images from a MAGE model into a folder of PNGs, across any number of processes, resumably.

    accelerate launch pipelines/sample.py --model mage-vitb --num_images 50000 --output_dir samples/

Image `i` is `<output_dir>/<i>.png` (zero-padded to 6 digits) and is drawn with its own generator,
`keyed_generator(seed, i)`, so the folder is the same whatever the number of processes and the batch size (the
pipeline makes each image depend on its own generator only). Process `r` of `P` samples the indices `i` with
`i % P == r`. Files are written to a temporary name and renamed into place, so a killed run never leaves a truncated
PNG; running the same command again skips the images already written and samples only the rest.

`<output_dir>/sampling_settings.json` records everything that decides the pixels (the model's weights checksum, the
scheduler, the seed, the number of steps, ...). Resuming into a folder made with different settings is refused. The
number of processes and the batch size are not settings: they do not change the images.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

import mage_hf
from mage_hf import MageGenerationPipeline
from mage_hf.training_utils import keyed_generator, parameter_checksum

logger = logging.getLogger(__name__)

SETTINGS_FILE = "sampling_settings.json"
TEMP_SUFFIX = ".partial"
# Bump when the meaning of the settings (how an index becomes an image) changes.
SETTINGS_FORMAT = 1
# Recorded for information; a different value does not block resuming.
INFORMATIONAL_KEYS = ("model", "mage_hf_version", "torch_version")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", required=True, help="A pipeline or MAGE model folder, or a Hub repo id.")
    p.add_argument("--num_images", type=int, required=True, help="How many images the folder must hold.")
    p.add_argument("--output_dir", required=True, help="Where the PNGs go (created; an existing run is resumed).")
    p.add_argument("--batch_size", type=int, default=16, help="Images per forward pass, per process.")
    p.add_argument("--num_inference_steps", type=int, default=20, help="Decoding steps (MAGE's FID used 20).")
    p.add_argument(
        "--choice_temperature", type=float, default=None,
        help="Gumbel noise scale of the re-masking choice; default: the scheduler's (4.5). MAGE's ViT-B FID used 6.0.",
    )
    p.add_argument("--seed", type=int, default=0, help="Image i is drawn from keyed_generator(seed, i).")
    p.add_argument("--class_label", type=int, default=None, help="For class-conditional models: one label for all.")
    p.add_argument("--guidance_scale", type=float, default=1.0, help="Classifier-free guidance (needs --class_label).")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="Dtype of the transformer.")
    args = p.parse_args(argv)
    for name in ("num_images", "batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.seed < 0:
        p.error(f"--seed must be non-negative, got {args.seed}.")
    return args


def image_path(output_dir: Path, index: int, num_images: int) -> Path:
    """`<output_dir>/000123.png`: zero-padded so that the files sort in index order."""
    width = max(6, len(str(num_images - 1)))
    return output_dir / f"{index:0{width}d}.png"


def sampling_settings(args: argparse.Namespace, pipe: MageGenerationPipeline) -> dict:
    """Everything that decides the pixels of image `i`, plus a few informational fields."""
    choice_temperature = args.choice_temperature
    if choice_temperature is None:
        choice_temperature = pipe.scheduler.config.choice_temperature
    scheduler_config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    settings = {
        "settings_format": SETTINGS_FORMAT,
        "num_images": args.num_images,
        "seed": args.seed,
        "seeding": "image i uses mage_hf.training_utils.keyed_generator(seed, i) on the CPU",
        "num_inference_steps": args.num_inference_steps,
        "choice_temperature": float(choice_temperature),
        "class_label": args.class_label,
        "guidance_scale": args.guidance_scale,
        "dtype": args.dtype,
        "model_checksum": parameter_checksum(pipe.model),
        "scheduler": scheduler_config,
        "model": str(args.model),
        "mage_hf_version": mage_hf.__version__,
        "torch_version": torch.__version__,
    }
    # As read back from the file (tuples become lists), so that comparing with a recorded copy is exact.
    return json.loads(json.dumps(settings))


def settings_differences(recorded: dict, current: dict) -> list[str]:
    keys = sorted((set(recorded) | set(current)) - set(INFORMATIONAL_KEYS))
    return [
        f"{k}: folder has {recorded.get(k)!r}, this run has {current.get(k)!r}"
        for k in keys
        if recorded.get(k) != current.get(k)
    ]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` either does not exist or is complete: write a temporary file beside
    it, flush it to disk, then rename it into place (a rename within a folder is atomic)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def save_png(image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def prepare_output_dir(accelerator: Accelerator, output_dir: Path, settings: dict) -> None:
    """Create the folder and its settings file, or check that an existing folder was made with these settings.

    Only the main process writes; then every process reads the file and checks it, so that all of them stop with
    the same error (a process that raised alone would leave the others waiting at the next barrier). A folder
    without images yet (e.g. a run that stopped before its first image) takes the new settings."""
    settings_file = output_dir / SETTINGS_FILE
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        # Temporary files of a killed run: never complete, safe to delete (one job per folder at a time).
        for stale in output_dir.glob(f".*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        if not any(output_dir.glob("*.png")):
            atomic_write_bytes(settings_file, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
    accelerator.wait_for_everyone()
    if not settings_file.exists():
        raise SystemExit(
            f"{output_dir} already holds PNG files but no {SETTINGS_FILE}, so it was not made by this script and "
            "cannot be resumed. Use an empty or new --output_dir."
        )
    recorded = json.loads(settings_file.read_text())
    differences = settings_differences(recorded, settings)
    if differences:
        raise SystemExit(
            f"{output_dir} was sampled with different settings, so resuming would mix two sets of images:\n  "
            + "\n  ".join(differences)
            + f"\nUse the settings recorded in {settings_file}, or a new --output_dir."
        )


@torch.no_grad()
def main(args: argparse.Namespace) -> dict:
    """Sample the missing images; returns `{"written": n, "skipped": n}` for this process."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator()
    output_dir = Path(args.output_dir)

    # Loaded in the dtype (not cast after loading): the tokenizer then stays in float32 with unrounded weights.
    pipe = MageGenerationPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    settings = sampling_settings(args, pipe)  # the checksum is taken in the dtype the images are sampled in
    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    # Bad class-label arguments fail here, before anything is written.
    pipe.prepare_class_labels(args.class_label, 1, args.guidance_scale)
    prepare_output_dir(accelerator, output_dir, settings)

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = range(rank, args.num_images, world)
    todo = [i for i in mine if not image_path(output_dir, i, args.num_images).exists()]
    skipped = len(mine) - len(todo)
    if accelerator.is_main_process:
        logger.info(
            "Sampling %d images into %s with %d process(es); process 0 has %d to do (%d already written).",
            args.num_images, output_dir, world, len(todo), skipped,
        )

    progress = tqdm(total=len(todo), desc=f"process 0 of {world}", unit="img", disable=not accelerator.is_main_process)
    for start in range(0, len(todo), args.batch_size):
        indices = todo[start : start + args.batch_size]
        generators = [keyed_generator(args.seed, i) for i in indices]
        images = pipe(
            num_images=len(indices),
            num_inference_steps=args.num_inference_steps,
            choice_temperature=settings["choice_temperature"],
            generator=generators,
            class_labels=args.class_label,
            guidance_scale=args.guidance_scale,
            output_type="pil",
        ).images
        for i, image in zip(indices, images):
            save_png(image, image_path(output_dir, i, args.num_images))
        progress.update(len(indices))
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        missing = [i for i in range(args.num_images) if not image_path(output_dir, i, args.num_images).exists()]
        if missing:
            raise RuntimeError(
                f"{len(missing)} of {args.num_images} images are missing after sampling (first: "
                f"{image_path(output_dir, missing[0], args.num_images)}); run the same command again to finish."
            )
        logger.info("All %d images are in %s.", args.num_images, output_dir)
    accelerator.end_training()
    return {"written": len(todo), "skipped": skipped}


if __name__ == "__main__":
    main(parse_args())
