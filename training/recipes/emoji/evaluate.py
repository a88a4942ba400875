# Copyright 2026 The mage-hf authors. MIT licence.
"""Evaluate the emoji demo model and write its shipped pipeline folder (step 4 of train.sh).

    python training/recipes/emoji/evaluate.py --data WORK/data --vq WORK/vq --mage WORK/mage --output WORK/eval \
        [--seed 0] [--probe_epochs 20] [--samples_per_class 8] [--steps 12] [--guidance_scale 2.0] \
        [--choice_temperature 4.5]

Run from the repository root. Everything runs on the CPU in float32 from fixed seeds. It writes into OUT:

* `metrics.json`: tokenizer PSNR and codebook use, MAGE's masked-token loss and accuracy on the `test` split, linear
  probe top-1 of the trained encoder and of a random-init one, and how far samples are from their nearest training
  image compared with held-out images (pixels and MAGE features);
* `samples_grid.png` (one row per class), `nearest_neighbours.png` (the 8 samples closest to a training image,
  each beside that image), `inpaint.png` and `outpaint.png` (4 test images), all upscaled 4x;
* `random-init/` (the baseline: same config and tokenizer, random transformer), `probe-mage/`, `probe-random/`;
* `pipeline/`: the `MageGenerationPipeline` folder that is shipped, with its model card `README.md` (the evaluation
  table is also in `evaluation.md`, which `mage-hf push` puts into the card it writes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from mage_hf import (
    MageForMaskedImageModeling,
    MageGenerationPipeline,
    MageInpaintPipeline,
    MageScheduler,
    MageVQModel,
)
from mage_hf.publishing import SECRET_KEY, build_model_card, inspect_folder
from mage_hf.training_utils import center_crop_resize, keyed_generator, weights_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[3]
ATTRIBUTION = (
    "The images are Google's [Noto Emoji](https://github.com/googlefonts/noto-emoji) (Apache-2.0), as packaged at "
    "64 px by [emoji-datasource-google](https://www.npmjs.com/package/emoji-datasource-google) 16.0.0 (MIT) by Cal "
    "Henderson ([iamcal/emoji-data](https://github.com/iamcal/emoji-data)), composited onto white; the label is the "
    "emoji's category. 10% of the emoji of each category are held out as the `test` split, with all their skin-tone "
    "variants, so no near-copy of a test image is in `train`."
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the DatasetDict of build_dataset.py (train / test)")
    p.add_argument("--vq", required=True, help="the tokenizer folder of train_vqgan.py")
    p.add_argument("--mage", required=True, help="the MAGE folder of train_mage.py")
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe_epochs", type=int, default=20)
    p.add_argument("--samples_per_class", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="decoding steps for samples, inpainting and outpainting")
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--choice_temperature", type=float, default=4.5)
    p.add_argument("--reuse_metrics", action="store_true",
                   help="only rewrite OUT/pipeline and its card from an earlier run's OUT/metrics.json")
    return p.parse_args(argv)


def load_split(split, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset split -> images `(N, 3, R, R)` in [0, 1] (training's centre crop + resize, no augmentation) and
    labels `(N,)`."""
    pixels = torch.stack([center_crop_resize(row["image"], resolution) for row in split])
    return pixels, torch.tensor(split["label"], dtype=torch.long)


def batches(tensor: torch.Tensor, size: int = 256):
    return (tensor[i : i + size] for i in range(0, len(tensor), size))


@torch.no_grad()
def tokenizer_metrics(vq: MageVQModel, train: torch.Tensor, test: torch.Tensor) -> dict:
    """Reconstruction PSNR on `test`; codebook usage and perplexity over the tokens of `train`."""
    psnr = []
    for x in batches(test):
        recon = vq(x).clamp(0, 1)  # (B, 3, R, R)
        mse = (recon - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # (B,)
        psnr.append(10 * torch.log10(1.0 / mse))
    ids = torch.cat([vq.encode(x).token_ids.flatten() for x in batches(train)])  # (N * h * w,)
    counts = torch.bincount(ids, minlength=vq.config.num_embeddings).double()  # (K,)
    p = counts[counts > 0] / counts.sum()
    return {
        "reconstruction_psnr_db": float(torch.cat(psnr).mean()),
        "codebook_usage": float((counts > 0).double().mean()),
        "codebook_perplexity": float(torch.exp(-(p * p.log()).sum())),
        "codebook_size": vq.config.num_embeddings,
        "num_train_tokens": ids.numel(),
    }


@torch.no_grad()
def mage_validation(model, pixels: torch.Tensor, labels: torch.Tensor, seed: int, repeats: int = 5) -> dict:
    """MAGE's training forward (masking ratio and masks drawn as in training) on held-out images, `repeats` times
    with `torch.Generator().manual_seed(seed + r)`: mean loss and accuracy over all masked positions."""
    ids = torch.cat([model.mage.tokenize(x) for x in batches(pixels)])  # (N, L)
    losses, correct, masked, ratios = [], 0, 0, []
    for r in range(repeats):
        out = model(input_ids=ids, class_labels=labels, generator=torch.Generator().manual_seed(seed + r))
        hits = out.logits.argmax(-1) == out.labels  # (N, L)
        losses.append(float(out.loss))
        correct += int(hits[out.token_mask].sum())
        masked += int(out.token_mask.sum())
        ratios.append(out.mask_ratio)
    return {"loss": float(np.mean(losses)), "masked_token_accuracy": correct / masked, "mask_ratios": ratios,
            "num_images": len(ids), "repeats": repeats}


def save_random_init(model, seed: int, folder: Path) -> None:
    """The baseline: the same config and the same (trained) tokenizer, a randomly initialised transformer."""
    torch.manual_seed(seed)
    baseline = MageForMaskedImageModeling(model.config)
    baseline.mage.vq_model.load_state_dict(model.mage.vq_model.state_dict())
    baseline.save_pretrained(folder)


PROBE_SETTINGS = ["--random_crop_scale", "1", "1", "--no_hflip", "--train_batch_size", "128", "--learning_rate", "100"]


def linear_probe(model_folder: Path, args, output: Path) -> float:
    """Run training/train_classifier.py's linear probe (train on `train`, top-1 on `test`); its top-1 in %."""
    shutil.rmtree(output, ignore_errors=True)
    command = [
        sys.executable, "training/train_classifier.py", "--model_name_or_path", str(model_folder),
        "--mode", "linear_probe", "--dataset_name", args.data, "--validation_split", "test", "--label_column",
        "label", "--num_train_epochs", str(args.probe_epochs), "--seed", str(args.seed), "--report_to", "none",
        "--checkpointing_steps", str(10**9), "--output_dir", str(output),
        # Features of the whole image, and a LARS rate that can move the head: at batch 128 MAGE's blr 0.1 gives
        # lr 0.05, which over ~500 steps leaves the head at its N(0, 0.01) start, predicting the commonest class.
        *PROBE_SETTINGS,
    ]
    log = output.parent / f"{output.name}.log"
    with open(log, "w") as f:
        done = subprocess.run(command, check=False, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"The linear probe failed ({' '.join(command)}); see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-15:]))
    return float(json.loads((output / "eval_results.json").read_text())["top1"])


@torch.no_grad()
def encoder_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """MAGE encoder features `(N, D)`: the mean over the image tokens (the class position left out)."""
    return torch.cat([model.mage(pixel_values=x).last_hidden_state[:, 1:].mean(1) for x in batches(pixels)])


def nearest(query: torch.Tensor, reference: torch.Tensor, cosine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance `(Q,)` from each row of `query` `(Q, D)` to its nearest row of `reference` `(R, D)`, and its index:
    Euclidean, or cosine distance (1 - cosine similarity). In float64."""
    q, r = query.double(), reference.double()
    if cosine:
        q, r = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(r, dim=1)
        distance = 1 - q @ r.T  # (Q, R)
    else:
        distance = (q.pow(2).sum(1, keepdim=True) + r.pow(2).sum(1) - 2 * q @ r.T).clamp_min(0).sqrt()  # (Q, R)
    return distance.min(1)


def diversity(samples_nn: torch.Tensor, test_nn: torch.Tensor) -> dict:
    """Sample-to-train against test-to-train nearest-neighbour distances."""
    threshold = float(np.percentile(test_nn.numpy(), 5))
    return {
        "samples_median": float(samples_nn.median()), "test_median": float(test_nn.median()),
        "samples_p5": float(np.percentile(samples_nn.numpy(), 5)), "test_p5": threshold,
        "near_copy_fraction": float((samples_nn < threshold).double().mean()),
    }


def picture(rows: list[list[torch.Tensor]], row_labels: list[str] | None = None, scale: int = 4,
            pad: int = 2) -> Image.Image:
    """Rows of `(3, h, w)` images in [0, 1] on white, each upscaled `scale`x (nearest neighbour); a cell is as wide
    as the widest image of its column. `row_labels` are written in a left margin."""
    columns = max(len(row) for row in rows)
    widths = [scale * max(row[j].shape[-1] for row in rows if j < len(row)) for j in range(columns)]
    heights = [scale * max(image.shape[-2] for image in row) for row in rows]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = int(max(draw.textlength(text) for text in row_labels)) + 3 * pad if row_labels else 0
    canvas = Image.new("RGB", (margin + sum(widths) + pad * (columns + 1), sum(heights) + pad * (len(rows) + 1)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    top = pad
    for r, row in enumerate(rows):
        left = margin + pad
        for j, image in enumerate(row):
            array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (h, w, 3)
            tile = Image.fromarray(array)
            canvas.paste(tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST), (left, top))
            left += widths[j] + pad
        if row_labels:
            draw.text((pad, top + heights[r] // 2), row_labels[r], fill="black", anchor="lm")
        top += heights[r] + pad
    return canvas


def generation_kwargs(args) -> dict:
    return {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
            "choice_temperature": args.choice_temperature, "output_type": "pt"}


def inpaint_pictures(pipe: MageInpaintPipeline, pixels: torch.Tensor, labels: torch.Tensor, args, output: Path):
    """The centre square of `pixels` `(4, 3, R, R)` regenerated, and each image outpainted by half its width."""
    size = pixels.shape[-1]
    mask = torch.zeros(size, size)  # (R, R): 1 = regenerate
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    kwargs = {**generation_kwargs(args), "class_labels": labels}
    inpainted = pipe(pixels, mask_image=mask, paste_back=True, **kwargs,
                     generator=[keyed_generator(args.seed, 1, i) for i in range(len(pixels))]).images
    masked = pixels * (1 - mask) + 0.5 * mask  # masked area grey
    picture([list(pixels), list(masked), list(inpainted)]).save(output / "inpaint.png")
    wider = pipe.outpaint(pixels, direction="right", amount=0.5, **kwargs,
                          generator=[keyed_generator(args.seed, 2, i) for i in range(len(pixels))]).images
    picture([list(pixels), list(wider)]).save(output / "outpaint.png")  # wider: (4, 3, R, 1.5 R)


def write_pipeline(model, args, metrics: dict, output: Path) -> Path:
    """Save `OUT/pipeline` (model + scheduler with our choice temperature), its training arguments, the sample grid
    and the model card; check that it loads and that the card parses."""
    from huggingface_hub import ModelCard

    folder = output / "pipeline"
    shutil.rmtree(folder, ignore_errors=True)
    names = metrics["settings"]["class_names"]
    if model.config.num_classes and sorted(model.config.id2label) != list(range(model.config.num_classes)):
        # train_mage.py saves a ClassLabel's names since the shipped model was trained; add them here otherwise.
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: i for i, name in enumerate(names)}
    scheduler = MageScheduler.from_model_config(model.config, choice_temperature=args.choice_temperature)
    MageGenerationPipeline(model=model, scheduler=scheduler).save_pretrained(folder)
    training_args = json.loads((Path(args.mage) / "training_args.json").read_text())
    training_args = {k: v for k, v in training_args.items() if not SECRET_KEY.search(k)}
    if any(isinstance(v, str) and v.startswith("hf_") for v in training_args.values()):
        raise SystemExit("training_args.json holds what looks like a Hub token; not copying it.")
    (folder / "training_args.json").write_text(json.dumps(training_args, indent=2) + "\n")
    shutil.copy(output / "samples_grid.png", folder / "samples.png")
    # The card builder (also `mage-hf push`'s) puts evaluation.md into the card's Evaluation section.
    (folder / "evaluation.md").write_text(evaluation_section(metrics, args) + "\n")

    card = build_model_card(
        inspect_folder(folder), repo_id=None, sample_grid="samples.png", title="mage-hf emoji demo model",
        dataset_description="Google's Noto emoji at 32x32 pixels",
    )
    card.save(folder / "README.md")
    ModelCard.load(folder / "README.md")  # raises if the card does not parse
    MageGenerationPipeline.from_pretrained(folder)
    return folder


def evaluation_section(m: dict, args) -> str:
    tok, val, probe = m["tokenizer"], m["mage_validation"], m["linear_probe"]
    pix, feat = m["diversity"]["pixel_l2"], m["diversity"]["feature_cosine"]
    rows = [
        ("Tokenizer reconstruction PSNR", f"{tok['reconstruction_psnr_db']:.2f} dB",
         "VQGAN encode + decode of the test images at 32 px, pixels in [0, 1], mean over images"),
        ("Codebook usage", f"{100 * tok['codebook_usage']:.1f}% of {tok['codebook_size']}",
         "share of the codes that occur in the tokens of the train split (no augmentation)"),
        ("Codebook perplexity", f"{tok['codebook_perplexity']:.1f} codes",
         "exp of the entropy of the train split's code histogram (the effective number of codes used)"),
        ("MAGE masked-token loss", f"{val['loss']:.3f} nats",
         f"training loss (label-smoothed cross-entropy) on the test split, {val['repeats']} seeded masks"),
        ("MAGE masked-token accuracy", f"{100 * val['masked_token_accuracy']:.1f}%",
         "argmax of the logits equals the true code, over the masked test tokens"),
        ("Linear probe top-1, trained encoder", f"{probe['trained_top1']:.1f}%",
         (f"train_classifier.py --mode linear_probe: a linear head on the mean-pooled, batch-normalised encoder "
          f"features, trained with LARS (lr 100, batch 128) for {args.probe_epochs} epochs on whole train images; "
          f"9 categories; test split (the commonest category is {100 * probe['majority_share']:.1f}% of it)")),
        ("Linear probe top-1, random-init encoder", f"{probe['random_init_top1']:.1f}%",
         "the same probe on the same config and tokenizer with a random transformer (the baseline)"),
    ]
    for name, d in (("pixel L2", pix), ("feature cosine", feat)):
        rows += [
            (f"NN distance to train, {name}: samples / test (median)",
             f"{d['samples_median']:.3f} / {d['test_median']:.3f}",
             "distance of each generated sample / each test image to its nearest train image"),
            (f"NN distance to train, {name}: samples / test (5th percentile)",
             f"{d['samples_p5']:.3f} / {d['test_p5']:.3f}", "the closest 5% of each"),
            (f"Near-copies, {name}", f"{100 * d['near_copy_fraction']:.1f}%",
             ("samples closer to a train image than the 5th percentile of the test images' distances (about 5% "
              "for samples as novel as held-out emoji)")),
        ]
    s = m["settings"]
    lines = [
        (f"Measured by `training/recipes/emoji/evaluate.py` (seed {s['seed']}, CPU, float32) on the `test` split "
         f"({s['num_test_images']} images) and `train` split ({s['num_train_images']} images). Samples: "
         f"{s['samples_per_class']} per class, {s['steps']} decoding steps, guidance scale {s['guidance_scale']}, "
         f"choice temperature {s['choice_temperature']}. Pixel distances are between 32 px RGB images in [0, 1], "
         "flattened; feature distances between MAGE encoder features (mean over the image tokens)."), "",
        "| metric | value | meaning |", "| --- | --- | --- |",
        *[f"| {name} | {value} | {meaning} |" for name, value, meaning in rows], "",
        (f"[`samples.png`](samples.png) (shown above) has one row per category, top to bottom "
         f"{', '.join(s['class_names'])}; sample `i` of class `c` comes from "
         "`torch.Generator().manual_seed(1000 * seed + 100 * c + i)`."), "",
        "### Data", "", ATTRIBUTION,
    ]
    return "\n".join(lines)


def main(args) -> dict:
    import datasets

    torch.manual_seed(args.seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    timings, start = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        timings[name] = time.perf_counter() - start
        print(f"[{name}] {timings[name]:.1f} s", flush=True)
        start = time.perf_counter()

    data = datasets.load_from_disk(args.data)
    class_names = data["train"].features["label"].names
    overlap = set(data["train"]["group"]) & set(data["test"]["group"])
    if overlap:
        raise SystemExit(f"{len(overlap)} emoji groups are in both train and test (e.g. {min(overlap)}).")
    vq = MageVQModel.from_pretrained(args.vq, dtype=torch.float32).eval()
    model = MageForMaskedImageModeling.from_pretrained(args.mage, dtype=torch.float32).eval()
    if weights_fingerprint(vq) != weights_fingerprint(model.mage.vq_model):
        print(f"Warning: the tokenizer inside {args.mage} differs from {args.vq}.")
    resolution = vq.config.resolution
    train, _ = load_split(data["train"], resolution)  # (3421, 3, 32, 32)
    test, test_labels = load_split(data["test"], resolution)  # (360, 3, 32, 32)
    metrics = {"settings": {
        "seed": args.seed, "resolution": resolution, "num_train_images": len(train), "num_test_images": len(test),
        "probe_epochs": args.probe_epochs, "samples_per_class": args.samples_per_class, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "choice_temperature": args.choice_temperature,
        "class_names": class_names,
    }}
    lap("load")
    if args.reuse_metrics:
        measured = json.loads((output / "metrics.json").read_text())
        if measured["settings"] != metrics["settings"]:
            raise SystemExit(f"{output / 'metrics.json'} was measured with other settings: {measured['settings']}.")
        folder = write_pipeline(model, args, measured, output)
        print(f"Rewrote {folder} from {output / 'metrics.json'}.")
        return metrics

    # 1. Tokenizer, 2. MAGE's own loss on held-out images.
    metrics["tokenizer"] = tokenizer_metrics(vq, train, test)
    lap("tokenizer")
    metrics["mage_validation"] = mage_validation(model, test, test_labels, args.seed)
    lap("mage_validation")

    # 3. Linear probes: the trained encoder against a random one with the same tokenizer.
    save_random_init(model, args.seed, output / "random-init")
    metrics["linear_probe"] = {
        "trained_top1": linear_probe(Path(args.mage), args, output / "probe-mage"),
        "random_init_top1": linear_probe(output / "random-init", args, output / "probe-random"),
        "epochs": args.probe_epochs,
        "settings": " ".join(PROBE_SETTINGS),
        "majority_share": torch.bincount(test_labels).max().item() / len(test_labels),
    }
    lap("linear_probe")

    # 4. Samples, and their distance to the training set against that of held-out images.
    scheduler = MageScheduler.from_model_config(model.config, choice_temperature=args.choice_temperature)
    pipe = MageGenerationPipeline(model=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    n = args.samples_per_class
    samples = torch.stack([
        pipe(num_images=n, class_labels=[c] * n, **generation_kwargs(args),
             generator=[torch.Generator().manual_seed(args.seed * 1000 + c * 100 + i) for i in range(n)]).images
        for c in range(len(class_names))
    ])  # (C, n, 3, R, R)
    picture([list(row) for row in samples], row_labels=class_names).save(output / "samples_grid.png")
    samples = samples.flatten(0, 1)  # (C * n, 3, R, R), class-major
    lap("samples")

    sample_pix, sample_idx = nearest(samples.flatten(1), train.flatten(1))  # (S,), (S,)
    test_pix, _ = nearest(test.flatten(1), train.flatten(1))  # (T,)
    train_features = encoder_features(model, train)  # (N, D)
    sample_feat, _ = nearest(encoder_features(model, samples), train_features, cosine=True)
    test_feat, _ = nearest(encoder_features(model, test), train_features, cosine=True)
    metrics["diversity"] = {"num_samples": len(samples), "pixel_l2": diversity(sample_pix, test_pix),
                            "feature_cosine": diversity(sample_feat, test_feat)}
    closest = sample_pix.argsort()[:8].tolist()  # the 8 samples nearest to a training image
    pairs = [(samples[i], train[sample_idx[i]]) for i in closest]
    rows = [[image for pair in pairs[i : i + 2] for image in pair] for i in range(0, len(pairs), 2)]  # 2 pairs a row
    picture(rows).save(output / "nearest_neighbours.png")
    lap("diversity")

    # 5. Inpainting and outpainting of 4 test images spread over the categories.
    picks = torch.linspace(0, len(test) - 1, 4).round().long()
    inpaint_pictures(MageInpaintPipeline(model=model, scheduler=scheduler), test[picks], test_labels[picks], args,
                     output)
    lap("inpaint")

    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # 6. The shipped pipeline folder.
    folder = write_pipeline(model, args, metrics, output)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    lap("pipeline")
    print(json.dumps({k: v for k, v in metrics.items() if k != "settings"}, indent=2))
    print(f"Wrote {output / 'metrics.json'} and {folder} ({size / 1e6:.1f} MB); "
          f"{sum(timings.values()):.0f} s in all.")
    return metrics


if __name__ == "__main__":
    main(parse_args())
