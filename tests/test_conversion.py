"""Conversion is general: any original shape converts, every key is accounted for, and bad files fail clearly.

Shapes other than the golden one are checked against tests/original_reference.py, a functional re-implementation
of the original forward passes that test_original_reference.py proves against the golden data.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

from mage_hf import MageForImageClassification, MageForMaskedImageModeling, MageVQModel
from mage_hf.cli import main
from mage_hf.convert_mage import CheckpointError, convert_checkpoint
from original_reference import (
    OriginalShape,
    encoder_hidden_states,
    finetune_forward,
    make_original_checkpoint,
    mim_logits,
    vq_decode,
    vq_encode,
)

from conftest import TINY_HEADS, require_golden

# Shapes unlike the golden one: depth, width, heads, a decoder narrower or wider than the encoder, codebook size
# (vocabulary and fake class label follow it), VQGAN width, multipliers, depth per level and number of levels.
SHAPES = {
    "wide-decoder": OriginalShape(
        embed_dim=96, depth=3, num_heads=3, decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=8,
        vq_ch=32, vq_ch_mult=(1, 2, 2, 4, 4), vq_num_res_blocks=2, codebook_size=128, codebook_dim=16,
        mlp_ratio=2, num_classes=7,
    ),
    # The original fixes 257 positions (and a 16-pixel patch grid for the decoder's table), so every shape it can
    # run has a 16x16 token grid at 256 pixels, i.e. five VQGAN levels.
    "narrow-decoder": OriginalShape(
        embed_dim=32, depth=1, num_heads=4, decoder_embed_dim=24, decoder_depth=3, decoder_num_heads=2,
        vq_ch=64, vq_ch_mult=(1, 1, 2, 1, 3), vq_num_res_blocks=1, codebook_size=300, codebook_dim=8,
        num_classes=3,
    ),
}


def save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def heads(shape: OriginalShape, kind: str) -> dict:
    if kind == "vqgan":
        return {}
    extra = {"decoder_num_attention_heads": shape.decoder_num_heads} if kind == "pretrain" else {}
    return {"num_attention_heads": shape.num_heads, **extra}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_any_shape_converts_and_matches_the_original(tmp_path, name):
    shape = SHAPES[name]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, shape.image_size, shape.image_size, generator=g)
    L = shape.grid_size**2

    pre = make_original_checkpoint(shape, "pretrain", seed=3)
    convert_checkpoint(save(tmp_path, "pre.pth", pre), tmp_path / "pre", **heads(shape, "pretrain"))
    sd = pre["model"]
    model = MageForMaskedImageModeling.from_pretrained(tmp_path / "pre").eval()
    assert model.config.vocab_size == shape.vocab_size
    assert model.config.fake_class_label == shape.fake_class_label
    assert model.config.mask_token_id == shape.mask_token_id

    with torch.no_grad():
        ids, quantized = vq_encode(sd, images, shape)
        ours = model.mage.vq_model.encode(images)
        assert torch.equal(ours.token_ids.flatten(1), ids)
        assert len(ids.unique()) > 5  # a meaningful tokenization, not one id everywhere
        decoded = vq_decode(sd, quantized, shape)
        assert (model.mage.vq_model.decode(ours.token_ids) - decoded).abs().max() < 1e-4

        # Encoder over the full sequence.
        sequence = torch.cat([torch.full((2, 1), shape.fake_class_label), ids], dim=1)
        ref_hidden = encoder_hidden_states(sd, sequence, shape)
        assert (model.mage(input_ids=ids).last_hidden_state - ref_hidden).abs().max() < 1e-5

        # Masked token modelling with dropping: 60% masked, 40% of the tokens dropped.
        noise = torch.rand(2, L, generator=g)
        rank = noise.argsort(1).argsort(1)
        mask, drop = rank < int(0.6 * L), rank < int(0.4 * L)
        out = model(input_ids=ids, token_mask=mask, token_drop_mask=drop, labels=ids)
        zero = torch.zeros(2, 1, dtype=torch.bool)
        masked_seq = torch.cat([torch.full((2, 1), shape.fake_class_label), ids.masked_fill(mask, shape.mask_token_id)], 1)
        ref_enc, ref_logits = mim_logits(sd, masked_seq, torch.cat([zero, drop], 1).float(), torch.cat([zero, mask], 1).float(), shape)
        assert (out.encoder_last_hidden_state - ref_enc).abs().max() < 1e-5
        assert (out.logits - ref_logits[:, 1:, : shape.codebook_size]).abs().max() < 1e-5

    ft = make_original_checkpoint(shape, "finetune", seed=4)
    convert_checkpoint(save(tmp_path, "ft.pth", ft), tmp_path / "ft", **heads(shape, "finetune"))
    classifier = MageForImageClassification.from_pretrained(tmp_path / "ft").eval()
    assert classifier.config.num_labels == shape.num_classes
    with torch.no_grad():
        ref_features, ref_logits = finetune_forward(ft["model"], images, shape)
        assert (classifier(pixel_values=images).logits - ref_logits).abs().max() < 1e-5

    vq = make_original_checkpoint(shape, "vqgan", seed=3)
    convert_checkpoint(save(tmp_path, "vq.ckpt", vq), tmp_path / "vq")
    standalone = MageVQModel.from_pretrained(tmp_path / "vq").eval()
    with torch.no_grad():
        assert torch.equal(standalone.encode(images).token_ids.flatten(1), vq_encode(vq["state_dict"], images, shape, prefix="")[0])


def test_classifier_with_class_position_pooling(tmp_path):
    """A fine-tuned checkpoint without global pooling (MAGE's --cls_token) keeps `norm` and pools position 0."""
    shape = SHAPES["wide-decoder"]
    sd = make_original_checkpoint(shape, "finetune", seed=8)["model"]
    sd["norm.weight"], sd["norm.bias"] = sd.pop("fc_norm.weight"), sd.pop("fc_norm.bias")
    convert_checkpoint(save(tmp_path, "ft.pth", {"model": sd}), tmp_path / "ft", num_attention_heads=shape.num_heads)
    model = MageForImageClassification.from_pretrained(tmp_path / "ft").eval()
    assert model.config.use_mean_pooling is False
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ids, _ = vq_encode(sd, images, shape)
        hidden = encoder_hidden_states(sd, torch.cat([torch.full((2, 1), shape.fake_class_label), ids], 1), shape)
        expected = hidden[:, 0] @ sd["head.weight"].T + sd["head.bias"]
        assert (model(pixel_values=images).logits - expected).abs().max() < 1e-5


def test_the_reload_check_catches_a_wrong_config_or_changed_weights(tmp_path, monkeypatch):
    """After writing, the folder must reload to bit-identical weights and to the same outputs (to float rounding:
    reloaded weights sit at unaligned addresses, which on AVX2 CPUs rounds at ~1e-7). A saved config that does not
    describe the weights, or a weight that changed on the way, stops the conversion and leaves no folder."""
    import json

    from safetensors.torch import load_file, save_file

    shape = SHAPES["wide-decoder"]
    checkpoint = save(tmp_path, "ft.pth", make_original_checkpoint(shape, "finetune", seed=3))
    save_pretrained = MageForImageClassification.save_pretrained

    def wrong_eps(self, folder, *args, **kwargs):
        save_pretrained(self, folder, *args, **kwargs)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1.0}))

    def changed_weight(self, folder, *args, **kwargs):
        save_pretrained(self, folder, *args, **kwargs)
        weights = load_file(folder / "model.safetensors")
        weights["classifier.bias"] = weights["classifier.bias"] + 1e-3
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    for patch, message in ((wrong_eps, "reloads to different numbers"), (changed_weight, "reloads different values")):
        monkeypatch.setattr(MageForImageClassification, "save_pretrained", patch)
        with pytest.raises(CheckpointError, match=message):
            convert_checkpoint(checkpoint, tmp_path / "out", num_attention_heads=shape.num_heads)
        assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["ft.pth"]
    monkeypatch.setattr(MageForImageClassification, "save_pretrained", save_pretrained)
    convert_checkpoint(checkpoint, tmp_path / "out", num_attention_heads=shape.num_heads)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_every_key_is_accounted_for(tmp_path):
    shape = SHAPES["wide-decoder"]
    ckpt = make_original_checkpoint(shape, "pretrain")
    report = convert_checkpoint(save(tmp_path, "pre.pth", ckpt), tmp_path / "out", **heads(shape, "pretrain"))
    assert report.unused == sorted(
        ["cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
         "decoder_pred.weight", "decoder_pred.bias", "token_emb.position_ids"]
    )
    assert report.mapped + len(report.unused) == len(ckpt["model"])
    assert report.max_abs_diff == 0.0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["config.json", "conversion.json", "model.safetensors", "preprocessor_config.json"]


def test_separate_vqgan_file(tmp_path):
    shape = SHAPES["narrow-decoder"]
    pre = make_original_checkpoint(shape, "pretrain", seed=5)
    vq = make_original_checkpoint(shape, "vqgan", seed=5)
    assert torch.equal(pre["model"]["vqgan.quantize.embedding.weight"], vq["state_dict"]["quantize.embedding.weight"])
    without = {"model": {k: v for k, v in pre["model"].items() if not k.startswith("vqgan.")}}
    h = heads(shape, "pretrain")
    with pytest.raises(CheckpointError, match="has no tokenizer weights.*--vqgan"):
        convert_checkpoint(save(tmp_path, "bare.pth", without), tmp_path / "a", **h)
    convert_checkpoint(save(tmp_path, "bare.pth", without), tmp_path / "b", vqgan=save(tmp_path, "vq.ckpt", vq), **h)
    convert_checkpoint(save(tmp_path, "full.pth", pre), tmp_path / "c", vqgan=tmp_path / "vq.ckpt", **h)  # identical: fine
    a = MageForMaskedImageModeling.from_pretrained(tmp_path / "b").state_dict()
    b = MageForMaskedImageModeling.from_pretrained(tmp_path / "c").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = make_original_checkpoint(shape, "vqgan", seed=6)
    with pytest.raises(CheckpointError, match="differs from --vqgan"):
        convert_checkpoint(save(tmp_path, "full.pth", pre), tmp_path / "d", vqgan=save(tmp_path, "o.ckpt", other), **h)
    wrong = make_original_checkpoint(dataclasses.replace(shape, codebook_size=64), "vqgan")
    with pytest.raises(CheckpointError, match="has 1301 rows but the tokenizer has 64 codes"):
        convert_checkpoint(save(tmp_path, "bare.pth", without), tmp_path / "e", vqgan=save(tmp_path, "w.ckpt", wrong), **h)


def test_head_counts_are_required_for_unreleased_shapes(tmp_path):
    shape = SHAPES["wide-decoder"]
    path = save(tmp_path, "pre.pth", make_original_checkpoint(shape, "pretrain"))
    with pytest.raises(CheckpointError, match="pass --num-heads"):
        convert_checkpoint(path, tmp_path / "out")
    with pytest.raises(CheckpointError, match="pass --decoder-num-heads"):
        convert_checkpoint(path, tmp_path / "out", num_attention_heads=3)
    with pytest.raises(ValueError, match="not divisible"):
        convert_checkpoint(path, tmp_path / "out", num_attention_heads=5, decoder_num_attention_heads=8)


# ---------------------------------------------------------------------------------------------- bad files


@pytest.fixture
def golden_pretrain():
    return require_golden() / "mage_pretrain.pth"


def test_truncated_checkpoint(tmp_path, golden_pretrain):
    data = golden_pretrain.read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert_checkpoint(path, tmp_path / "out", num_attention_heads=2, decoder_num_attention_heads=4)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_not_a_checkpoint(tmp_path):
    """Failed downloads saved under a checkpoint's name are named as such, not as unsafe pickles (which an HTML page
    or a Git LFS pointer used to be reported as, since torch's weights-only unpickler fails on their first byte)."""
    cases = {
        "notes.pth": (b"hello", "it does not start like a file written by torch.save"),
        "drive.pth": (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan", "it is an HTML or XML page"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n", "it is a Git LFS pointer"),
        "empty.pth": (b"", "it is empty"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{name} is not a PyTorch checkpoint: {reason}") as info:
            convert_checkpoint(tmp_path / name, tmp_path / "out")
        assert "arbitrary code" not in str(info.value)
    with pytest.raises(CheckpointError, match="No checkpoint file"):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_output_folder_is_never_mixed_or_lost(tmp_path):
    """A non-empty --output is refused unless --overwrite, which replaces it whole, and only once the new folder is
    complete; a file as --output fails before any work."""
    shape = OriginalShape.tiny()
    h = heads(shape, "pretrain")
    path = save(tmp_path, "pre.pth", make_original_checkpoint(shape, "pretrain"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model_index.json").write_text("{}")  # e.g. a pipeline folder the user meant to keep
    with pytest.raises(CheckpointError, match="already exists and is not empty.*--overwrite"):
        convert_checkpoint(path, out, **h)
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "notes.txt"]

    # A conversion that fails with --overwrite leaves the old folder as it was, and no staging folder behind.
    bad = save(tmp_path, "bad.pth", {"model": {k: v for k, v in torch.load(path)["model"].items() if k != "norm.bias"}})
    with pytest.raises(CheckpointError, match="missing"):
        convert_checkpoint(bad, out, overwrite=True, **h)
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "out", "pre.pth"]

    convert_checkpoint(path, out, overwrite=True, **h)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of a temporary folder
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "conversion.json", "model.safetensors", "preprocessor_config.json"
    ]
    MageForMaskedImageModeling.from_pretrained(out)

    # The checkpoint itself inside the folder to replace: refused rather than deleted.
    inside = out / "pre.pth"
    inside.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="would delete"):
        convert_checkpoint(inside, out, overwrite=True, **h)
    assert inside.is_file()

    with pytest.raises(CheckpointError, match="is a file"):
        convert_checkpoint(path, path, **h)
    assert main(["convert", "--checkpoint", str(path), "--output", str(path), *TINY_HEADS]) == 2
    assert torch.load(path)["model"]  # the checkpoint is intact
    assert main(["convert", "--checkpoint", str(path), "--output", str(out), "--overwrite", *TINY_HEADS]) == 0


def test_lost_blocks_and_bad_head_counts(tmp_path):
    shape = OriginalShape.tiny()
    sd = make_original_checkpoint(shape, "pretrain")["model"]
    h = heads(shape, "pretrain")
    no_first = {k: v for k, v in sd.items() if not k.startswith("blocks.0.")}
    with pytest.raises(CheckpointError, match=r"has blocks.1 but no blocks.0.\*: blocks are missing"):
        convert_checkpoint(save(tmp_path, "a.pth", {"model": no_first}), tmp_path / "out", **h)
    # The released decoders have 8 blocks: a ViT-B-wide decoder of another depth is not taken for one.
    from mage_hf.convert_mage import infer_config, infer_vq_config

    wide = dict(sd)
    wide["token_emb.word_embeddings.weight"] = torch.zeros(sd["token_emb.word_embeddings.weight"].shape[0], 768)
    wide["decoder_embed.weight"] = torch.zeros(768, 768)
    for i in range(7):
        wide[f"decoder_blocks.{i}.mlp.fc1.weight"] = torch.zeros(3072, 768)
    vq = infer_vq_config({k[len("vqgan."):]: v for k, v in sd.items() if k.startswith("vqgan.")})
    with pytest.raises(CheckpointError, match="768 wide and 7 deep, not a released shape.*--decoder-num-heads"):
        infer_config(wide, "pretrain", vq, num_attention_heads=12)
    for value in (0, -2):
        with pytest.raises(CheckpointError, match=f"--num-heads must be a positive number of .* got {value}"):
            convert_checkpoint(save(tmp_path, "p.pth", {"model": sd}), tmp_path / "out", num_attention_heads=value,
                               decoder_num_attention_heads=4)
        assert main(["convert", "--checkpoint", str(tmp_path / "p.pth"), "--output", str(tmp_path / "out"),
                     "--num-heads", "2", "--decoder-num-heads", str(value)]) == 2
    assert not (tmp_path / "out").exists()


def test_foreign_checkpoint(tmp_path):
    resnet_like = {"state_dict": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}}
    with pytest.raises(CheckpointError, match="does not look like a MAGE checkpoint"):
        convert_checkpoint(save(tmp_path, "r.pth", resnet_like), tmp_path / "out")
    # Forcing a kind gets past detection, and then the missing keys are named.
    with pytest.raises(CheckpointError, match="lacks 'quantize.embedding.weight'"):
        convert_checkpoint(tmp_path / "r.pth", tmp_path / "out", kind="vqgan")
    with pytest.raises(CheckpointError, match="holds a list"):
        convert_checkpoint(save(tmp_path, "l.pth", [torch.zeros(1)]), tmp_path / "out")


def test_missing_and_extra_keys(tmp_path):
    sd = make_original_checkpoint(OriginalShape.tiny(), "pretrain")["model"]
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.weight"}
    with pytest.raises(CheckpointError, match=r"missing \['mage.encoder.layers.1.attn.qkv.weight'\]"):
        convert_checkpoint(save(tmp_path, "m.pth", {"model": missing}), tmp_path / "out", num_attention_heads=2, decoder_num_attention_heads=4)
    extra = dict(sd, **{"blocks.0.attn.q_norm.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match="unexpected"):
        convert_checkpoint(save(tmp_path, "e.pth", {"model": extra}), tmp_path / "out", num_attention_heads=2, decoder_num_attention_heads=4)
    stray = dict(sd, **{"teacher.proj.weight": torch.ones(4, 4)})
    with pytest.raises(CheckpointError, match=r"have no place in the MAGE port: \['teacher.proj.weight'\]"):
        convert_checkpoint(save(tmp_path, "s.pth", {"model": stray}), tmp_path / "out", num_attention_heads=2, decoder_num_attention_heads=4)
    reshaped = dict(sd, **{"decoder_embed.bias": torch.zeros(47)})
    with pytest.raises(CheckpointError, match="'decoder.embed.bias' has shape"):
        convert_checkpoint(save(tmp_path, "x.pth", {"model": reshaped}), tmp_path / "out", num_attention_heads=2, decoder_num_attention_heads=4)
    assert not (tmp_path / "out").exists()


class Payload:
    """An object whose unpickling would run code, as a malicious checkpoint's would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_arbitrary_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    sd = make_original_checkpoint(OriginalShape.tiny(), "pretrain")["model"]
    path = save(tmp_path, "evil.pth", {"model": sd, "payload": Payload(str(marker))})
    assert not marker.exists()  # saving does not run the payload; only unpickling it would
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors"):
        convert_checkpoint(path, tmp_path / "out", num_attention_heads=2, decoder_num_attention_heads=4)
    assert not marker.exists()


def test_checkpoint_saved_by_the_original_training_code(tmp_path):
    """`util/misc.py save_model` also stores optimizer state, the epoch, the loss scaler and an argparse.Namespace."""
    import argparse

    sd = make_original_checkpoint(OriginalShape.tiny(), "pretrain")["model"]
    args = argparse.Namespace(model="mage_vit_base_patch16", blr=1.5e-4, mask_ratio_min=0.5, output_dir="out", resume="")
    state = {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}, "epoch": 1599,
             "scaler": {"scale": 65536.0, "growth_factor": 2.0}, "args": args}
    report = convert_checkpoint(save(tmp_path, "checkpoint-1599.pth", state), tmp_path / "out", num_attention_heads=2,
                                decoder_num_attention_heads=4)
    assert report.kind == "pretrain" and report.max_abs_diff == 0.0


def test_kind_override_must_fit(tmp_path):
    path = save(tmp_path, "vq.ckpt", make_original_checkpoint(OriginalShape.tiny(), "vqgan"))
    with pytest.raises(CheckpointError, match="--kind pretrain was given"):
        convert_checkpoint(path, tmp_path / "out", kind="pretrain")
    # Options that only MAGE checkpoints take are refused rather than ignored.
    for extra in ({"vqgan": path}, {"num_attention_heads": 2}):
        with pytest.raises(CheckpointError, match="is a VQGAN checkpoint: --vqgan, --num-heads"):
            convert_checkpoint(path, tmp_path / "out", **extra)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "x.pth"
    path.write_bytes(b"\x00" * 10)
    assert main(["convert", "--checkpoint", str(path), "--output", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


def test_console_script(tmp_path):
    """The installed `mage-hf` entry point converts the golden checkpoint (same command as the README)."""
    golden = require_golden()
    exe = os.path.join(os.path.dirname(sys.executable), "mage-hf")
    result = subprocess.run(
        [exe, "convert", "--checkpoint", str(golden / "mage_pretrain.pth"), "--output", str(tmp_path / "o"), *TINY_HEADS],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Converted a pretrain checkpoint" in result.stdout
    assert "decoder_pred.weight" in result.stdout


# ---------------------------------------------------------------------------------------------- real sizes


@pytest.mark.slow
@pytest.mark.parametrize("preset,params", [("vit_base", 201e6), ("vit_large", 500e6)])
def test_real_sizes_convert_in_under_a_minute(tmp_path, preset, params):
    """ViT-B and ViT-L shapes, randomly initialised in the original layout, with the released head counts."""
    shape = getattr(OriginalShape, preset)()
    path = save(tmp_path, "ckpt.pth", make_original_checkpoint(shape, "pretrain"))
    start = time.perf_counter()
    report = convert_checkpoint(path, tmp_path / "out")  # heads come from the released shapes
    seconds = time.perf_counter() - start
    source = torch.load(path, weights_only=True)["model"]
    total = sum(v.numel() for k, v in source.items() if k not in report.unused)
    print(f"{preset}: {total / 1e6:.1f}M parameters converted in {seconds:.1f} s")
    assert abs(total - params) / params < 0.08
    assert seconds < 60
    model = MageForMaskedImageModeling.from_pretrained(tmp_path / "out")
    assert model.config.num_attention_heads == shape.num_heads
    assert sum(p.numel() for p in model.parameters()) == total
    assert report.max_abs_diff == 0.0
