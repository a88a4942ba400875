"""Parity with the original MAGE implementation on ../shared/golden/mage-tiny, converted by `mage-hf convert`.

Tolerances are the issue's: identical token ids, 1e-4 on decoded images, 1e-5 on logits, features and the loss.
"""

from __future__ import annotations

import pytest
import torch

from mage_hf import MageForImageClassification, MageForMaskedImageModeling, MageModel, MageVQModel, cpu_kernels

# "sdpa" on the CPU runs the native attention kernel of `cpu_kernels`; "sdpa-torch" is the same implementation with
# those kernels off, so that torch's own SDPA is checked against the golden data too.
ATTENTION = ["sdpa", "eager", "sdpa-torch"]


def impl(attn: str) -> str:
    return "sdpa" if attn == "sdpa-torch" else attn


@pytest.fixture(autouse=True)
def _kernels(request):
    callspec = getattr(request.node, "callspec", None)
    with cpu_kernels.use_packed_kernels(callspec is None or callspec.params.get("attn") != "sdpa-torch"):
        yield


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("source", ["vqgan", "pretrain"])
def test_vq_tokens_and_decode(converted, golden_reference, source):
    ref = golden_reference
    if source == "vqgan":
        vq = MageVQModel.from_pretrained(converted["vqgan"]).eval()
    else:  # the copy of the tokenizer stored inside the MAGE folder
        vq = MageModel.from_pretrained(converted["pretrain"]).vq_model.eval()
    with torch.no_grad():
        encoded = vq.encode(ref["image"])
        assert torch.equal(encoded.token_ids.flatten(1), ref["vq_token_ids"])
        assert max_err(encoded.quantized, ref["vq_quantized"]) < 1e-5
        assert max_err(vq.decode_latents(ref["vq_quantized"]), ref["vq_decoded"]) < 1e-4
        assert max_err(vq.decode(ref["vq_token_ids"].view(2, 16, 16)), ref["vq_decoded_from_ids"]) < 1e-4
        assert max_err(vq.decode(ref["gen_final_ids"].view(2, 16, 16)), ref["gen_images"]) < 1e-4


@pytest.mark.parametrize("attn", ATTENTION)
def test_masked_token_logits_and_loss(converted, golden_reference, attn):
    ref = golden_reference
    model = MageForMaskedImageModeling.from_pretrained(converted["pretrain"], attn_implementation=impl(attn)).eval()
    assert model.config._attn_implementation == impl(attn)
    K = model.config.codebook_size
    with torch.no_grad():
        out = model(
            input_ids=ref["mim_input_ids"][:, 1:],
            token_mask=ref["mim_mask"][:, 1:].bool(),
            token_drop_mask=ref["mim_drop_mask"][:, 1:].bool(),
            labels=ref["vq_token_ids"],
        )
    assert out.encoder_last_hidden_state.shape == ref["mim_encoder_out"].shape
    assert max_err(out.encoder_last_hidden_state, ref["mim_encoder_out"]) < 1e-5
    assert max_err(out.logits, ref["mim_logits"][:, 1:, :K]) < 1e-5
    assert max_err(out.loss.reshape(1), ref["mim_loss"]) < 1e-5


@pytest.mark.parametrize("attn", ATTENTION)
def test_masked_token_loss_from_pixels(converted, golden_reference, attn):
    """The training path: images in, tokenized inside, the recorded mask pattern, the recorded loss out."""
    ref = golden_reference
    model = MageForMaskedImageModeling.from_pretrained(converted["pretrain"], attn_implementation=impl(attn)).eval()
    with torch.no_grad():
        out = model(
            pixel_values=ref["image"],
            token_mask=ref["mim_mask"][:, 1:].bool(),
            token_drop_mask=ref["mim_drop_mask"][:, 1:].bool(),
        )
    assert torch.equal(out.labels, ref["vq_token_ids"])
    assert max_err(out.loss.reshape(1), ref["mim_loss"]) < 1e-5


@pytest.mark.parametrize("attn", ATTENTION)
def test_encoder_hidden_states(converted, golden_reference, attn):
    ref = golden_reference
    model = MageModel.from_pretrained(converted["pretrain"], attn_implementation=impl(attn)).eval()
    with torch.no_grad():
        from_pixels = model(pixel_values=ref["image"]).last_hidden_state
        from_ids = model(input_ids=ref["vq_token_ids"]).last_hidden_state
    assert max_err(from_pixels, ref["encoder_hidden_states_full"]) < 1e-5
    assert max_err(from_ids, ref["encoder_hidden_states_full"]) < 1e-5


@pytest.mark.parametrize("attn", ATTENTION)
def test_finetuned_classifier(converted, golden_reference, attn):
    ref = golden_reference
    model = MageForImageClassification.from_pretrained(converted["finetune"], attn_implementation=impl(attn)).eval()
    with torch.no_grad():
        out = model(pixel_values=ref["image"], output_hidden_states=True)
        pooled = model.mage(pixel_values=ref["image"]).pooler_output
    assert max_err(out.logits, ref["finetune_logits"]) < 1e-5
    assert max_err(pooled, ref["finetune_features"]) < 1e-5
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
