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


def _card_table(text: str) -> dict[str, str]:
    """The evaluation table of the card: metric -> value."""
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line.count(" | ") == 2]
    return {row[0].lstrip("| "): row[1] for row in rows}


def test_the_card_reports_the_evaluation():
    from huggingface_hub import ModelCard

    card = ModelCard.load(EMBEDDED_MODEL / "README.md")
    table = _card_table(card.text)
    psnr = float(table["Tokenizer reconstruction PSNR"].removesuffix(" dB"))
    usage = float(table["Codebook usage"].split("%")[0])
    accuracy = float(table["MAGE masked-token accuracy"].removesuffix("%"))
    probe = float(table["Linear probe top-1, trained encoder"].removesuffix("%"))
    baseline = float(table["Linear probe top-1, random-init encoder"].removesuffix("%"))
    assert float(table["MAGE masked-token loss"].removesuffix(" nats")) > 0
    # What the card claims about the shipped model, as measured by evaluate.py when it was made.
    assert psnr > 20 and usage > 90 and accuracy > 100 / 512  # better than chance over the codebook
    assert probe > baseline + 5  # the trained encoder's features are better than a random one's
    assert table["Near-copies, pixel L2"] == "0.0%"
    assert card.data.license == "mit" and "Noto Emoji" in card.text and "Apache-2.0" in card.text


def test_the_card_snippets_run_against_the_embedded_model(tmp_path, monkeypatch):
    """Every Python snippet of the shipped card runs as written (it loads `EMBEDDED_MODEL`)."""
    import re

    text = (EMBEDDED_MODEL / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2 and all("EMBEDDED_MODEL" in block for block in blocks)
    monkeypatch.chdir(tmp_path)
    Image.open(sorted(EXAMPLE_EMOJI.glob("*.png"))[0]).convert("RGB").save("photo.png")
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102


def test_class_names_come_with_the_model(pipe):
    assert list(pipe.labels) == ["Activities", "Animals & Nature", "Flags", "Food & Drink", "Objects",
                                 "People & Body", "Smileys & Emotion", "Symbols", "Travel & Places"]
    kwargs = {"num_images": 1, "guidance_scale": 2.0, "num_inference_steps": 4, "output_type": "latent"}
    by_name = pipe(class_labels="Flags", generator=torch.Generator().manual_seed(3), **kwargs).images
    assert torch.equal(by_name, pipe(class_labels=2, generator=torch.Generator().manual_seed(3), **kwargs).images)


def test_make_demo_job_writes_its_pictures(tmp_path, capsys):
    paths = main(parse_args(["--output", str(tmp_path), "--steps", "6", "--per-class", "2"]))
    printed = capsys.readouterr().out
    for name in ("samples", "inpainting", "outpainting"):
        assert paths[name].is_file() and str(paths[name]) in printed
    assert Image.open(paths["samples"]).height >= 9 * 128  # one row per class


def test_the_command_line_defaults_to_the_embedded_model(tmp_path, capsys):
    """`mage-hf generate` / `inpaint` with no `--model`: the embedded model, with class names on the command line."""
    from mage_hf import cli

    assert cli.main(["generate", "--class-label", "Flags", "--guidance-scale", "2", "--num-images", "2", "--steps", "4",
                     "--output", str(tmp_path / "flags")]) == 0
    samples = sorted((tmp_path / "flags").glob("sample_*.png"))
    assert len(samples) == 2 and Image.open(samples[0]).size == (32, 32)
    image = sorted(EXAMPLE_EMOJI.glob("*.png"))[3]  # 64 px: the box is in its pixels
    assert cli.main(["inpaint", "--image", str(image), "--box", "16,16,48,48", "--paste-back", "--num-images", "1",
                     "--steps", "4", "--output", str(tmp_path / "inpainted")]) == 0
    assert (tmp_path / "inpainted" / "grid.png").is_file()
    assert cli.main(["generate", "--class-label", "Emoji I made up", "--num-images", "1",
                     "--output", str(tmp_path / "none")]) == 2
    assert "Unknown class name(s) ['Emoji I made up']; this model's classes are: Activities" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_publishing_it_keeps_the_evaluation(tmp_path, capsys):
    """`mage-hf push --dry-run` of the embedded folder: the staged card has the evaluation table and class names."""
    from huggingface_hub import ModelCard

    from mage_hf import cli

    staged = tmp_path / "staged"
    assert cli.main(["push", "--folder", str(EMBEDDED_MODEL), "--repo-id", "someone/mage-emoji", "--dry-run",
                     "--output", str(staged), "--samples", "0"]) == 0, capsys.readouterr().err
    card = ModelCard.load(staged / "README.md")
    assert _card_table(card.text)["Linear probe top-1, trained encoder"] == _card_table(
        (EMBEDDED_MODEL / "README.md").read_text())["Linear probe top-1, trained encoder"]
    assert 'from_pretrained("someone/mage-emoji")' in card.text and "6 Smileys & Emotion" in card.text
    assert (staged / "model" / "model.safetensors").is_file() and card.data.license == "mit"


def test_every_shipped_data_file_is_package_data():
    """A wheel (`pip install mage-hf`, not only an editable install) carries the model and its examples: every file
    under `src/mage_hf/data` matches one of pyproject's package-data patterns (setuptools' globs: `*` stays within one
    path component)."""
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

    import mage_hf

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mage_hf"]
    package = Path(mage_hf.__file__).parent
    files = [p.relative_to(package).as_posix() for p in (package / "data").rglob("*") if p.is_file()]
    assert "data/demo-model/model/model.safetensors" in files and "data/demo-model/evaluation.md" in files
    missing = [f for f in files if not any(
        fnmatch.fnmatch(f, pattern) and f.count("/") == pattern.count("/") for pattern in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_demo_arguments_are_checked():
    for argv in (["--per-class", "0"], ["--steps", "0"], ["--guidance-scale", "0.5"], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as info:
            parse_args(argv)
        assert info.value.code == 2, argv  # argparse's usage error, not a traceback from inside the pipeline
