# Copyright 2026 The mage-hf authors. MIT licence.
# MAGE (Li et al., CVPR 2023) and its reference code (LTH14/mage) are MIT licensed.
"""MAGE: a ViT over VQGAN tokens that both generates images (masked token modelling) and learns representations."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils import ModelOutput

from . import cpu_kernels
from .configuration_mage import MageConfig
from .modeling_mage_vq import MageVQCodebook, MageVQModel, init_vq_weights

__all__ = [
    "MageContrastiveHead",
    "MageForImageClassification",
    "MageForMaskedImageModeling",
    "MageMaskedImageModelingOutput",
    "MageModel",
    "MagePreTrainedModel",
    "sample_mask_ratio",
    "random_token_masks",
]


@dataclass
class MageMaskedImageModelingOutput(ModelOutput):
    """
    Output of [`MageForMaskedImageModeling`]. `L` is the number of image tokens (256 for a 16x16 grid).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Label-smoothed cross-entropy over the codebook, averaged over masked positions. Returned when `labels`
            are known (given, or taken from `pixel_values`).
        logits (`torch.FloatTensor` of shape `(batch_size, L, codebook_size)`):
            Scores over the codebook at every image position (the class position and the class/mask ids of the
            vocabulary are left out). With `masked_logits_only=True`, zero at the unmasked positions.
        labels (`torch.LongTensor` of shape `(batch_size, L)`, *optional*):
            The target codebook ids: the tokens of `pixel_values`, or the `labels` passed in.
        token_mask (`torch.BoolTensor` of shape `(batch_size, L)`):
            `True` where the image token was masked (replaced by the mask token).
        token_drop_mask (`torch.BoolTensor` of shape `(batch_size, L)`, *optional*):
            `True` where the token was dropped before the encoder (a subset of `token_mask`).
        mask_ratio (`float`, *optional*):
            The masking ratio drawn for this batch, when the forward pass drew the masks.
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + kept, hidden_size)`):
            Encoder output (after its final norm) for the class position and the kept tokens, in order.
        encoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Encoder embeddings and block outputs, each `(batch_size, 1 + kept, hidden_size)`, with
            `output_hidden_states=True`.
        encoder_attentions (`tuple(torch.FloatTensor)`, *optional*):
            Encoder attention maps, each `(batch_size, num_heads, 1 + kept, 1 + kept)`, with `output_attentions=True`.
        contrastive_embeddings (`torch.FloatTensor` of shape `(batch_size, contrastive_projection_dim)`, *optional*):
            MAGE-C's projection of the mean encoder output over the image positions (unnormalised), when the config
            sets `contrastive_projection_dim`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    labels: torch.LongTensor | None = None
    token_mask: torch.BoolTensor | None = None
    token_drop_mask: torch.BoolTensor | None = None
    mask_ratio: float | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    contrastive_embeddings: torch.FloatTensor | None = None


def rand_on_device(
    shape: tuple[int, ...], generator: torch.Generator | None, device, dtype: torch.dtype
) -> torch.Tensor:
    """`torch.rand` of `dtype` on `device` from `generator`. Apple's MPS has no float64: a float64 draw there is a
    float32 draw, converted on the CPU."""
    if torch.device(device).type == "mps" and dtype == torch.float64:
        return torch.rand(shape, generator=generator, device=device).cpu().double()
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def sample_mask_ratio(config: MageConfig, generator: torch.Generator | None = None) -> float:
    """Draw MAGE's masking ratio from the truncated normal N(mu, std) on [mask_ratio_min, mask_ratio_max], by
    inverting the normal CDF on a uniform draw from `generator`."""
    mu, std = config.mask_ratio_mu, config.mask_ratio_std
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    low = normal.cdf(torch.tensor((config.mask_ratio_min - mu) / std, dtype=torch.float64))
    high = normal.cdf(torch.tensor((config.mask_ratio_max - mu) / std, dtype=torch.float64))
    u = rand_on_device((), generator, generator.device if generator is not None else "cpu", torch.float64).cpu()
    ratio = mu + std * normal.icdf(low + u * (high - low))
    return float(ratio.clamp(config.mask_ratio_min, config.mask_ratio_max))


def random_token_masks(
    noise: torch.Tensor, num_masked: int, num_dropped: int = 0
) -> tuple[torch.BoolTensor, torch.BoolTensor]:
    """MAGE's masks from per-token noise `(B, L)`: the `num_masked` lowest-noise tokens of each row are masked, and
    the `num_dropped` lowest of those are also dropped. Ranks (not a threshold) decide, so ties cannot change the
    counts. Returns `(token_mask, token_drop_mask)`, both `(B, L)` bool."""
    if not 0 <= num_dropped <= num_masked <= noise.shape[1]:
        raise ValueError(f"Need 0 <= num_dropped ({num_dropped}) <= num_masked ({num_masked}) <= {noise.shape[1]}.")
    ranks = noise.argsort(dim=1).argsort(dim=1)  # (B, L): 0 for the lowest noise
    return ranks < num_masked, ranks < num_dropped


class MageEmbeddings(nn.Module):
    """Token embedding (BERT style): word + learned position embedding -> LayerNorm -> dropout."""

    def __init__(self, config: MageConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = config.hidden_dropout_prob

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        positions = self.position_embeddings.weight[: input_ids.shape[1]]  # (1+L, D)
        embeddings = self.layer_norm(self.word_embeddings(input_ids) + positions)  # (B, 1+L, D)
        # In place into the fresh LayerNorm output, unless a hook holds it.
        inplace = cpu_kernels.outputs_private(self.layer_norm)
        return cpu_kernels.dropout(embeddings, self.dropout, self.training, inplace=inplace)


class MageAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection. The scores are computed in float32, as in the
    original (which disables autocast for them). The "sdpa" implementation (the default) runs SDPA, or, for float32
    CPU tensors, `cpu_kernels.attention` (the same computation in one native kernel); "eager", or asking for the
    attention maps, runs the explicit ops."""

    def __init__(self, config: MageConfig, hidden_size: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = config.attention_probs_dropout_prob
        self.proj_dropout = config.hidden_dropout_prob

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False, rows: torch.BoolTensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`rows` `(B, N)`: return only those positions' outputs, flattened to `(M, D)` (every position is still
        attended to)."""
        batch_size, seq_len, width = x.shape
        # cpu_kernels: exact packed-weight matmuls for CPU inference, the plain module call otherwise.
        qkv = cpu_kernels.linear(self.qkv, x)  # (B, N, 3D)
        dropout = self.attn_dropout if self.training else 0.0
        weights = None
        sdpa = self.config._attn_implementation == "sdpa" and not output_attentions
        # float32 on the CPU: one native kernel from qkv to the heads' outputs, each head's scores kept in cache
        # (None where it does not apply: other devices and dtypes, no compiler, kernels switched off).
        out = cpu_kernels.attention(qkv, self.num_heads, self.scale, dropout) if sdpa else None  # (B, N, D)
        if out is None:
            qkv = qkv.reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, d)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
            # With dropout on the CPU, SDPA falls back to its unfused math path; the explicit one below is the same
            # computation with the cheaper dropout mask of `cpu_kernels.dropout`.
            cpu_dropout = dropout > 0 and q.device.type == "cpu" and cpu_kernels.is_enabled()
            if sdpa and not cpu_dropout:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
            else:
                # Scaling q (N x d) rather than the scores (N x N) is the same product, at a quarter of the cost.
                # Autocast would run the product in half precision again; the original disables it here too.
                with torch.autocast(q.device.type, enabled=False):
                    scores = (q.float() * self.scale) @ k.float().transpose(-2, -1)  # (B, H, N, N) in float32
                    weights = scores.softmax(dim=-1)
                out = cpu_kernels.dropout(weights, dropout, self.training).to(v.dtype) @ v
            out = out.transpose(1, 2).reshape(batch_size, seq_len, width)  # (B, N, D)
        if rows is not None:
            out = out[rows]  # (M, D): the output projection only where it is needed
        # M changes from call to call, so that projection takes the plain op (see `cpu_kernels.packed_linear`).
        proj = cpu_kernels.linear(self.proj, out, pack=rows is None)
        inplace = cpu_kernels.outputs_private(self.proj)
        return cpu_kernels.dropout(proj, self.proj_dropout, self.training, inplace=inplace), weights


class MageMLP(nn.Module):
    def __init__(self, config: MageConfig, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = config.hidden_dropout_prob
        self.exact_gelu = config.hidden_act == "gelu"

    def forward(self, x: torch.Tensor, pack: bool = True) -> torch.Tensor:
        """`x` `(B, N, D)` or `(M, D)`; `pack`: see `cpu_kernels.packed_linear`."""
        hidden = cpu_kernels.linear(self.fc1, x, pack)  # (B, N, I)
        if self.exact_gelu:
            # fc1's output is fresh (unless a hook holds it): GELU may run in place in inference, and fuses with
            # dropout in CPU training.
            inplace = cpu_kernels.outputs_private(self.fc1)
            hidden = cpu_kernels.gelu_dropout(hidden, self.dropout, self.training, inplace=inplace)
        else:
            hidden = cpu_kernels.dropout(self.act(hidden), self.dropout, self.training)
        out = cpu_kernels.linear(self.fc2, hidden, pack)
        return cpu_kernels.dropout(out, self.dropout, self.training, inplace=cpu_kernels.outputs_private(self.fc2))


def random_weights(loading_info: dict) -> list[str]:
    """The weights that `from_pretrained(..., output_loading_info=True)` could not load (missing from the files, or of
    another shape), sorted. transformers fills them with random values and only logs it, so a folder of another kind
    (an encoder loaded as a generator, a pre-training folder as a classifier) would run with a random head."""
    missing = sorted(str(key) for key in loading_info.get("missing_keys") or [])
    return missing + sorted(str(key) for key in loading_info.get("mismatched_keys") or [])


def _check_extra_kwargs(kwargs: dict, ignored: tuple[str, ...], model: str) -> None:
    """A mistyped or unsupported argument must not be dropped silently; only `ignored` ones (what generic callers pass
    to every MAGE model) are."""
    unknown = sorted(set(kwargs) - set(ignored))
    if unknown:
        raise TypeError(f"{model}.forward() got unexpected keyword argument(s) {unknown}.")


def _records_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _residual(x: torch.Tensor, branch: torch.Tensor, *producers: nn.Module) -> torch.Tensor:
    """`x + branch`. Without autograd the sum is written into `branch` (a fresh output of `producers`): on the CPU a
    new activation per add costs more than the add itself (fresh memory), and `branch + x` is bitwise `x + branch`.
    Not when that would change the result's dtype (a bfloat16 branch under autocast, which the sum promotes), nor
    when a forward hook on a producer may hold `branch`."""
    if (
        _records_grad(x)
        or _records_grad(branch)
        or branch.dtype != torch.result_type(x, branch)
        or not cpu_kernels.outputs_private(*producers)
    ):
        return x + branch
    return branch.add_(x)


class MageLayer(GradientCheckpointingLayer):
    """Pre-norm ViT block, used by both the encoder and the decoder."""

    def __init__(self, config: MageConfig, hidden_size: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attn = MageAttention(config, hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = MageMLP(config, hidden_size, intermediate_size)

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False, rows: torch.BoolTensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`rows` `(B, N)`: compute the block's output only at those positions, returned flattened to `(M, D)`;
        attention still reads every position, so they are exact."""
        attn_out, weights = self.attn(self.norm1(x), output_attentions=output_attentions, rows=rows)
        if rows is not None:
            x = x[rows]  # (M, D)
        # attn_out is the attention's output and, without dropout, its projection's; likewise for the MLP.
        x = _residual(x, attn_out, self.attn, self.attn.proj)
        return _residual(x, self.mlp(self.norm2(x), pack=rows is None), self.mlp, self.mlp.fc2), weights


class MageTransformer(nn.Module):
    """A stack of [`MageLayer`]s that can collect hidden states and attention maps."""

    def __init__(self, config: MageConfig, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int):
        super().__init__()
        self.layers = nn.ModuleList(
            MageLayer(config, hidden_size, num_heads, intermediate_size) for _ in range(num_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_rows: torch.BoolTensor | None = None,
    ):
        """`x` `(B, N, D)`. `output_rows` `(B, N)`: the positions whose output is needed; the last block then computes
        only those and the output is `(M, D)`, their rows in order (the earlier blocks need every position)."""
        hidden_states = (x,) if output_hidden_states else None
        attentions = () if output_attentions else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            rows = output_rows if i == last else None
            x, weights = layer(x, output_attentions=output_attentions, rows=rows)
            if output_hidden_states:
                hidden_states += (x,)
            if output_attentions:
                attentions += (weights,)
        return x, hidden_states, attentions


class MagePooler(nn.Module):
    """`use_mean_pooling`: LayerNorm (the checkpoints' `fc_norm`) of the mean over image positions. Otherwise: the
    class position of the (normed) last hidden state."""

    def __init__(self, config: MageConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.use_mean_pooling else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.layernorm is not None:
            return self.layernorm(hidden_states[:, 1:].mean(dim=1))
        return hidden_states[:, 0]


class MagePreTrainedModel(PreTrainedModel):
    config: MageConfig
    config_class = MageConfig
    base_model_prefix = "mage"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MageLayer", "MageVQResnetBlock"]
    # The tokenizer stays in float32 when the model is loaded in float16 or bfloat16 (`from_pretrained(dtype=...)`):
    # its decoder's activations overflow float16, its nearest-code search needs the precision, and a codebook rounded
    # at load time could not be restored by upcasting later.
    _keep_in_fp32_modules_strict = ["vq_model"]
    _supports_sdpa = True
    # A pre-training folder loads into the encoder or a classifier too; its decoder and MLM head are then unused.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^mlm_head\."]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the transformer (the tokenizer's parameters stay in float32 when the model is loaded in half
        precision, and it is registered first)."""
        for name, param in self.named_parameters():
            if param.is_floating_point() and "vq_model." not in name:
                return param.dtype
        return super().dtype

    def freeze_tokenizer(self) -> None:
        """Stop gradients to the VQGAN tokenizer, which MAGE keeps frozen."""
        for module in self.modules():
            if isinstance(module, MageVQModel):
                module.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        # `output_loading_info=True` returns (model, info).
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_tokenizer()  # loading installs new parameters, which resets their requires_grad flag
        return loaded

    @torch.no_grad()
    def _init_weights(self, module):
        # As the original: xavier-uniform linears with zero bias, N(0, 0.02) embeddings, unit norms.
        if isinstance(module, (nn.Conv2d, nn.GroupNorm, MageVQCodebook)):
            init_vq_weights(module)  # the tokenizer's own scheme
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MageDecoder):
            init.normal_(module.position_embeddings, std=self.config.initializer_range)
        elif isinstance(module, MageMLMHead):
            init.zeros_(module.bias)


class MageModel(MagePreTrainedModel):
    """The MAGE encoder, with its tokenizer. It takes images or token ids and returns one vector per position: the
    class position first, then the image tokens (or the kept ones, when `token_drop_mask` drops some)."""

    def __init__(self, config: MageConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.vq_model = MageVQModel(config.vq_config)
        self.embeddings = MageEmbeddings(config)
        self.encoder = MageTransformer(
            config, config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
        )
        # With mean pooling (MAGE's `global_pool`) the final norm is replaced by the pooler's norm.
        self.layernorm = (
            nn.Identity() if config.use_mean_pooling else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        )
        self.pooler = MagePooler(config) if add_pooling_layer else None
        self.post_init()
        self.freeze_tokenizer()  # the tokenizer is frozen, as in MAGE

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    @torch.no_grad()
    def tokenize(self, pixel_values: torch.Tensor, channels_last: bool = False) -> torch.LongTensor:
        """Images in [0, 1] `(B, 3, H, W)` -> codebook ids `(B, L)`, row-major. `channels_last`: see
        [`MageVQModel.encode`]."""
        # The tokenizer takes any multiple of its down-sampling factor, but the transformer's learned position table
        # has one row per token of the training resolution: a smaller grid would be paired with the wrong rows.
        side = self.config.vq_config.resolution
        is_batch = isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 4
        if is_batch and pixel_values.shape[-2:] != (side, side):
            height, width = pixel_values.shape[-2:]
            raise ValueError(
                f"This model takes {side}x{side} images (a {self.config.vq_config.grid_size}x"
                f"{self.config.vq_config.grid_size} token grid, one learned position each), got {height}x{width}. "
                f"Use MageImageProcessor(size={side}, crop_size={side}) (the model folder's processor does this)."
            )
        token_ids = self.vq_model.encode(pixel_values, channels_last=channels_last).token_ids  # (B, h, w)
        return token_ids.flatten(1)  # (B, L)

    def check_input_ids(self, input_ids: torch.Tensor, allow_mask: bool = True) -> torch.LongTensor:
        """Raise a clear error unless `input_ids` are `(B, L)` codebook ids (or the mask id); return them as int64
        (any integer dtype is accepted: embeddings and the loss take int64)."""
        num_tokens, codebook_size = self.config.num_image_tokens, self.config.codebook_size
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise TypeError("input_ids must be an integer torch.Tensor of codebook ids with shape (batch, tokens).")
        if input_ids.ndim != 2 or input_ids.shape[1] != num_tokens:
            raise ValueError(
                f"input_ids must have shape (batch, {num_tokens}): one codebook id per image token, without the class "
                f"position (the model prepends it). Got {tuple(input_ids.shape)}."
            )
        input_ids = input_ids.long()  # before comparing: a uint8 tensor cannot hold the codebook size
        valid = (input_ids >= 0) & (input_ids < codebook_size)
        if allow_mask:
            valid |= input_ids == self.config.mask_token_id
        if not bool(valid.all()):
            bad = input_ids[~valid]
            allowed = f"[0, {codebook_size - 1}]" + (f" or the mask id {self.config.mask_token_id}" if allow_mask else "")
            raise ValueError(
                f"input_ids must be codebook ids in {allowed}; got {bad.numel()} out-of-range values such as "
                f"{int(bad[0])}. The codebook of this model has {codebook_size} entries."
            )
        return input_ids

    def build_sequence(
        self, input_ids: torch.LongTensor, class_labels: torch.LongTensor | None = None
    ) -> torch.LongTensor:
        """Prepend the class position to image token ids: `(B, L)` -> `(B, 1 + L)`. It holds the fake class label
        (unconditional) when `class_labels` is `None`, else the id of each row's label `(B,)` (see
        [`MageConfig.class_token_ids`]; -1 is unconditional)."""
        batch_size = input_ids.shape[0]
        if class_labels is None:
            class_ids = input_ids.new_full((batch_size, 1), self.config.fake_class_label)
        else:
            class_labels = torch.as_tensor(class_labels, device=input_ids.device)
            if class_labels.shape != (batch_size,):
                raise ValueError(
                    f"class_labels must have shape ({batch_size},): one label per image (-1 for unconditional). Got "
                    f"{tuple(class_labels.shape)}."
                )
            class_ids = self.config.class_token_ids(class_labels).view(batch_size, 1).to(input_ids.dtype)
        return torch.cat([class_ids, input_ids], dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        token_drop_mask: torch.BoolTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,  # a `generator` passed along by generic callers; the encoder draws nothing at random
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
                Images in [0, 1] (see [`MageImageProcessor`]), tokenized by the model's VQGAN.
            input_ids (`torch.LongTensor` of shape `(batch_size, L)`, *optional*):
                Codebook ids (or `config.mask_token_id`) of the image tokens, row-major, without the class position.
                Give either these or `pixel_values`.
            token_drop_mask (`torch.BoolTensor` of shape `(batch_size, L)`, *optional*):
                `True` for tokens to leave out of the encoder. Every row must drop the same number of tokens.
            class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class of each image for a class-conditional model (`config.num_classes > 0`), -1 for
                unconditional rows. `None`: the fake class label for every row (unconditional, as the original).

        Returns:
            [`~transformers.modeling_outputs.BaseModelOutputWithPooling`] (or a tuple with `return_dict=False`):
            `last_hidden_state` of shape `(batch_size, 1 + kept, hidden_size)`, the class position first;
            `pooler_output` of shape `(batch_size, hidden_size)` (see `config.use_mean_pooling`; `None` without a
            pooling layer); `hidden_states` and `attentions` when asked for.
        """
        _check_extra_kwargs(kwargs, ("generator",), type(self).__name__)
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        if (pixel_values is None) == (input_ids is None):
            raise ValueError("Pass exactly one of `pixel_values` (images in [0, 1]) or `input_ids` (codebook ids).")
        if input_ids is None:
            input_ids = self.tokenize(pixel_values)
        else:
            input_ids = self.check_input_ids(input_ids)
        sequence = self.build_sequence(input_ids, class_labels)
        x = self.embeddings(sequence)  # (B, 1+L, D)
        if token_drop_mask is not None:
            x = drop_tokens(x, token_drop_mask)  # (B, 1+kept, D)

        x, hidden_states, attentions = self.encoder(x, output_hidden_states, output_attentions)
        x = self.layernorm(x)
        pooled = self.pooler(x) if self.pooler is not None else None
        if not return_dict:
            return tuple(v for v in (x, pooled, hidden_states, attentions) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states, attentions=attentions
        )


def drop_tokens(x: torch.Tensor, token_drop_mask: torch.Tensor) -> torch.Tensor:
    """Remove the dropped image tokens from `x` `(B, 1+L, D)`; the class position is always kept."""
    batch_size, seq_len, width = x.shape
    if token_drop_mask.shape != (batch_size, seq_len - 1):
        raise ValueError(
            f"token_drop_mask must have shape (batch, {seq_len - 1}), got {tuple(token_drop_mask.shape)}."
        )
    keep = torch.cat([token_drop_mask.new_ones(batch_size, 1), ~token_drop_mask.bool()], dim=1)  # (B, 1+L)
    counts = keep.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"Every row of token_drop_mask must drop the same number of tokens, got {counts.tolist()}.")
    return x[keep].reshape(batch_size, -1, width)  # (B, 1+kept, D), original order


class MageDecoder(nn.Module):
    """MAGE's decoder. Dropped and masked positions are filled with the decoder embedding of the class position (the
    original's `pad_with_cls_token=True`; its `mask_token` parameter is unused), then learned position embeddings
    are added and the blocks and a final norm applied."""

    def __init__(self, config: MageConfig):
        super().__init__()
        self.embed = nn.Linear(config.hidden_size, config.decoder_hidden_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.max_position_embeddings, config.decoder_hidden_size))
        self.transformer = MageTransformer(
            config,
            config.decoder_hidden_size,
            config.decoder_num_hidden_layers,
            config.decoder_num_attention_heads,
            config.decoder_intermediate_size,
        )
        self.layernorm = nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        encoder_out: torch.Tensor,
        token_mask: torch.BoolTensor,
        present: torch.BoolTensor | None = None,
        output_rows: torch.BoolTensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            encoder_out (`torch.Tensor` of shape `(B, 1 + L, D)`, `(B, 1 + kept, D)` or `(M, D)`):
                The encoder's output at every position, or only at the positions `present` marks (in order, the
                class position always among them).
            token_mask (`torch.BoolTensor` of shape `(B, L)`): the masked image tokens.
            present (`torch.BoolTensor` of shape `(B, 1 + L)`, *optional*): the positions `encoder_out` holds
                when it does not hold them all. Only the class position and unmasked ones are read.
            output_rows (`torch.BoolTensor` of shape `(B, 1 + L)`, *optional*): see [`MageTransformer`].

        Returns: `(B, 1 + L, Dd)`, or `(M, Dd)` for the `output_rows`.
        """
        # (B, 1+kept, Dd), or (M, Dd) whose number of rows changes from call to call (so the plain op is used)
        x = cpu_kernels.linear(self.embed, encoder_out, pack=encoder_out.ndim == 3)
        batch_size, num_tokens = token_mask.shape
        width = x.shape[-1]
        if present is None:
            full = x  # (B, 1+L, Dd)
        else:
            full = x.new_zeros(batch_size, num_tokens + 1, width)
            full[present] = x.reshape(-1, width)  # (B, 1+L, Dd); absent positions are masked and replaced below
        pad = full[:, :1].expand(batch_size, num_tokens + 1, width)  # (B, 1+L, Dd): the class position everywhere
        masked = torch.cat([token_mask.new_zeros(batch_size, 1), token_mask], dim=1)  # (B, 1+L)
        x = torch.where(masked.unsqueeze(-1), pad, full) + self.position_embeddings[:, : num_tokens + 1]
        x, _, _ = self.transformer(x, output_rows=output_rows)
        return self.layernorm(x)


class MageMLMHead(nn.Module):
    """Linear (decoder width -> encoder width) -> GELU -> LayerNorm, then scores against the token embedding
    matrix plus a bias. The embedding matrix is detached, as in the original: the MLM loss does not train it."""

    def __init__(self, config: MageConfig):
        super().__init__()
        self.dense = nn.Linear(config.decoder_hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.mlm_layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(
        self, hidden_states: torch.Tensor, word_embeddings: torch.Tensor, num_ids: int, pack: bool = True
    ) -> torch.Tensor:
        """`hidden_states` `(B, L, Dd)` or `(M, Dd)` -> logits `(B, L, num_ids)` or `(M, num_ids)`; `pack`: see
        `cpu_kernels.packed_linear`."""
        # Only the first `num_ids` vocabulary rows (the codebook) are ever needed, so only those are computed.
        h = self.layer_norm(self.act(cpu_kernels.linear(self.dense, hidden_states, pack)))
        weight = word_embeddings[:num_ids].detach()
        return cpu_kernels.packed_linear(
            h, weight, self.bias[:num_ids], self, "logits", source=word_embeddings, pack=pack
        )


class MageContrastiveHead(nn.Module):
    """MAGE-C's projection head (SimCLR style): the mean of the encoder's image-token outputs (the class position
    left out, masked positions included, dropped ones absent) through Linear -> ReLU -> Linear. SimCLR's batch norm
    is left out so that the head behaves the same on every device and batch split."""

    def __init__(self, config: MageConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = nn.ReLU()
        self.projection = nn.Linear(config.hidden_size, config.contrastive_projection_dim)

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        pooled = encoder_hidden_states[:, 1:].mean(dim=1)  # (B, D): image positions only
        return self.projection(self.act(self.dense(pooled)))  # (B, P)


class MageForMaskedImageModeling(MagePreTrainedModel):
    """MAGE with its decoder and MLM layer: predicts the codebook id of masked image tokens. This is the model
    of the pre-training checkpoints, used for pre-training and for generation."""

    def __init__(self, config: MageConfig):
        super().__init__(config)
        if config.use_mean_pooling:
            raise ValueError(
                "MageForMaskedImageModeling needs the encoder's final norm; load it with use_mean_pooling=False."
            )
        self.mage = MageModel(config, add_pooling_layer=False)
        self.decoder = MageDecoder(config)
        self.mlm_head = MageMLMHead(config)
        # MAGE-C only: absent (and absent from the state dict) unless the config asks for it.
        self.contrastive_head = MageContrastiveHead(config) if config.contrastive_projection_dim else None
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        token_mask: torch.BoolTensor | None = None,
        token_drop_mask: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        class_labels: torch.LongTensor | None = None,
        masked_logits_only: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MageMaskedImageModelingOutput | tuple:
        r"""
        Two uses:

        * **Training** (MAGE's pre-training step): pass `pixel_values` (or `input_ids`/`labels` of unmasked tokens)
          and no `token_mask`. A masking ratio is drawn from the truncated normal of the config (or `mask_ratio`),
          per-token `noise` is drawn (or passed), and the `ceil(L * ratio)` lowest-noise tokens are masked, of which
          the `ceil(L * drop_ratio)` lowest are also dropped before the encoder. The loss is computed against the
          unmasked ids.
        * **Inference**: pass `input_ids` holding `config.mask_token_id` at the unknown positions (or an explicit
          `token_mask`). Nothing is dropped unless `token_drop_mask` says so. `logits` score the codebook.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
                Images in [0, 1]; their tokens become the targets.
            input_ids (`torch.LongTensor` of shape `(batch_size, L)`, *optional*):
                Codebook ids, with `config.mask_token_id` at masked positions.
            token_mask (`torch.BoolTensor` of shape `(batch_size, L)`, *optional*):
                `True` for tokens to mask. Positions already holding the mask id are masked too.
            token_drop_mask (`torch.BoolTensor` of shape `(batch_size, L)`, *optional*):
                `True` for masked tokens to leave out of the encoder (must be a subset of the mask).
            labels (`torch.LongTensor` of shape `(batch_size, L)`, *optional*):
                Target codebook ids. By default the tokens of `pixel_values`, or `input_ids` when they hold no mask
                id (the masks then come from `token_mask` or are drawn here).
            noise (`torch.FloatTensor` of shape `(batch_size, L)`, *optional*):
                Per-token noise that decides which tokens are masked when the masks are drawn here.
            mask_ratio (`float`, *optional*):
                Masking ratio to use instead of drawing one.
            generator (`torch.Generator`, *optional*):
                Source of the random masking ratio and noise.
            class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class of each image for a class-conditional model, -1 for unconditional rows (see
                [`MageConfig.class_token_ids`]). `None`: the fake class label everywhere, as the original.
            masked_logits_only (`bool`, *optional*, defaults to `False`):
                Compute the logits at masked positions only (the others are returned as zeros): the loss reads
                nothing else, so the last decoder block and the MLM head skip the unmasked positions (about 3% of a
                ViT-B training step at mask ratio 0.55). The loss and every gradient are those of the full
                computation, up to float rounding. `train_mage.py` uses it.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        config = self.config
        num_tokens = config.num_image_tokens

        if pixel_values is not None:
            if input_ids is not None:
                raise ValueError("Pass either `pixel_values` or `input_ids`, not both.")
            input_ids = self.mage.tokenize(pixel_values)
        elif input_ids is None:
            raise ValueError("Pass `pixel_values` (images in [0, 1]) or `input_ids` (codebook ids).")
        input_ids = self.mage.check_input_ids(input_ids)
        device = input_ids.device

        if token_mask is not None and token_mask.shape != input_ids.shape:  # checked before it can broadcast
            raise ValueError(f"token_mask must have shape {tuple(input_ids.shape)}, got {tuple(token_mask.shape)}.")
        has_mask_ids = bool((input_ids == config.mask_token_id).any())
        if labels is None and not has_mask_ids:
            labels = input_ids  # every id is known, so the masked ones are the targets
        drew_masks = token_mask is None and not has_mask_ids
        if drew_masks:
            # Pre-training: draw the ratio and the noise unless given.
            if mask_ratio is None:
                mask_ratio = sample_mask_ratio(config, generator)
            if noise is None:
                # Drawn on the generator's device, so a CPU generator gives the same masks on any device.
                noise_device = generator.device if generator is not None else device
                noise = torch.rand(input_ids.shape, generator=generator, device=noise_device).to(device)
            elif noise.shape != input_ids.shape:
                raise ValueError(f"noise must have shape {tuple(input_ids.shape)}, got {tuple(noise.shape)}.")
            num_masked = math.ceil(num_tokens * mask_ratio)
            num_dropped = min(math.ceil(num_tokens * config.drop_ratio), num_masked)
            token_mask, drawn_drop_mask = random_token_masks(noise, num_masked, num_dropped)
            token_drop_mask = drawn_drop_mask if token_drop_mask is None else token_drop_mask
        else:
            is_mask_id = input_ids == config.mask_token_id
            token_mask = is_mask_id if token_mask is None else (token_mask.bool() | is_mask_id)
        if token_drop_mask is not None:
            token_drop_mask = token_drop_mask.bool()
            if token_drop_mask.shape != input_ids.shape or bool((token_drop_mask & ~token_mask).any()):
                raise ValueError("token_drop_mask must have the shape of input_ids and drop only masked tokens.")

        masked_ids = input_ids.masked_fill(token_mask, config.mask_token_id)
        encoder_outputs = self.mage(
            input_ids=masked_ids,
            token_drop_mask=token_drop_mask,
            class_labels=class_labels,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        contrastive_embeddings = None
        if self.contrastive_head is not None:
            contrastive_embeddings = self.contrastive_head(encoder_outputs.last_hidden_state)  # (B, P)
        present = None
        if token_drop_mask is not None and bool(token_drop_mask.any()):
            present = torch.cat([token_drop_mask.new_ones(token_drop_mask.shape[0], 1), ~token_drop_mask], dim=1)
        word_embeddings = self.mage.embeddings.word_embeddings.weight
        if labels is not None:
            labels = self.mage.check_input_ids(labels, allow_mask=False)
        loss = None
        if masked_logits_only:
            # The loss weighs unmasked positions by zero, so their logits (and the last decoder block's rows there,
            # which feed only them) are never needed; the block's attention still reads every position.
            predict = torch.cat([token_mask.new_zeros(token_mask.shape[0], 1), token_mask], dim=1)  # (B, 1+L)
            decoded = self.decoder(encoder_outputs.last_hidden_state, token_mask, present, output_rows=predict)
            rows = self.mlm_head(decoded, word_embeddings, config.codebook_size)  # (M, K), masked rows in order
            logits = rows.new_zeros(*token_mask.shape, rows.shape[-1]).index_put((token_mask,), rows)  # (B, L, K)
            if labels is not None:
                loss = masked_token_loss(rows, labels[token_mask], config.label_smoothing)
        else:
            decoded = self.decoder(encoder_outputs.last_hidden_state, token_mask, present)  # (B, 1+L, Dd)
            logits = self.mlm_head(decoded[:, 1:], word_embeddings, config.codebook_size)  # (B, L, K)
            if labels is not None:
                loss = masked_token_loss(logits[token_mask], labels[token_mask], config.label_smoothing)

        output = MageMaskedImageModelingOutput(
            loss=loss,
            logits=logits,
            labels=labels,
            token_mask=token_mask,
            token_drop_mask=token_drop_mask,
            mask_ratio=mask_ratio if drew_masks else None,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            contrastive_embeddings=contrastive_embeddings,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def masked_logits(
        self, input_ids: torch.LongTensor, class_labels: torch.LongTensor | None = None
    ) -> torch.FloatTensor:
        r"""
        The logits of [`forward`] at the masked positions only: what the sampler needs, for less work. The values
        there are those of `forward(input_ids=input_ids, class_labels=class_labels).logits`; this skips work whose
        result is never read:

        * the decoder replaces the encoder's output at masked positions by the class position's, so the last encoder
          block computes only the class position and the known tokens (its attention still reads every position);
        * the last decoder block, the final norm and the MLM head run only at the masked positions;
        * identical rows (every row at the first step of unconditional sampling) are computed once.

        At the ViT-B shape that is about 5% of a sampling step's FLOPs on average over 20 cosine-scheduled steps.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, L)`):
                Codebook ids, with `config.mask_token_id` at the positions to predict.
            class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                As in [`forward`].

        Returns:
            `torch.FloatTensor` of shape `(batch_size, L, codebook_size)`: the logits at masked positions, zero at
            the others.
        """
        input_ids = self.mage.check_input_ids(input_ids)
        sequence = self.mage.build_sequence(input_ids, class_labels)  # (B, 1+L)
        if sequence.shape[0] > 1:
            unique, inverse = torch.unique(sequence, dim=0, return_inverse=True)
            if unique.shape[0] < sequence.shape[0]:
                return self._masked_logits(unique)[inverse]  # (B, L, K)
        return self._masked_logits(sequence)

    def _masked_logits(self, sequence: torch.LongTensor) -> torch.Tensor:
        batch_size, seq_len = sequence.shape
        token_mask = sequence[:, 1:] == self.config.mask_token_id  # (B, L)
        class_column = token_mask.new_ones(batch_size, 1)
        read = torch.cat([class_column, ~token_mask], dim=1)  # (B, 1+L): what the decoder reads from the encoder
        predict = torch.cat([~class_column, token_mask], dim=1)  # (B, 1+L): where logits are wanted
        x = self.mage.embeddings(sequence)  # (B, 1+L, D)
        x, _, _ = self.mage.encoder(x, output_rows=read)  # (M, D)
        x = self.mage.layernorm(x)
        decoded = self.decoder(x, token_mask, present=read, output_rows=predict)  # (U, Dd)
        word_embeddings = self.mage.embeddings.word_embeddings.weight
        rows = self.mlm_head(decoded, word_embeddings, self.config.codebook_size, pack=False)  # (U, K)
        logits = rows.new_zeros(batch_size, seq_len - 1, rows.shape[-1])  # (B, L, K)
        logits[token_mask] = rows
        return logits


def masked_token_loss(logits: torch.Tensor, labels: torch.LongTensor, label_smoothing: float) -> torch.Tensor:
    """MAGE's loss: label-smoothed cross-entropy over the codebook, averaged over the masked positions, from their
    logits `(M, K)` and target ids `(M,)`. Zero (still part of the graph) when nothing is masked."""
    if logits.shape[0] == 0:
        return logits.sum()
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


class MageForImageClassification(MagePreTrainedModel):
    """MAGE encoder with a linear head on the pooled output, as in MAGE's fine-tuned checkpoints (`use_mean_pooling`:
    mean over image positions, `fc_norm`, `head`)."""

    def __init__(self, config: MageConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.mage = MageModel(config, add_pooling_layer=True)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,  # `class_labels` or a `generator` from generic callers: the classifier is unconditional
    ) -> ImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`, *optional*):
                Images in [0, 1] (see [`MageImageProcessor`]).
            input_ids (`torch.LongTensor` of shape `(batch_size, L)`, *optional*):
                Codebook ids instead of images.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class indices for the cross-entropy loss (mean squared error when `num_labels == 1`).

        Returns:
            [`~transformers.modeling_outputs.ImageClassifierOutput`] with `logits` of shape `(batch_size, num_labels)`.
        """
        _check_extra_kwargs(kwargs, ("class_labels", "generator"), type(self).__name__)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.mage(
            pixel_values=pixel_values,
            input_ids=input_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.pooler_output)  # (B, num_labels)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            elif labels.dtype in (torch.long, torch.int):
                loss = F.cross_entropy(logits, labels)
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.float())
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()
