"""The README's Python snippets run as written, against converted folders of the names they use.

`mage-vitb-hf` is the golden pre-training checkpoint and `mage-vitb-ft-hf` an original-layout classifier with 1000
classes, both converted by `mage-hf convert`; `cat.png` is scikit-image's photo of Chelsea the cat.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mage_hf.convert_mage import convert_checkpoint
from mage_hf.labels import imagenet1k_id2label
from original_reference import OriginalShape, make_original_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, converted):
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("readme")
    (root / "mage-vitb-hf").symlink_to(converted["pretrain"])
    shape = OriginalShape.tiny()
    checkpoint = root / "ft.pth"
    torch.save(make_original_checkpoint(type(shape)(**{**shape.__dict__, "num_classes": 1000}), "finetune"), checkpoint)
    convert_checkpoint(checkpoint, root / "mage-vitb-ft-hf", num_attention_heads=shape.num_heads)
    Image.fromarray(data.chelsea()).save(root / "cat.png")
    return root


def run(block: str, workdir: Path, monkeypatch) -> dict:
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace


def test_the_readme_has_the_snippets_this_file_checks():
    blocks = python_blocks()
    assert len(blocks) == 8
    assert sum("AutoModel.from_pretrained(\"mage-vitb-hf\"" in b for b in blocks) == 2


def test_embedded_model_snippet(workdir, monkeypatch, capsys):
    ns = run(next(b for b in python_blocks() if "EMBEDDED_MODEL" in b), workdir, monkeypatch)
    assert "'Smileys & Emotion'" in capsys.readouterr().out
    assert len(ns["images"]) == 4 and all(image.size == (32, 32) for image in ns["images"])


def test_features_snippet(workdir, monkeypatch):
    ns = run(next(b for b in python_blocks() if "outputs = model(**inputs)" in b), workdir, monkeypatch)
    assert ns["outputs"].last_hidden_state.shape == (1, 257, 64)
    assert ns["outputs"].pooler_output.shape == (1, 64)


def test_classification_snippet(workdir, monkeypatch, capsys):
    ns = run(next(b for b in python_blocks() if "image-classification" in b), workdir, monkeypatch)
    predictions = ns["classifier"]("cat.png", top_k=3)
    names = set(imagenet1k_id2label().values())
    assert len(predictions) == 3 and all(p["label"] in names for p in predictions)
    assert "'label'" in capsys.readouterr().out


def test_feature_extraction_pipeline_snippet(workdir, monkeypatch):
    ns = run(next(b for b in python_blocks() if "image-feature-extraction" in b), workdir, monkeypatch)
    assert ns["pooled"].shape == (1, 64)


def test_masked_token_snippet(workdir, monkeypatch):
    ns = run(next(b for b in python_blocks() if "token_mask=mask.flatten(1)" in b), workdir, monkeypatch)
    assert ns["token_ids"].shape == (1, 16, 16)
    assert ns["reconstruction"].shape == ns["filled"].shape == (1, 3, 256, 256)
    known = ~ns["mask"].flatten(1)
    assert torch.equal(ns["predicted"][known], ns["token_ids"].flatten(1)[known])
    assert ns["out"].logits.shape == (1, 256, 64) and torch.isfinite(ns["out"].loss)


def test_attention_snippet(workdir, monkeypatch):
    block = next(b for b in python_blocks() if "attn_implementation" in b)
    ns = run("import mage_hf\nfrom transformers import AutoModel\n" + block, workdir, monkeypatch)
    assert ns["model"].config._attn_implementation == "eager"


def test_generation_snippet(workdir, monkeypatch):
    ns = run(next(b for b in python_blocks() if "MageGenerationPipeline.from_pretrained(\"mage-vitb-hf\")" in b), workdir, monkeypatch)
    assert len(ns["images"]) == 4 and ns["images"][0].size == (256, 256)
    assert (workdir / "sample.png").is_file() and (workdir / "mage-vitb-pipeline" / "model_index.json").is_file()


def test_inpainting_snippet(workdir, monkeypatch):
    ns = run(next(b for b in python_blocks() if "MageInpaintPipeline.from_pretrained" in b), workdir, monkeypatch)
    # The box 100..220 x 40..160 of a 300 px image covers cells 5..11 x 2..8 at 256 px (16 px cells).
    assert int(ns["out"].token_mask.sum()) == 7 * 7
    assert ns["wider"].images[0].size == (384, 256)
    assert ns["variation"].size == (256, 256)
    assert (workdir / "inpainted.png").is_file()
