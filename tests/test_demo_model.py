"""The embedded demo model (`src/mage_hf/data/demo-model`, trained by `training/recipes/emoji`): it is shipped within
its size budget as safetensors, loads, generates and inpaints, its card reports the evaluation, and `make demo`'s job
(`mage_hf.demo`) writes its pictures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mage_hf import MageGenerationPipeline, MageInpaintPipeline
from mage_hf.demo import EMBEDDED_MODEL, EXAMPLE_EMOJI, main, parse_args


def test_the_shipped_folder_is_small_and_safetensors_only():
    files = [p for p in EMBEDDED_MODEL.rglob("*") if p.is_file()]
    assert (EMBEDDED_MODEL / "model_index.json").is_file() and (EMBEDDED_MODEL / "model" / "model.safetensors").is_file()
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]


@pytest.fixture(scope="module")
def pipe():
    pipe = MageGenerationPipeline.from_pretrained(EMBEDDED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_it_loads_and_generates_each_class_reproducibly(pipe):
    config = pipe.model.config
    assert config.num_classes == 9 and pipe.resolution == 32
    labels = list(range(config.num_classes))
    kwargs = {"num_images": len(labels), "class_labels": labels, "guidance_scale": 2.0, "num_inference_steps": 8,
              "output_type": "np"}
    images = pipe(generator=[torch.Generator().manual_seed(i) for i in labels], **kwargs).images
    again = pipe(generator=[torch.Generator().manual_seed(i) for i in labels], **kwargs).images
    assert images.shape == (9, 32, 32, 3) and np.array_equal(images, again)
    assert images.std(axis=(1, 2, 3)).min() > 0.05  # pictures, not flat fills


def test_it_inpaints_held_out_emoji_keeping_the_rest(pipe):
    inpaint = MageInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    image = Image.open(sorted(EXAMPLE_EMOJI.glob("*.png"))[0]).convert("RGB").resize((32, 32), Image.BICUBIC)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = inpaint(image, mask_image=mask, paste_back=True, num_inference_steps=8,
                  generator=torch.Generator().manual_seed(0), output_type="np")
    result = (out.images[0] * 255).round().astype(np.uint8)
    keep = np.asarray(mask) == 0
    assert np.array_equal(result[keep], np.asarray(image)[keep])
    assert out.token_mask[0].sum() == 16  # the 4x4 centre cells of the 8x8 grid


def test_the_card_reports_the_evaluation():
    from huggingface_hub import ModelCard

    card = ModelCard.load(EMBEDDED_MODEL / "README.md")
    text = card.text
    for needle in ("PSNR", "codebook", "masked-token accuracy", "linear probe", "random", "nearest"):
        assert needle.lower() in text.lower(), needle
    assert card.data.license and "Noto" in text


def test_make_demo_job_writes_its_pictures(tmp_path, capsys):
    paths = main(parse_args(["--output", str(tmp_path), "--steps", "6", "--per-class", "2"]))
    printed = capsys.readouterr().out
    for name in ("samples", "inpainting", "outpainting"):
        assert paths[name].is_file() and str(paths[name]) in printed
    assert Image.open(paths["samples"]).height >= 9 * 128  # one row per class
