"""An independent, functional re-implementation of the ORIGINAL MAGE forward passes.

It is written from the LTH14/mage code (``models_mage.py``, ``models_vit_mage.py``,
``taming/modules/diffusionmodules/model.py``, ``taming/modules/vqvae/quantize.py``)
and works directly on state dicts in the original key layout, so the project's tests
can check a converted model against "what the original would compute" for any shape,
not only for the golden tiny checkpoint. It also builds random checkpoints in the
original layout (``make_original_checkpoint``).

Everything is float32, eval mode (dropout is the identity) and uses only
``torch.nn.functional``. ``tests/test_original_reference.py`` proves that these
functions reproduce the golden data that the original code produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_CLASS_SLOTS = 1000  # vocabulary = codebook + 1000 class slots + 1 mask token
TOKEN_POSITIONS = 257  # BertEmbeddings' max_position_embeddings, hard-coded 256 + 1
FINETUNE_POS_EMBED = 197  # timm ViT's unused pos_embed at its default img_size 224
PATCH = 16  # the (unused) patch embedding of both models


@dataclass(frozen=True)
class OriginalShape:
    """Hyper-parameters of an original MAGE model and its VQGAN tokenizer."""

    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    vq_ch: int
    vq_ch_mult: tuple
    vq_num_res_blocks: int
    codebook_size: int
    codebook_dim: int  # = z_channels = embed_dim of the VQGAN
    mlp_ratio: int = 4
    num_classes: int = 10
    image_size: int = 256

    @classmethod
    def tiny(cls) -> "OriginalShape":
        """The golden ``mage-tiny`` model (``shared/golden/mage-tiny/config.json``)."""
        return cls(64, 2, 2, 48, 2, 4, vq_ch=32, vq_ch_mult=(1, 1, 1, 2, 2),
                   vq_num_res_blocks=1, codebook_size=64, codebook_dim=32, num_classes=10)

    @classmethod
    def vit_base(cls) -> "OriginalShape":
        """``mage_vit_base_patch16`` with the MaskGIT VQGAN."""
        return cls(768, 12, 12, 768, 8, 16, vq_ch=128, vq_ch_mult=(1, 1, 2, 2, 4),
                   vq_num_res_blocks=2, codebook_size=1024, codebook_dim=256, num_classes=1000)

    @classmethod
    def vit_large(cls) -> "OriginalShape":
        """``mage_vit_large_patch16`` with the MaskGIT VQGAN."""
        return cls(1024, 24, 16, 1024, 8, 16, vq_ch=128, vq_ch_mult=(1, 1, 2, 2, 4),
                   vq_num_res_blocks=2, codebook_size=1024, codebook_dim=256, num_classes=1000)

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + NUM_CLASS_SLOTS + 1

    @property
    def fake_class_label(self) -> int:
        return self.codebook_size + 1100 - 1024

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** (len(self.vq_ch_mult) - 1)

    @property
    def num_patches(self) -> int:
        return (self.image_size // PATCH) ** 2


# --------------------------------------------------------------------------------------
# Random checkpoints in the original layout
# --------------------------------------------------------------------------------------
# A spec is a list of (key, shape, kind); kind decides how the values are drawn.

def _conv(name, cout, cin, k, bias):
    spec = [(f"{name}.weight", (cout, cin, k, k), "conv")]
    return spec + [(f"{name}.bias", (cout,), "bias")] if bias else spec


def _norm(name, c):
    return [(f"{name}.weight", (c,), "norm_weight"), (f"{name}.bias", (c,), "bias")]


def _linear(name, cout, cin):
    return [(f"{name}.weight", (cout, cin), "linear"), (f"{name}.bias", (cout,), "bias")]


def _resblock_spec(name, cin, cout):
    spec = _norm(f"{name}.norm1", cin) + _conv(f"{name}.conv1", cout, cin, 3, False)
    spec += _norm(f"{name}.norm2", cout) + _conv(f"{name}.conv2", cout, cout, 3, False)
    if cin != cout:  # the shortcut maps the block's output h (out -> out channels)
        spec += _conv(f"{name}.nin_shortcut", cout, cout, 1, False)
    return spec


def _vqgan_spec(s: OriginalShape):
    ch, mult, nrb, zc = s.vq_ch, s.vq_ch_mult, s.vq_num_res_blocks, s.codebook_dim
    spec = _conv("encoder.conv_in", ch, 3, 3, False)
    c = ch
    for i, m in enumerate(mult):  # down-sampling is avg-pool: no parameters
        for j in range(nrb):
            spec += _resblock_spec(f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
    spec += _resblock_spec("encoder.mid.block_1", c, c) + _resblock_spec("encoder.mid.block_2", c, c)
    spec += _norm("encoder.norm_out", c) + _conv("encoder.conv_out", zc, c, 1, True)
    c = ch * mult[-1]
    spec += _conv("decoder.conv_in", c, zc, 3, True)
    spec += _resblock_spec("decoder.mid.block_1", c, c) + _resblock_spec("decoder.mid.block_2", c, c)
    levels = {}
    for i in reversed(range(len(mult))):  # channels flow top-down, keys are stored by level
        levels[i] = []
        for j in range(nrb):
            levels[i] += _resblock_spec(f"decoder.up.{i}.block.{j}", c, ch * mult[i])
            c = ch * mult[i]
        if i != 0:
            levels[i] += _conv(f"decoder.up.{i}.upsample.conv", c, c, 3, True)
    for i in range(len(mult)):
        spec += levels[i]
    spec += _norm("decoder.norm_out", c) + _conv("decoder.conv_out", 3, c, 3, True)
    return spec + [("quantize.embedding.weight", (s.codebook_size, zc), "codebook")]


def _block_spec(name, d, mlp_ratio):
    h = int(d * mlp_ratio)
    return (_norm(f"{name}.norm1", d) + _linear(f"{name}.attn.qkv", 3 * d, d)
            + _linear(f"{name}.attn.proj", d, d) + _norm(f"{name}.norm2", d)
            + _linear(f"{name}.mlp.fc1", h, d) + _linear(f"{name}.mlp.fc2", d, h))


def _token_emb_spec(s: OriginalShape):
    return [("token_emb.position_ids", (1, TOKEN_POSITIONS), "position_ids"),
            ("token_emb.word_embeddings.weight", (s.vocab_size, s.embed_dim), "embedding"),
            ("token_emb.position_embeddings.weight", (TOKEN_POSITIONS, s.embed_dim), "embedding"),
            *_norm("token_emb.LayerNorm", s.embed_dim)]


def _transformer_spec(s: OriginalShape, kind: str):
    """Everything but ``vqgan.*``, in state-dict order; the ``"vqgan"`` entry marks where it goes."""
    d, dd = s.embed_dim, s.decoder_embed_dim
    blocks = [x for i in range(s.depth) for x in _block_spec(f"blocks.{i}", d, s.mlp_ratio)]
    patch = _conv("patch_embed.proj", d, 3, PATCH, True)
    if kind == "finetune":
        return ([("cls_token", (1, 1, d), "embedding"),
                 ("pos_embed", (1, FINETUNE_POS_EMBED, d), "embedding")]
                + patch + blocks + _norm("fc_norm", d) + _linear("head", s.num_classes, d)
                + ["vqgan"] + _token_emb_spec(s))
    n = s.num_patches + 1
    return ([("cls_token", (1, 1, d), "embedding"), ("pos_embed", (1, n, d), "embedding"),
             ("mask_token", (1, 1, dd), "embedding"), ("decoder_pos_embed", (1, n, dd), "embedding"),
             ("decoder_pos_embed_learned", (1, n, dd), "embedding"), "vqgan"]
            + _token_emb_spec(s) + patch + blocks + _norm("norm", d) + _linear("decoder_embed", dd, d)
            + [x for i in range(s.decoder_depth)
               for x in _block_spec(f"decoder_blocks.{i}", dd, s.mlp_ratio)]
            + _norm("decoder_norm", dd) + _linear("decoder_pred", PATCH * PATCH * 3, dd)
            + [("mlm_layer.bias", (1, 1, s.vocab_size), "bias")]
            + _linear("mlm_layer.fc", d, dd) + _norm("mlm_layer.ln", d))


def _draw(spec, g: torch.Generator) -> dict:
    """Draw every tensor of a spec with ``randn`` and scale it in place (fast for ViT-L)."""
    out = {}
    for name, shape, kind in spec:
        if kind == "position_ids":
            out[name] = torch.arange(shape[1], dtype=torch.int64).unsqueeze(0)
            continue
        t = torch.randn(shape, generator=g)
        if kind == "norm_weight":
            t.mul_(0.05).add_(1.0)
        elif kind == "linear":  # Xavier-normal: ~0.02 at ViT widths, larger for tiny models
            t.mul_(math.sqrt(2.0 / (shape[0] + shape[1])))
        elif kind == "conv":  # keeps the activations O(1) after GroupNorm + swish
            t.mul_(1.0 / math.sqrt(shape[1] * shape[2] * shape[3]))
        elif kind == "codebook":  # the scale of the encoder's 1x1 conv_out outputs
            t.mul_(0.5)
        else:  # "bias", "embedding"
            t.mul_(0.02)
        out[name] = t
    return out


def make_original_checkpoint(shape: OriginalShape, kind: str, seed: int = 0) -> dict:
    """Random weights in exactly the layout of a released (torch.save'd) original file.

    kind: ``"pretrain"`` -> ``{"model": sd}`` (MaskedGenerativeEncoderViT, VQGAN under
    ``vqgan.*``), ``"finetune"`` -> ``{"model": sd}`` (VisionTransformerMage with
    global_pool=True), ``"vqgan"`` -> ``{"state_dict": sd}``. For one seed, the VQGAN
    weights are the same in all three kinds.
    """
    if kind not in ("pretrain", "finetune", "vqgan"):
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    vq = _draw(_vqgan_spec(shape), torch.Generator().manual_seed(seed))
    if kind == "vqgan":
        return {"state_dict": vq}
    spec = _transformer_spec(shape, kind)
    drawn = _draw([x for x in spec if x != "vqgan"], torch.Generator().manual_seed(seed + 1))
    sd = {}
    for entry in spec:
        if entry == "vqgan":
            sd.update({f"vqgan.{k}": v for k, v in vq.items()})
        else:
            sd[entry[0]] = drawn[entry[0]]
    return {"model": sd}


# --------------------------------------------------------------------------------------
# VQGAN (MaskGIT variant): encode, quantize, decode
# --------------------------------------------------------------------------------------

def _swish(x):
    return x * torch.sigmoid(x)


def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv2d(sd, p, x):
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, sd.get(f"{p}.bias"), padding=w.shape[-1] // 2)


def _resblock(sd, p, x, cin, cout):
    h = _conv2d(sd, f"{p}.conv1", _swish(_gn(sd, f"{p}.norm1", x)))
    h = _conv2d(sd, f"{p}.conv2", _swish(_gn(sd, f"{p}.norm2", h)))  # dropout 0
    if cin != cout:  # original quirk: the shortcut is applied to h, not to x
        x = _conv2d(sd, f"{p}.nin_shortcut", h)
    return x + h


def _vq_encoder(sd, x, s: OriginalShape, p):
    ch, mult = s.vq_ch, s.vq_ch_mult
    h, c = _conv2d(sd, f"{p}encoder.conv_in", x), ch
    for i, m in enumerate(mult):
        for j in range(s.vq_num_res_blocks):
            h, c = _resblock(sd, f"{p}encoder.down.{i}.block.{j}", h, c, ch * m), ch * m
        if i != len(mult) - 1:
            h = F.avg_pool2d(h, kernel_size=2, stride=2)
    h = _resblock(sd, f"{p}encoder.mid.block_1", h, c, c)
    h = _resblock(sd, f"{p}encoder.mid.block_2", h, c, c)
    return _conv2d(sd, f"{p}encoder.conv_out", _swish(_gn(sd, f"{p}encoder.norm_out", h)))


def vq_encode(sd, images, shape: OriginalShape, prefix="vqgan."):
    """Images in [0, 1] (B, 3, H, W) -> (ids (B, h*w) int64 row-major, quantized (B, C, h, w))."""
    z = _vq_encoder(sd, images.float(), shape, prefix).permute(0, 2, 3, 1).contiguous()
    b, h, w, c = z.shape
    zf = z.reshape(-1, c)
    e = sd[f"{prefix}quantize.embedding.weight"]
    dist = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * (zf @ e.t())
    ids = dist.argmin(dim=1)
    zq = e[ids].view(b, h, w, c)
    zq = z + (zq - z)  # the original's straight-through estimator, same float arithmetic
    return ids.view(b, h * w), zq.permute(0, 3, 1, 2).contiguous()


def vq_lookup(sd, ids, shape: OriginalShape, prefix="vqgan."):
    """Codebook entries of row-major ids (B, h*w) as latents (B, C, h, w)."""
    g = shape.grid_size
    e = sd[f"{prefix}quantize.embedding.weight"][ids.reshape(-1)]
    return e.view(ids.shape[0], g, g, -1).permute(0, 3, 1, 2).contiguous()


def vq_decode(sd, quantized, shape: OriginalShape, prefix="vqgan."):
    """Latents (B, C, h, w) -> images (B, 3, H, W), nominally in [0, 1], not clipped."""
    ch, mult, p = shape.vq_ch, shape.vq_ch_mult, prefix
    c = ch * mult[-1]
    h = _conv2d(sd, f"{p}decoder.conv_in", quantized)
    h = _resblock(sd, f"{p}decoder.mid.block_1", h, c, c)
    h = _resblock(sd, f"{p}decoder.mid.block_2", h, c, c)
    for i in reversed(range(len(mult))):
        for j in range(shape.vq_num_res_blocks):
            h, c = _resblock(sd, f"{p}decoder.up.{i}.block.{j}", h, c, ch * mult[i]), ch * mult[i]
        if i != 0:
            h = _conv2d(sd, f"{p}decoder.up.{i}.upsample.conv",
                        F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv2d(sd, f"{p}decoder.conv_out", _swish(_gn(sd, f"{p}decoder.norm_out", h)))


# --------------------------------------------------------------------------------------
# Transformer (pre-norm ViT blocks, BERT-style token embedding, MLM head)
# --------------------------------------------------------------------------------------

def _ln(sd, p, x, eps=1e-6):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], eps)


def _lin(sd, p, x):
    return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"])


def _block(sd, p, x, num_heads):
    b, n, c = x.shape
    qkv = _lin(sd, f"{p}.attn.qkv", _ln(sd, f"{p}.norm1", x))
    q, k, v = qkv.reshape(b, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4)
    attn = ((q.float() @ k.float().transpose(-2, -1)) * (c // num_heads) ** -0.5).softmax(-1)
    x = x + _lin(sd, f"{p}.attn.proj", (attn @ v).transpose(1, 2).reshape(b, n, c))
    return x + _lin(sd, f"{p}.mlp.fc2", F.gelu(_lin(sd, f"{p}.mlp.fc1", _ln(sd, f"{p}.norm2", x))))


def _token_embed(sd, input_ids):
    pos = sd["token_emb.position_ids"][:, : input_ids.shape[1]]
    x = (F.embedding(input_ids, sd["token_emb.word_embeddings.weight"])
         + F.embedding(pos, sd["token_emb.position_embeddings.weight"]))
    return _ln(sd, "token_emb.LayerNorm", x)


def _encoder(sd, x, shape: OriginalShape):
    for i in range(shape.depth):
        x = _block(sd, f"blocks.{i}", x, shape.num_heads)
    return x


def encoder_hidden_states(sd, input_ids, shape: OriginalShape):
    """Pre-training encoder on a full (B, 1+L) sequence, no dropping -> (B, 1+L, D) after ``norm``."""
    return _ln(sd, "norm", _encoder(sd, _token_embed(sd, input_ids), shape))


def mim_logits(sd, input_ids, drop_mask, mask, shape: OriginalShape):
    """Original forward_encoder (after masking) + forward_decoder.

    input_ids (B, 1+L): fake class label, then token ids with masked ones set to the mask
    id; drop_mask / mask (B, 1+L): 1 = dropped before the encoder / masked (superset).
    Returns (encoder output of the kept positions (B, kept, D), logits (B, 1+L, vocab)).
    """
    x = _token_embed(sd, input_ids)
    b, n, d = x.shape
    keep = drop_mask == 0
    enc = _ln(sd, "norm", _encoder(sd, x[keep].reshape(b, -1, d), shape))

    y = _lin(sd, "decoder_embed", enc)
    pad = y[:, :1].expand(b, n, y.shape[-1])  # pad_with_cls_token=True; mask_token unused
    full = pad.clone()
    full[keep] = y.reshape(-1, y.shape[-1])
    full = torch.where(mask.bool().unsqueeze(-1), pad, full) + sd["decoder_pos_embed_learned"]
    for i in range(shape.decoder_depth):
        full = _block(sd, f"decoder_blocks.{i}", full, shape.decoder_num_heads)
    full = _ln(sd, "decoder_norm", full)

    hidden = _ln(sd, "mlm_layer.ln", F.gelu(_lin(sd, "mlm_layer.fc", full)), eps=1e-5)
    words = sd["token_emb.word_embeddings.weight"].detach()  # tied, detached
    return enc, hidden @ words.t() + sd["mlm_layer.bias"]


def mim_loss(logits, target_ids, mask, codebook_size, smoothing=0.1):
    """Label-smoothed cross-entropy over codebook logits, averaged over masked positions."""
    logp = F.log_softmax(logits[:, 1:, :codebook_size].float(), dim=-1)
    nll = -logp.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    per_token = (1.0 - smoothing) * nll + smoothing * (-logp.mean(dim=-1))
    m = mask[:, 1:].float()
    return (per_token * m).sum() / m.sum()


def finetune_forward(sd, images, shape: OriginalShape):
    """Fine-tuned classifier (global_pool=True) on images in [0, 1] -> (features, logits)."""
    ids, _ = vq_encode(sd, images, shape, prefix="vqgan.")
    cls = torch.full((ids.shape[0], 1), shape.fake_class_label, dtype=torch.int64)
    x = _encoder(sd, _token_embed(sd, torch.cat([cls, ids], dim=1)), shape)
    features = _ln(sd, "fc_norm", x[:, 1:, :].mean(dim=1))  # no final norm in this path
    return features, _lin(sd, "head", features)
