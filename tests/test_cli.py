"""`mage-hf features` and the demo (`make demo`'s second step) on the converted golden model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mage_hf import MageImageProcessor, MageModel
from mage_hf.cli import main


@pytest.fixture
def photos(tmp_path):
    from PIL import Image
    from skimage import data

    paths = []
    for name in ("chelsea", "coffee", "camera"):  # camera is grayscale
        path = tmp_path / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(path)
        paths.append(path)
    return paths


def test_features_command(converted, photos, tmp_path, capsys):
    out = tmp_path / "features.safetensors"
    assert main(["features", "--model", str(converted["pretrain"]), *map(str, photos), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 images -> last_hidden_state (3, 257, 64), pooled (3, 64)" in printed
    saved = load_file(str(out))
    from PIL import Image

    model = MageModel.from_pretrained(converted["pretrain"]).eval()
    inputs = MageImageProcessor.from_pretrained(converted["pretrain"])([Image.open(p) for p in photos], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(saved["pooler_output"], model(**inputs).pooler_output, atol=1e-6)


def test_features_command_rejects_a_non_image(converted, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    with pytest.raises(SystemExit, match="cannot read .*notes.png as an image"):
        main(["features", "--model", str(converted["pretrain"]), str(bogus)])


def test_demo_writes_its_outputs(converted, tmp_path, capsys):
    from mage_hf import demo

    demo.main(demo.parse_args(["--model", str(converted["pretrain"]), "--output", str(tmp_path)]))
    printed = capsys.readouterr().out
    assert "Cosine similarity" in printed and "masked-token accuracy" in printed
    from PIL import Image

    picture = Image.open(tmp_path / "reconstructions.png")
    assert picture.size == (4 * 256, 3 * 256)
    assert load_file(str(tmp_path / "features.safetensors"))["pooler_output"].shape == (4, 64)
