# Copyright 2026 The mage-hf authors. MIT licence.
# MAGE (Li et al., CVPR 2023) and its reference code (LTH14/mage) are MIT licensed.
"""The MaskGIT VQGAN that MAGE uses as its image tokenizer.

This is not taming-transformers' VQGAN nor diffusers' `VQModel`: it has no attention, down-samples with average
pooling, uses bias-free 3x3 convolutions in its residual blocks, and has no convolutions around the quantiser. Module
and parameter names follow the original checkpoint (`encoder.down.{i}.block.{j}.conv1`, ...) so conversion is a
prefix change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from . import cpu_kernels
from .configuration_mage import MageVQConfig

__all__ = ["MageVQModel", "MageVQEncoderOutput", "MageVQPreTrainedModel"]


def _no_autocast(device: torch.device):
    """A region without autocast on `device` (nothing to turn off on devices autocast does not support)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@dataclass
class MageVQEncoderOutput(ModelOutput):
    """
    Output of [`MageVQModel.encode`].

    Args:
        token_ids (`torch.LongTensor` of shape `(batch_size, grid_size, grid_size)`):
            Index of the nearest codebook entry at every grid cell (row-major).
        quantized (`torch.FloatTensor` of shape `(batch_size, embed_dim, grid_size, grid_size)`):
            The codebook entries of `token_ids`: the input of the decoder.
        latents (`torch.FloatTensor` of shape `(batch_size, embed_dim, grid_size, grid_size)`):
            The encoder output before quantisation.
    """

    token_ids: torch.LongTensor | None = None
    quantized: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None


def _to_conv_layout(x: torch.Tensor) -> torch.Tensor:
    """On the CPU the decoder's convolutions run in channels-last (NHWC) layout: the 3x3 ones of 64+ channels by the
    native Winograd kernel, the others by oneDNN without converting every activation to and from its blocked layout,
    all with weights prepared once (`cpu_kernels`); see benchmarks/README.md for the measurements. The decoder hands
    back a standard contiguous tensor."""
    if x.device.type == "cpu" and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


class MageVQResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 (no bias), twice. When the width changes, the shortcut is a 1x1 convolution of
    the block's *output* `h`, not of its input: `shortcut(h) + h`. That is what the released weights were trained
    with, so it is kept."""

    def __init__(self, config: MageVQConfig, in_channels: int, out_channels: int):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = (
            nn.Conv2d(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor, scratch: list | None = None) -> torch.Tensor:
        """`scratch`: a list of spare activations (possibly empty) that the block may overwrite; the block leaves its
        own there for the next block. On the CPU every new activation is tens of MB of first-touched memory at
        256x256, which costs more than the pass that fills it; with the spares, a block makes none. With `scratch`
        `None` (what the encoder and decoder pass when a forward hook may hold an activation) the block overwrites
        nothing it did not make in this call and that a hook could have seen."""
        reuse = scratch is not None
        spares = scratch if reuse else []
        a = cpu_kernels.group_norm_silu(self.norm1, x, out=_take(spares, x.shape))
        h = cpu_kernels.conv2d(self.conv1, a, out=_take(spares, (x.shape[0], self.conv1.out_channels, *x.shape[2:])))
        h = cpu_kernels.group_norm_silu(self.norm2, h, out=h if reuse else None)  # in place: h is the block's own
        # The sums are formed in place, in fresh convolution outputs (no convolution saves its output for backward,
        # so this is autograd-safe) or, in CPU inference, in the block's input by the convolution itself: at 256x256
        # every new activation is tens of MB of first-touched memory. So without autograd this block consumes `x`.
        if self.nin_shortcut is not None:
            out = cpu_kernels.conv2d(self.conv2, h)
            shortcut = cpu_kernels.conv2d(self.nin_shortcut, out)
            out = shortcut.add_(out) if reuse else shortcut + out
        elif reuse:
            out = cpu_kernels.conv2d_add_(self.conv2, h, x)
        else:
            out = cpu_kernels.conv2d(self.conv2, h) + x
        if scratch is not None and not (torch.is_grad_enabled() and (a.requires_grad or h.requires_grad)):
            # a and h are read by conv1 and conv2 only, so they are free now (two at most are kept).
            scratch[:] = [t for t in (a, h) if t.data_ptr() not in (out.data_ptr(), x.data_ptr())][-2:]
        return out


def _take(spares: list, shape) -> torch.Tensor | None:
    """Remove and return a spare activation of `shape` from `spares`, if there is one."""
    for i, spare in enumerate(spares):
        if tuple(spare.shape) == tuple(shape):
            return spares.pop(i)
    return None


class MageVQUpsample(nn.Module):
    """Nearest-neighbour 2x up-sampling followed by a 3x3 convolution (with bias); in CPU inference as one sub-pixel
    convolution (see [`cpu_kernels.upsample_conv2d`])."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.upsample_conv2d(self.conv, x)


def _level(blocks: list[nn.Module], upsample: nn.Module | None = None) -> nn.Module:
    # A bare container so that parameter names read `down.{i}.block.{j}` / `up.{i}.upsample`, as in the checkpoints.
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if upsample is not None:
        level.upsample = upsample
    return level


class MageVQEncoder(nn.Module):
    """conv_in -> levels of residual blocks (average-pooled 2x between levels) -> two middle blocks -> norm -> swish
    -> 1x1 conv_out to `embed_dim`."""

    def __init__(self, config: MageVQConfig):
        super().__init__()
        widths = config.level_channels
        self.conv_in = nn.Conv2d(config.num_channels, config.base_channels, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        block_in = config.base_channels
        for width in widths:
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(MageVQResnetBlock(config, block_in, width))
                block_in = width
            self.down.append(_level(blocks))
        self.mid = nn.ModuleDict(
            {"block_1": MageVQResnetBlock(config, block_in, block_in), "block_2": MageVQResnetBlock(config, block_in, block_in)}
        )
        self.norm_out = nn.GroupNorm(config.norm_num_groups, block_in, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(block_in, config.embed_dim, 1)

    def forward(self, pixel_values: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        # By default the encoder keeps the standard layout, in which its codebook ids match the original's exactly:
        # a channels-last convolution rounds differently, enough to flip a nearest code that is nearly tied.
        # `channels_last` trades that for speed (see `MageVQModel.encode`), and so also takes the faster Winograd
        # tiles, whose rounding error is larger still (see `cpu_kernels.winograd_tile_size`).
        if not channels_last:
            return self._forward(self.conv_in(pixel_values))
        with cpu_kernels.winograd_tile_size(4):
            return self._forward(cpu_kernels.conv2d(self.conv_in, _to_conv_layout(pixel_values)))

    def _forward(self, h: torch.Tensor) -> torch.Tensor:
        # Spare activations handed from block to block (see `MageVQResnetBlock.forward`), unless a hook may hold one.
        scratch = [] if cpu_kernels.outputs_private(*self.modules()) else None
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h, scratch)
            if i != len(self.down) - 1:
                h = F.avg_pool2d(h, kernel_size=2, stride=2)
        h = self.mid["block_2"](self.mid["block_1"](h, scratch), scratch)
        h = cpu_kernels.group_norm_silu(self.norm_out, h, out=h if scratch is not None else None)
        return cpu_kernels.conv2d(self.conv_out, h).contiguous()  # (B, embed_dim, h, w)


class MageVQDecoder(nn.Module):
    """conv_in -> two middle blocks -> levels coarsest first (nearest 2x + conv after every level but the finest) ->
    norm -> swish -> conv_out to pixels. `up[i]` is level i, stored finest first like the checkpoints."""

    def __init__(self, config: MageVQConfig):
        super().__init__()
        widths = config.level_channels
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(config.embed_dim, block_in, 3, padding=1)
        self.mid = nn.ModuleDict(
            {"block_1": MageVQResnetBlock(config, block_in, block_in), "block_2": MageVQResnetBlock(config, block_in, block_in)}
        )
        levels = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(MageVQResnetBlock(config, block_in, widths[i]))
                block_in = widths[i]
            levels.insert(0, _level(blocks, MageVQUpsample(block_in) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(config.norm_num_groups, block_in, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(block_in, config.num_channels, 3, padding=1)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        h = cpu_kernels.conv2d(self.conv_in, _to_conv_layout(quantized))
        # Spare activations handed from block to block (see `MageVQResnetBlock.forward`), unless a hook may hold one.
        scratch = [] if cpu_kernels.outputs_private(*self.modules()) else None
        h = self.mid["block_2"](self.mid["block_1"](h, scratch), scratch)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h, scratch)
            if i != 0:
                h = level.upsample(h)
        h = cpu_kernels.group_norm_silu(self.norm_out, h, out=h if scratch is not None else None)
        return cpu_kernels.conv2d(self.conv_out, h).contiguous()  # (B, 3, H, W)


class MageVQCodebook(nn.Embedding):
    """The codebook: an `nn.Embedding` of its own type, so that weight initialisation can tell it from MAGE's token
    embeddings (transformers initialises module by module, and the quantizer holding it has no parameter of its
    own, so it is never visited)."""


class MageVQQuantizer(nn.Module):
    """Nearest-neighbour lookup into the codebook by squared L2 distance."""

    def __init__(self, config: MageVQConfig):
        super().__init__()
        self.embedding = MageVQCodebook(config.num_embeddings, config.embed_dim)

    def forward(self, latents: torch.Tensor) -> torch.LongTensor:
        batch_size, channels, height, width = latents.shape
        # In float32 whatever the latents' dtype or an enclosing autocast: in half precision ~1% of the ids of a
        # 1024-code codebook flip (bf16), and the tokens would differ between mixed-precision training and use.
        with _no_autocast(latents.device):
            flat = latents.permute(0, 2, 3, 1).reshape(-1, channels).float()  # (B*h*w, C), row-major over the grid
            codebook = self.embedding.weight.float()
            # ||z||^2 + ||e||^2 - 2 z.e, summed in this order as in the original, so ties break identically.
            distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        return distances.argmin(dim=1).reshape(batch_size, height, width)  # (B, h, w)

    def lookup(self, token_ids: torch.LongTensor) -> torch.Tensor:
        return self.embedding(token_ids).permute(0, 3, 1, 2).contiguous()  # (B, h, w, C) -> (B, C, h, w)


@torch.no_grad()
def init_vq_weights(module: nn.Module) -> None:
    """Initialise one tokenizer module: He-normal convolutions with zero bias, unit GroupNorms, and a codebook
    uniform in +-1/num_embeddings (taming's initialisation)."""
    if isinstance(module, nn.Conv2d):
        init.kaiming_normal_(module.weight, nonlinearity="linear")
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, MageVQCodebook):
        init.uniform_(module.weight, -1.0 / module.num_embeddings, 1.0 / module.num_embeddings)


class MageVQPreTrainedModel(PreTrainedModel):
    config: MageVQConfig
    config_class = MageVQConfig
    base_model_prefix = "vq_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MageVQResnetBlock"]
    # There is no attention in this model; accept the implementation a parent MAGE config asks for.
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        init_vq_weights(module)


class MageVQModel(MageVQPreTrainedModel):
    """The MaskGIT VQGAN tokenizer: `encode` maps images in [0, 1] to codebook ids, `decode` maps ids back to images
    in (about) [0, 1]. Decoded images are not clipped; clip them before saving."""

    def __init__(self, config: MageVQConfig):
        super().__init__(config)
        self.encoder = MageVQEncoder(config)
        self.decoder = MageVQDecoder(config)
        self.quantize = MageVQQuantizer(config)
        self.post_init()

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; use MageImageProcessor to "
                "turn images into tensors."
            )
        factor, channels = self.config.downsample_factor, self.config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {channels}, height, width), got {tuple(pixel_values.shape)}. "
                "Use MageImageProcessor to resize, crop and convert images to RGB."
            )
        height, width = pixel_values.shape[-2:]
        if height % factor or width % factor or height == 0 or width == 0:
            raise ValueError(
                f"Image sides must be positive multiples of {factor} pixels (one token each), got {height}x{width}. "
                f"This model was trained at {self.config.resolution}x{self.config.resolution}: use MageImageProcessor."
            )

    def check_token_ids(self, token_ids: torch.Tensor) -> None:
        """Raise a clear error unless `token_ids` are integer codebook ids of shape (B, h, w)."""
        if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
            raise TypeError("token_ids must be an integer torch.Tensor of codebook ids.")
        if token_ids.ndim != 3:
            raise ValueError(f"token_ids must have shape (batch, height, width), got {tuple(token_ids.shape)}.")
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= self.config.num_embeddings):
            raise ValueError(
                f"token_ids must lie in [0, {self.config.num_embeddings - 1}] (the codebook), got values in "
                f"[{int(token_ids.min())}, {int(token_ids.max())}]. Mask or class ids cannot be decoded: fill masked "
                "positions with sampled ids first."
            )

    def encode(
        self, pixel_values: torch.Tensor, return_dict: bool = True, channels_last: bool = False
    ) -> MageVQEncoderOutput | tuple:
        """Tokenize images.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images in [0, 1], not normalised (see [`MageImageProcessor`]). Sides must be multiples of
                `config.downsample_factor`.
            channels_last (`bool`, *optional*, defaults to `False`):
                On the CPU, run the encoder's convolutions in channels-last layout like the decoder's (3x3 ones by
                the Winograd kernel with 4x4 output tiles, the others by oneDNN, weights prepared once): about 2.5x as
                fast at 256x256 (`benchmarks/README.md`). The latents then differ from the standard layout's by
                rounding (a relative RMS of a few 1e-6), which changes a codebook id only where two codes are nearly
                tied. The training scripts use it (a rare near-tie does not matter for training targets); the default
                keeps the ids identical to the original implementation's.

        Returns:
            [`MageVQEncoderOutput`] with `token_ids` of shape `(batch_size, height // f, width // f)`, or a tuple
            `(token_ids, quantized, latents)` when `return_dict=False`.
        """
        self._check_pixels(pixel_values)
        # The frozen tokenizer runs in its own dtype even inside an autocast region (a mixed-precision training step
        # that calls the model on pixels), so that its ids are those it gives outside one.
        with _no_autocast(pixel_values.device):
            latents = self.encoder(pixel_values.to(self.dtype), channels_last=channels_last)
        token_ids = self.quantize(latents)
        quantized = self.quantize.lookup(token_ids)
        if not return_dict:
            return token_ids, quantized, latents
        return MageVQEncoderOutput(token_ids=token_ids, quantized=quantized, latents=latents)

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Decode quantized latents `(batch_size, embed_dim, h, w)` to images `(batch_size, num_channels, H, W)`."""
        if quantized.ndim != 4 or quantized.shape[1] != self.config.embed_dim:
            raise ValueError(
                f"quantized latents must have shape (batch, {self.config.embed_dim}, h, w), got {tuple(quantized.shape)}."
            )
        with _no_autocast(quantized.device):  # in its own dtype, as `encode`
            return self.decoder(quantized.to(self.dtype))

    def decode(self, token_ids: torch.LongTensor) -> torch.Tensor:
        """Decode codebook ids `(batch_size, h, w)` to images `(batch_size, num_channels, H, W)` in about [0, 1]."""
        self.check_token_ids(token_ids)
        return self.decode_latents(self.quantize.lookup(token_ids))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Reconstruct images through the codebook: `decode(encode(pixel_values))`."""
        return self.decode_latents(self.encode(pixel_values).quantized)
