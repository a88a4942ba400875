# Copyright 2026 The mage-hf authors. MIT licence.
"""FID (and Inception Score) of a folder of samples against a reference folder, with torch-fidelity.

    python pipelines/evaluate_fid.py --samples samples/ --reference imagenet-val-256-png/ \
        --inception_weights weights-inception-2015-12-05-6726825d.pth

This is the protocol of MAGE's published numbers (FID 11.1 / IS 81.2 for ViT-B): torch-fidelity's InceptionV3 (the
TensorFlow FID network), 50,000 samples, against the 50,000 ImageNet validation images centre-cropped to 256x256 and
saved as PNG. The reference must be PNG: MAGE's authors measured FID 13.74 against JPEG copies of the same images
and 11.18 against PNG. IS is computed on the samples.

The Inception weights are read from a local file: `--inception_weights`, else `$MAGE_HF_INCEPTION_WEIGHTS`, else
torch-fidelity's own download location (`<torch hub dir>/checkpoints/`). Nothing is downloaded. The file is
torch-fidelity's release asset `weights-inception-2015-12-05-6726825d.pth`.

torch-fidelity needs torchvision; see `pipelines/README.md` for an environment that has both (`make test-eval` builds
one). It runs in one process (feature extraction of 50,000 images takes a few minutes on one GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
# torch.hub's convention: the file name carries the first hex digits of the file's SHA-256.
INCEPTION_SHA256_PREFIX = "6726825d"
WEIGHTS_ENV_VAR = "MAGE_HF_INCEPTION_WEIGHTS"
LOSSY_EXTENSIONS = (".jpg", ".jpeg", ".webp")
# Below this many images the covariance of the 2048 Inception features is rank-deficient and FID is strongly biased
# upwards; published numbers use 50,000.
MIN_IMAGES_FOR_FID = 2048


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--samples", required=True, help="Folder of generated PNGs (e.g. from pipelines/sample.py).")
    p.add_argument("--reference", required=True, help="Folder of reference PNGs (e.g. ImageNet val at 256x256).")
    p.add_argument(
        "--inception_weights", default=None,
        help=f"Path to torch-fidelity's {INCEPTION_WEIGHTS_FILE} (default: ${WEIGHTS_ENV_VAR}, then the torch hub "
        "checkpoint folder).",
    )
    p.add_argument("--recursive", action="store_true", help="Also take images from sub-folders (e.g. class folders).")
    p.add_argument("--batch_size", type=int, default=64, help="Images per Inception forward pass.")
    p.add_argument("--isc_splits", type=int, default=10, help="Splits for the Inception Score's mean and std.")
    p.add_argument("--no_isc", action="store_true", help="Compute FID only.")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--allow_size_mismatch", action="store_true",
        help="Compare folders whose images have different sizes (both are resized to 299 by Inception, but the "
        "numbers are then not comparable to published ones).",
    )
    p.add_argument("--output_json", default=None, help="Also write the metrics and the folder summaries here.")
    p.add_argument("--quiet", action="store_true", help="No progress output from torch-fidelity.")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.isc_splits < 1:
        p.error("--batch_size and --isc_splits must be at least 1.")
    return args


def find_inception_weights(path: str | None) -> Path:
    """The local Inception weights file, or a clear error saying which file is needed and where to put it."""
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if path:
        source, candidate = "--inception_weights", Path(path).expanduser()
    elif os.environ.get(WEIGHTS_ENV_VAR):
        source, candidate = f"${WEIGHTS_ENV_VAR}", Path(os.environ[WEIGHTS_ENV_VAR]).expanduser()
    else:
        source, candidate = "the torch hub cache (no --inception_weights given)", hub_file
    if candidate.is_file():
        return candidate
    raise SystemExit(
        f"No Inception weights at {candidate} (from {source}). FID and IS need torch-fidelity's InceptionV3 weights, "
        f"the file {INCEPTION_WEIGHTS_FILE}, released at\n  {INCEPTION_WEIGHTS_URL}\n"
        f"Download it on a machine with network access and pass --inception_weights /path/to/{INCEPTION_WEIGHTS_FILE} "
        f"(or set ${WEIGHTS_ENV_VAR}, or put it at {hub_file})."
    )


def check_inception_weights(path: Path) -> bool:
    """Check that `path` is an InceptionV3 state dict of torch-fidelity's layout; return whether it is the official
    file (its SHA-256 starts with the digits in the released file's name)."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated download, an HTML error page saved as .pth...
        raise SystemExit(
            f"Could not read {path} as a torch state dict ({error}); download {INCEPTION_WEIGHTS_URL} again."
        ) from None
    fc = state_dict.get("fc.weight") if isinstance(state_dict, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048):
        raise SystemExit(
            f"{path} is not torch-fidelity's InceptionV3 state dict (expected an `fc.weight` of shape (1008, 2048)); "
            f"use {INCEPTION_WEIGHTS_FILE} from {INCEPTION_WEIGHTS_URL}."
        )
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(INCEPTION_SHA256_PREFIX)


def summarize_folder(folder: str, role: str, recursive: bool) -> dict:
    """Count the PNGs of `folder` and their sizes; refuse lossy or mixed-size folders with a clear error."""
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"--{role} {folder} is not a folder.")
    files = sorted(root.rglob("*") if recursive else root.iterdir())
    files = [f for f in files if f.is_file() and not f.name.startswith(".")]
    lossy = [f for f in files if f.suffix.lower() in LOSSY_EXTENSIONS]
    if lossy:
        raise SystemExit(
            f"--{role} {folder} holds {len(lossy)} lossy images (e.g. {lossy[0].name}). Convert them to PNG first: "
            "JPEG compression changes FID (MAGE's authors measured 13.74 against JPEG copies of ImageNet val and "
            "11.18 against PNG)."
        )
    pngs = [f for f in files if f.suffix.lower() == ".png"]
    if not pngs:
        hint = "" if recursive else " (pass --recursive if they are in sub-folders)"
        raise SystemExit(f"--{role} {folder} holds no PNG images{hint}.")
    sizes, modes = Counter(), Counter()
    for f in pngs:
        with Image.open(f) as image:  # reads the header only
            sizes[image.size] += 1
            modes[image.mode] += 1
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.most_common(5))
        raise SystemExit(
            f"--{role} {folder} mixes image sizes ({listed}). Resize and centre-crop them to one size first (MAGE "
            "compares 256x256 samples with 256x256 centre crops of ImageNet val)."
        )
    (width, height), = sizes
    return {"folder": str(root), "num_images": len(pngs), "width": width, "height": height, "modes": dict(modes)}


def compute_metrics(args: argparse.Namespace, weights: Path) -> dict:
    try:
        import torch_fidelity
    except ImportError as error:
        raise SystemExit(
            f"FID needs torch-fidelity and a torchvision that works with your torch ({error}). Install them with "
            "`pip install -e '.[eval]'` and a matching torch/torchvision pair (see pipelines/README.md)."
        ) from None
    return torch_fidelity.calculate_metrics(
        input1=args.samples,
        input2=args.reference,
        fid=True,
        isc=not args.no_isc,
        isc_splits=args.isc_splits,
        feature_extractor_weights_path=str(weights),
        cuda=args.device == "cuda",
        batch_size=args.batch_size,
        samples_find_deep=args.recursive,
        samples_find_ext="png",
        cache=False,  # its cache is keyed by name, not content: a stale entry would give a wrong number silently
        # No data-loader worker processes on the CPU: they would compete with Inception for the same cores.
        save_cpu_ram=args.device == "cpu",
        verbose=not args.quiet,
    )


def main(args: argparse.Namespace) -> dict:
    """Returns `{"frechet_inception_distance": ..., "inception_score_mean": ..., ...}` plus the folder summaries."""
    weights = find_inception_weights(args.inception_weights)
    official = check_inception_weights(weights)
    samples = summarize_folder(args.samples, "samples", args.recursive)
    reference = summarize_folder(args.reference, "reference", args.recursive)
    for s in (samples, reference):
        print(f"{s['folder']}: {s['num_images']} PNGs of {s['width']}x{s['height']} ({s['modes']})")
    same_size = (samples["width"], samples["height"]) == (reference["width"], reference["height"])
    if not same_size and not args.allow_size_mismatch:
        raise SystemExit(
            f"The samples are {samples['width']}x{samples['height']} but the reference images are "
            f"{reference['width']}x{reference['height']}; FID across sizes is not comparable to published numbers. "
            "Resize the reference to the samples' size (or pass --allow_size_mismatch)."
        )
    for summary in (samples, reference):
        if summary["num_images"] < 2:
            raise SystemExit(
                f"{summary['folder']} holds {summary['num_images']} image; FID needs at least 2 per folder."
            )
    if not args.no_isc and samples["num_images"] < args.isc_splits:
        raise SystemExit(
            f"The Inception Score needs at least --isc_splits ({args.isc_splits}) samples, got "
            f"{samples['num_images']}; lower --isc_splits or pass --no_isc."
        )
    for summary in (samples, reference):
        if summary["num_images"] < MIN_IMAGES_FOR_FID:
            print(
                f"Note: {summary['folder']} has only {summary['num_images']} images (< {MIN_IMAGES_FOR_FID}); FID is "
                "biased upwards with few images and is not comparable to published numbers (50,000 samples)."
            )
    if not official:
        print(
            f"Note: {weights} is not the official {INCEPTION_WEIGHTS_FILE} (SHA-256 differs); the numbers are not "
            "comparable to published ones."
        )

    metrics = {key: float(value) for key, value in compute_metrics(args, weights).items()}
    result = {
        **metrics, "samples": samples, "reference": reference,
        "inception_weights": str(weights), "official_inception_weights": official,
    }
    print(f"FID: {metrics['frechet_inception_distance']:.4f}")
    if "inception_score_mean" in metrics:
        print(f"IS: {metrics['inception_score_mean']:.4f} +- {metrics['inception_score_std']:.4f}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(parse_args())
