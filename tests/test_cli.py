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
    # One image: the pooled class position is a view of last_hidden_state, which safetensors refused to save.
    assert main(["features", "--model", str(converted["pretrain"]), str(photos[0]), "--output", str(out)]) == 0
    assert load_file(str(out))["pooler_output"].shape == (1, 64)


def test_features_command_rejects_a_non_image(converted, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    with pytest.raises(SystemExit, match="cannot read .*notes.png as an image"):
        main(["features", "--model", str(converted["pretrain"]), str(bogus)])


def test_demo_job_takes_any_pipeline_folder(converted, tmp_path, capsys):
    """`make demo`'s job with `--model` (here the converted golden model, unconditional, 256 px)."""
    from PIL import Image

    from mage_hf import demo

    paths = demo.main(demo.parse_args(["--model", str(converted["pretrain"]), "--output", str(tmp_path),
                                       "--steps", "4"]))
    printed = capsys.readouterr().out
    assert all(path.is_file() and str(path) in printed for path in paths.values())
    assert Image.open(paths["samples"]).size == (8 * 128 + 7 * 4, 4 * 128 + 3 * 4)  # 4 rows of 8 unconditional samples


# ------------------------------------------------------------------------------------------ generate / inpaint / outpaint


def _pngs(folder):
    import numpy as np
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_generate_command_is_seeded_per_image(converted, tmp_path, capsys):
    import numpy as np

    common = ["generate", "--model", str(converted["pretrain"]), "--num-images", "3", "--steps", "2"]
    assert main([*common, "--batch-size", "3", "--output", str(tmp_path / "a")]) == 0
    assert main([*common, "--batch-size", "1", "--output", str(tmp_path / "b")]) == 0
    assert "3 images and grid.png" in capsys.readouterr().out
    a, b = _pngs(tmp_path / "a"), _pngs(tmp_path / "b")
    assert sorted(a) == ["grid.png", "sample_0000.png", "sample_0001.png", "sample_0002.png"]
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the batch size does not change image n
    assert a["grid.png"].shape == (256, 3 * 256, 3)
    assert not np.array_equal(a["sample_0000.png"], a["sample_0001.png"])


def test_inpaint_and_outpaint_commands(converted, photos, tmp_path):
    import numpy as np
    from PIL import Image

    model = str(converted["pretrain"])
    out = tmp_path / "inpaint"
    # chelsea is 451x300: centre-cropped to 300x300, then the box is regenerated.
    assert main(["inpaint", "--model", model, "--image", str(photos[0]), "--box", "0,0,150,150", "--num-images", "2",
                 "--steps", "2", "--paste-back", "--output", str(out)]) == 0
    files = _pngs(out)
    assert sorted(files) == ["grid.png", "inpaint_0000.png", "inpaint_0001.png"]
    original = np.asarray(Image.open(photos[0]).convert("RGB").crop((75, 0, 375, 300)).resize((256, 256), Image.BICUBIC))
    # Outside the box (mapped to 256 px: 0..128), the pasted-back pixels are the (resized) input's.
    assert np.abs(files["inpaint_0000.png"][140:, 140:].astype(int) - original[140:, 140:].astype(int)).max() <= 2
    assert files["grid.png"].shape == (256, 4 * 256, 3)  # input, token overlay, two results

    out = tmp_path / "outpaint"
    assert main(["outpaint", "--model", model, "--image", str(photos[1]), "--direction", "left", "--amount", "0.5",
                 "--num-images", "1", "--steps", "2", "--output", str(out)]) == 0
    assert _pngs(out)["outpaint_left_0000.png"].shape == (256, 384, 3)


def test_inpaint_command_errors(converted, photos, tmp_path, capsys):
    model = str(converted["pretrain"])
    assert main(["inpaint", "--model", model, "--image", str(photos[0]), "--output", str(tmp_path)]) == 2
    assert "--mask" in capsys.readouterr().err
    assert main(["inpaint", "--model", model, "--image", str(photos[0]), "--box", "1,2,3", "--output", str(tmp_path)]) == 2
    assert "x0,y0,x1,y1" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "neither a pipeline" in capsys.readouterr().err
    assert main(["generate", "--model", model, "--num-images", "0"]) == 2
    capsys.readouterr()
    for box in ("300,300,400,400", "100,100,50,50"):  # outside the 300x300 square; reversed
        argv = ["inpaint", "--model", model, "--image", str(photos[0]), "--box", box, "--output", str(tmp_path)]
        assert main(argv) == 2
        assert "--box" in capsys.readouterr().err
    for device, message in (("gpu", "not a device name"), ("cuda:7", "CUDA")):
        assert main(["generate", "--model", model, "--device", device, "--output", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
        assert main(["demo", "--device", device]) == 2  # before the app starts
        assert message in capsys.readouterr().err


def test_inpaint_composites_transparency_onto_white(converted, tmp_path):
    """A transparent background becomes white, as in the pipeline (and the emoji the demo model was trained on),
    not the black that a plain RGB conversion reveals."""
    import numpy as np
    from PIL import Image

    rgba = Image.new("RGBA", (256, 256), (0, 0, 0, 0))  # transparent black
    rgba.paste((200, 30, 30, 255), (64, 64, 192, 192))
    path = tmp_path / "sticker.png"
    rgba.save(path)
    out = tmp_path / "out"
    assert main(["inpaint", "--model", str(converted["pretrain"]), "--image", str(path), "--box", "96,96,160,160",
                 "--steps", "1", "--paste-back", "--output", str(out)]) == 0
    result = np.asarray(Image.open(out / "inpaint_0000.png").convert("RGB")).astype(int)
    assert (result[:32, :32] >= 250).all()  # pasted back from the white-composited input
    assert abs(result[70, 70] - np.array([200, 30, 30])).max() <= 3
