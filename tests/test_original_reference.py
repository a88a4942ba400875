"""Prove that tests/original_reference.py reproduces the original MAGE code.

The golden data in ``../shared/golden/mage-tiny`` was produced by running the original
LTH14/mage implementation; these tests check the functional reference against it, and
check that the random checkpoints it generates have exactly the original layout.
"""

from pathlib import Path

import pytest
import torch

try:  # works whether or not tests/ is a package
    from .original_reference import (OriginalShape, encoder_hidden_states, finetune_forward,
                                     make_original_checkpoint, mim_logits, mim_loss, vq_decode,
                                     vq_encode, vq_lookup)
except ImportError:
    from original_reference import (OriginalShape, encoder_hidden_states, finetune_forward,
                                    make_original_checkpoint, mim_logits, mim_loss, vq_decode,
                                    vq_encode, vq_lookup)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "mage-tiny"
FILES = {"pretrain": ("mage_pretrain.pth", "model"), "finetune": ("mage_finetune.pth", "model"),
         "vqgan": ("vqgan.ckpt", "state_dict")}


def _load(kind):
    name, key = FILES[kind]
    return torch.load(GOLDEN / name, weights_only=True, map_location="cpu")[key]


@pytest.fixture(scope="module")
def golden():
    if not (GOLDEN / "reference.safetensors").is_file():
        pytest.skip(f"golden data from the original MAGE code not found at {GOLDEN}")
    from safetensors.torch import load_file

    return {"ref": load_file(str(GOLDEN / "reference.safetensors")),
            **{kind: _load(kind) for kind in FILES}}


def assert_max_abs(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:g}"


TINY = OriginalShape.tiny()


def test_vq_encode_decode_matches_golden(golden):
    ref, vq = golden["ref"], golden["vqgan"]
    ids, quantized = vq_encode(vq, ref["image"], TINY, prefix="")
    assert ids.dtype == torch.int64
    assert torch.equal(ids, ref["vq_token_ids"])
    assert_max_abs(quantized, ref["vq_quantized"], 1e-4, "vq_quantized")
    assert_max_abs(vq_decode(vq, quantized, TINY, prefix=""), ref["vq_decoded"], 1e-4, "vq_decoded")
    from_ids = vq_decode(vq, vq_lookup(vq, ref["vq_token_ids"], TINY, prefix=""), TINY, prefix="")
    assert_max_abs(from_ids, ref["vq_decoded_from_ids"], 1e-4, "vq_decoded_from_ids")
    gen = vq_decode(vq, vq_lookup(vq, ref["gen_final_ids"], TINY, prefix=""), TINY, prefix="")
    assert_max_abs(gen, ref["gen_images"], 1e-4, "gen_images")
    # the copy of the VQGAN inside the pre-training checkpoint tokenizes identically
    assert torch.equal(vq_encode(golden["pretrain"], ref["image"], TINY)[0], ref["vq_token_ids"])


def test_mim_forward_and_loss_match_golden(golden):
    ref = golden["ref"]
    enc, logits = mim_logits(golden["pretrain"], ref["mim_input_ids"], ref["mim_drop_mask"],
                             ref["mim_mask"], TINY)
    assert_max_abs(enc, ref["mim_encoder_out"], 1e-5, "mim_encoder_out")
    assert_max_abs(logits, ref["mim_logits"], 1e-5, "mim_logits")
    loss = mim_loss(logits, ref["vq_token_ids"], ref["mim_mask"], TINY.codebook_size)
    assert_max_abs(loss.reshape(1), ref["mim_loss"], 1e-5, "mim_loss")


def test_encoder_hidden_states_match_golden(golden):
    ref = golden["ref"]
    ids = ref["vq_token_ids"]
    full = torch.cat([torch.full((ids.shape[0], 1), TINY.fake_class_label), ids], dim=1)
    hidden = encoder_hidden_states(golden["pretrain"], full, TINY)
    assert_max_abs(hidden, ref["encoder_hidden_states_full"], 1e-5, "encoder_hidden_states_full")


def test_finetune_forward_matches_golden(golden):
    ref = golden["ref"]
    features, logits = finetune_forward(golden["finetune"], ref["image"], TINY)
    assert_max_abs(features, ref["finetune_features"], 1e-5, "finetune_features")
    assert_max_abs(logits, ref["finetune_logits"], 1e-5, "finetune_logits")


def test_tiny_shape_matches_golden_config():
    if not (GOLDEN / "config.json").is_file():
        pytest.skip(f"golden data from the original MAGE code not found at {GOLDEN}")
    import json

    cfg = json.loads((GOLDEN / "config.json").read_text())
    t, v, d = cfg["transformer"], cfg["vqgan"], cfg["derived"]
    assert (TINY.embed_dim, TINY.depth, TINY.num_heads) == (t["embed_dim"], t["depth"], t["num_heads"])
    assert (TINY.decoder_embed_dim, TINY.decoder_depth, TINY.decoder_num_heads, TINY.mlp_ratio) == (
        t["decoder_embed_dim"], t["decoder_depth"], t["decoder_num_heads"], t["mlp_ratio"])
    assert (TINY.vq_ch, list(TINY.vq_ch_mult), TINY.vq_num_res_blocks) == (
        v["ch"], v["ch_mult"], v["num_res_blocks"])
    assert (TINY.codebook_size, TINY.codebook_dim, TINY.num_classes) == (
        v["n_embed"], v["embed_dim"], cfg["num_classes"])
    assert (TINY.vocab_size, TINY.fake_class_label, TINY.mask_token_id) == (
        d["vocab_size"], d["fake_class_label"], d["mask_token_label"])


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "vqgan"])
def test_random_checkpoint_has_golden_layout(golden, kind):
    ckpt = make_original_checkpoint(TINY, kind, seed=3)
    assert list(ckpt) == [FILES[kind][1]]
    sd, gold = ckpt[FILES[kind][1]], golden[kind]
    assert list(sd) == list(gold)  # same keys, in the same (state-dict) order
    for name, tensor in gold.items():
        assert (sd[name].shape, sd[name].dtype) == (tensor.shape, tensor.dtype), name
    if kind != "vqgan":
        assert torch.equal(sd["token_emb.position_ids"], gold["token_emb.position_ids"])


def test_random_checkpoints_are_seeded_and_share_the_vqgan():
    a = make_original_checkpoint(TINY, "pretrain", seed=5)["model"]
    b = make_original_checkpoint(TINY, "pretrain", seed=5)["model"]
    c = make_original_checkpoint(TINY, "pretrain", seed=6)["model"]
    vq = make_original_checkpoint(TINY, "vqgan", seed=5)["state_dict"]
    ft = make_original_checkpoint(TINY, "finetune", seed=5)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    for k, v in vq.items():
        assert torch.equal(a[f"vqgan.{k}"], v) and torch.equal(ft[f"vqgan.{k}"], v)


def test_random_tiny_checkpoint_runs_everywhere():
    """Every forward runs on random weights and stays finite (the golden run is separate)."""
    gen = torch.Generator().manual_seed(0)
    pre = make_original_checkpoint(TINY, "pretrain", seed=1)["model"]
    ft = make_original_checkpoint(TINY, "finetune", seed=1)["model"]
    image = torch.rand(2, 3, 256, 256, generator=gen)
    ids, _ = vq_encode(pre, image, TINY)
    seq = torch.cat([torch.full((2, 1), TINY.fake_class_label), ids], dim=1)
    noise = torch.rand(2, 256, generator=gen)
    order = noise.argsort(dim=1)
    drop = torch.zeros(2, 257)
    mask = torch.zeros(2, 257)
    drop.scatter_(1, order[:, :128] + 1, 1.0)
    mask.scatter_(1, order[:, :180] + 1, 1.0)
    masked = torch.where(mask.bool(), torch.tensor(TINY.mask_token_id), seq)
    enc, logits = mim_logits(pre, masked, drop, mask, TINY)
    assert enc.shape == (2, 129, TINY.embed_dim) and logits.shape == (2, 257, TINY.vocab_size)
    loss = mim_loss(logits, ids, mask, TINY.codebook_size)
    assert torch.isfinite(loss) and 0 < loss.item() < 20
    assert torch.isfinite(encoder_hidden_states(pre, seq, TINY)).all()
    features, head = finetune_forward(ft, image, TINY)
    assert features.shape == (2, TINY.embed_dim) and head.shape == (2, TINY.num_classes)
    assert torch.isfinite(head).all()


def test_random_vit_base_vqgan_is_non_degenerate():
    shape = OriginalShape.vit_base()
    vq = make_original_checkpoint(shape, "vqgan", seed=0)["state_dict"]
    assert vq["quantize.embedding.weight"].shape == (1024, 256)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    ids, quantized = vq_encode(vq, image, shape, prefix="")
    assert ids.shape == (1, 256) and quantized.shape == (1, 256, 16, 16)
    assert ids.unique().numel() > 10, "random VQGAN maps the image to too few codebook ids"
    decoded = vq_decode(vq, quantized, shape, prefix="")
    assert decoded.shape == (1, 3, 256, 256)
    assert torch.isfinite(decoded).all() and decoded.abs().max() < 100
