# Copyright 2026 The mage-hf authors. MIT licence.
"""CPU kernels for the MAGE transformer and its VQGAN: matmuls with pre-packed weights and a fused group norm + swish
for inference, a fused attention for training and inference, and a cheaper dropout, GELU + dropout and gradient norm
for training.

A plain `F.linear` / `F.conv2d` on the CPU re-packs the weight into the matrix library's blocked layout on every
call. For MAGE's shapes (257 tokens per image; 512-channel convolutions at 16x16) that repacking is a large share of
the call: about 15% of a ViT-B sampling step, and as long as the convolution itself at 16x16
(`benchmarks/README.md` has the measurements). Here the weight is packed once, kept beside its module, and reused for
every call with the same input shape:

* linear layers: MKL's packed sgemm (`torch.ops.mkl._mkl_linear`, what TorchInductor uses for frozen fp32 linears);
* 2-D convolutions on channels-last input: oneDNN with a pre-reordered weight
  (`torch.ops.mkldnn._convolution_pointwise`).

They compute the same float32 products as the plain ops, with the same kernels minus the per-call packing: results
were bit-identical in single-thread checks and agree to rounding (~1e-6) with two threads. The fast path is taken only
for float32 CPU tensors when no autograd graph is being recorded, for plain `nn.Linear`/`nn.Conv2d` modules without
hooks, outside `torch.compile`/TorchScript tracing, and when this torch build has the kernels; every other case
(training, CUDA, half precision, wrapped or hooked modules) runs the ordinary module. A packed copy costs as much
memory as the weight it packs. It is dropped with its module and rebuilt when the input shape or the weight changes
(another tensor, storage or version, or different values at 4 sampled positions, which catches whole-tensor writes
through `.data`, such as loading or averaging weights that way; a write through `.data` to part of a weight can miss
them, so call `clear_cache()` after one); `set_enabled(False)` turns the mechanism off (and the native kernels
below) and frees the copies.

Native kernels (`csrc/cpu_ops.cpp`, compiled with the local C++ compiler on first use by `torch.utils.cpp_extension`,
a few seconds, then cached under a name that includes the source, the torch version and the CPU's features; see
[`native_ops_available`]). Without a compiler, or with `MAGE_HF_NATIVE_KERNELS=0`, every caller takes a pure-torch
path instead; the first failure to build is logged once with its reason.

Group norm + swish ([`group_norm_silu`], the VQGAN's residual blocks in channels-last CPU inference): two passes over
the data instead of four, written into a spare activation or in place, so a VQGAN block need not allocate (on these
machines a new 134 MB activation costs ~35 ms in page faults, more than the passes that fill it). Its statistics are
accumulated in double precision, so it is closer to a float64 result than torch's float32 group norm.

Up-sampling ([`upsample_conv2d`], the VQGAN decoder's nearest 2x + 3x3 convolution, on the convolution fast path):
one 2x2 convolution of the small image with one output group per row and column parity, interleaved into the large
output; the same result with 16 instead of 36 multiply-adds per small pixel and channel pair, and no up-sampled image.

3x3 convolutions ([`conv2d`] and [`conv2d_add_`] on their fast path, stride 1, padding 1, at least 64 channels in
and out: the VQGAN's residual blocks and the decoder's first convolution): Winograd's minimal filtering F(2x2, 3x3)
in a native kernel (`csrc/cpu_ops.cpp`). Each 2x2 output tile costs 16 instead of 36 multiply-adds per input and
output channel pair, done as 16 matmuls per block of tiles, with transforms linear in the channel counts; the
filters are transformed once per weight (in float64) and cached like the packed weights. It is the same
convolution, not an approximation, and closer to a float64 result than the direct float32 kernel (1.5e-6 against
5e-6 at the VQGAN's 128-channel 256x256 level): the input and output transforms only add and subtract, and the filter
transform's entries (0, +-1/2, 1) are exact. At the VQGAN's shapes it is 1.3-1.8x faster than oneDNN's direct
convolution; below 64 channels it is not, and oneDNN keeps those. Within [`winograd_tile_size`]`(4)` the kernel takes
4x4 output tiles instead, F(4x4, 3x3): 36 instead of 144 multiply-adds per 16 outputs and channel pair, another
1.4-1.6x faster at the VQGAN encoder's shapes, but with about 10x the rounding error of a direct float32 convolution
(its transforms scale by up to 8). Only the channels-last encode of the training scripts, which already trades the
original's exact ids for speed, takes it; the decode and the standard encode never do.

Dropout: `torch.nn.functional.dropout` on the CPU draws its keep mask with `bernoulli_`, about 6 ns per element on
these machines, and keeps it as a full tensor for the backward pass. MAGE drops out attention probabilities and MLP
activations (about 27 M elements per image and training step at the ViT-B shape), so that was 18% of a ViT-B training
step. [`dropout`] decides each element from 16 random bits: the drop probability is `p` rounded to a multiple of
2^-16 (0.1 becomes 0.100006), and kept values are scaled by the inverse of the exact keep probability, so the
expected value is unchanged. Each call takes one seed from torch's default generator, so it follows
`torch.manual_seed` and a saved/restored generator state like `nn.Dropout` (the masks differ from `nn.Dropout`'s).
The bits come from one of two places:

* the native kernel: counter-based bits (splitmix64 of the seed and the element's index), so the mask is
  never stored: the forward and backward passes are each one pass over the data, and the backward pass recomputes
  the mask it needs. The bits are made a chunk at a time and read back as 16-bit draws, one per element, so that the
  loop over the elements vectorises without moving lanes around (1.6-1.9x faster than splitting each 64-bit word
  in registers);
* otherwise (no compiler, `MAGE_HF_NATIVE_KERNELS=0`, or a dtype other than float32) numpy's SFC64 generator seeded
  with the seed, with the mask kept as a float tensor for the backward pass.

The two draw different masks from the same seed, so a run resumed on a machine that cannot build the kernel does not
repeat the masks of the interrupted run. CUDA tensors and compiled graphs use `F.dropout` (fused there).

GELU and dropout ([`gelu_dropout`], the MLP's hidden activations in CPU training): one native pass each way, with
[`dropout`]'s mask, instead of GELU's and dropout's two passes and an extra activation. Its erf is the approximation
torch's vectorised GELU uses (Abramowitz & Stegun 7.1.26), written as Phi(x) = erfc(|x| / sqrt 2) / 2 for x < 0,
which does not cancel there as 1 + erf does: it is closer to float64 than torch's float32 GELU (4.2e-7 against
1.2e-6 on 3 x randn values).

Attention ([`attention`], the model's SDPA configuration for float32 CPU tensors, in training and inference): one
native kernel from the qkv projection's output to the heads' outputs (and back to the qkv gradient), one task per
(image, head) whose N x N scores stay in a per-thread buffer in cache, with MKL's sgemm for the products. The op-by-op
attention writes 4-6 tensors of B x H x N x N floats per block and step (17 MB each at MAGE's decoder shape in a
batch-4 training step) and copies q, k and v into contiguous heads; in training this took a ViT-B step's attention
from ~0.36 to ~0.20 s. Its dropout mask is [`dropout`]'s for the same seed, so it computes what the op-by-op path
computes, to float32 rounding.

Gradient norm ([`total_norm`], used by `training_utils.clip_grad_norm_`): squares summed in double precision at memory
speed, about twice as fast as torch's norm kernel here, and exact to float32 rounding.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import platform
import re
import threading
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "clear_cache",
    "conv2d",
    "conv2d_add_",
    "dropout",
    "gelu_dropout",
    "group_norm_silu",
    "is_enabled",
    "linear",
    "native_ops_available",
    "outputs_private",
    "packed_linear",
    "set_enabled",
    "upsample_conv2d",
    "use_packed_kernels",
    "winograd_tile_size",
]

logger = logging.getLogger(__name__)

_state = {"enabled": True}
# module -> {tag: (key, packed weight, weakref to the source weight, sampled values)}. Weak, so that a packed copy
# never outlives its module and is never part of its state (no state-dict keys, no deep copies of opaque tensors).
_PACKED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
# module -> {tag: row count of the last call that did not match the packed copy's} (see `packed_linear`).
_ROW_MISSES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _has_ops(namespace, *names: str) -> bool:
    try:
        return all(hasattr(namespace, name) for name in names)
    except (RuntimeError, AttributeError):
        return False


_HAS_MKL_LINEAR = torch.backends.mkl.is_available() and _has_ops(
    torch.ops.mkl, "_mkl_linear", "_mkl_reorder_linear_weight"
)
_HAS_MKLDNN_CONV = torch.backends.mkldnn.is_available() and _has_ops(
    torch.ops.mkldnn, "_convolution_pointwise", "_reorder_convolution_weight"
)


def set_enabled(enabled: bool) -> None:
    """Turn the packed-weight kernels on or off for the whole process (on by default); off also frees the packed
    copies."""
    _state["enabled"] = bool(enabled)
    if not enabled:
        clear_cache()


def is_enabled() -> bool:
    return _state["enabled"]


@contextlib.contextmanager
def use_packed_kernels(enabled: bool):
    """Context manager form of [`set_enabled`], e.g. to count FLOPs with the plain ops."""
    previous = _state["enabled"]
    set_enabled(enabled)
    try:
        yield
    finally:
        set_enabled(previous)


_winograd = threading.local()  # .tile: this thread's Winograd output tile size (see `winograd_tile_size`)


@contextlib.contextmanager
def winograd_tile_size(size: int):
    """Within the block (in this thread), the Winograd 3x3 convolutions of [`conv2d`] and [`conv2d_add_`] compute
    `size` x `size` output tiles:

    * 2, the default: F(2x2, 3x3), 2.25x fewer multiply-adds than the direct convolution and closer to a float64
      result than it (its transforms only add, subtract and halve);
    * 4: F(4x4, 3x3), 4x fewer multiply-adds, 1.4-1.6x faster than F(2x2, 3x3) at the VQGAN encoder's shapes, with
      about 10x the rounding error of a direct float32 convolution (relative RMS ~2e-6 against ~2.5e-7: its
      transforms scale by up to 8). For results that need speed more than the last bits, such as
      [`MageVQModel.encode`]'s `channels_last` path of the training scripts.
    """
    if size not in (2, 4):
        raise ValueError(f"the Winograd tile size must be 2 or 4, got {size!r}")
    previous = _winograd_tile()
    _winograd.tile = size
    try:
        yield
    finally:
        _winograd.tile = previous


def _winograd_tile() -> int:
    """This thread's Winograd output tile size: 2 unless within [`winograd_tile_size`]."""
    return getattr(_winograd, "tile", 2)


def _module_ok(module: nn.Module, kind: type) -> bool:
    if not _state["enabled"] or type(module) is not kind:
        return False
    # Hooks (and accelerate's replaced `forward`) must run, so hooked modules take the ordinary call.
    if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
        return False
    return not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def outputs_private(*modules: nn.Module) -> bool:
    """Whether no forward hook can hold on to what `modules` return (none of them has one, and there is no global
    one): only then may a later op overwrite their output in place. A hook that records an output (feature capture,
    interpretability tools) must see the values the module returned."""
    if nn.modules.module._global_forward_hooks:
        return False
    return not any(module._forward_hooks for module in modules)


def _tensors_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not _state["enabled"] or type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter):
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != torch.float32):
        return False
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return False  # the packed kernels have no backward
    if torch.is_autocast_enabled("cpu"):
        return False  # autocast casts the plain ops' inputs; these kernels would compute in float32 regardless
    # Compilers pack weights themselves (and must not trace through the cache).
    return not _compiling()


def _compiling() -> bool:
    """Inside `torch.compile`, TorchScript or tracing: the packed weights and native ops stay out of those graphs
    (compilers pack weights and fuse dropout themselves)."""
    return torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing()


def _drop_threshold(p: float) -> int:
    """The 16-bit drop threshold of dropout probability `p`: an element whose 16-bit draw lies below it is dropped,
    so P(drop) = drop / 2^16 (0 or 65536 when `p` is too close to 0 or 1 for 16 bits)."""
    return round(p * 65536)


def _keep_scale(drop: int) -> float:
    """The scale of kept values for the 16-bit drop threshold `drop` (P(drop) = drop / 2^16): the inverse of the
    exact keep probability, so the expected value is unchanged."""
    return 65536 / (65536 - drop)


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    # Few values: the source weight is otherwise never read (the packed copy is), so every sampled value is a cold
    # page, and on the 2-vCPU VMs this project runs on that costs ~5 us each (32 values were 1.5% of a B=4 step).
    flat = weight.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 4)].clone()  # 4 values spread over the tensor


def _packed(owner: nn.Module, tag: str, source: torch.Tensor, weight: torch.Tensor, key: tuple, pack) -> torch.Tensor:
    """The packed copy of `weight` (which is `source` or a view of it) for `owner`/`tag`, rebuilt unless `source` is
    the same tensor object, with the same storage, version, shape and a few sampled values (writes through `.data`
    bypass the version counter; loading or averaging weights that way still changes the sampled values, a write to
    part of the weight may not, see the module docstring)."""
    cache = _PACKED.setdefault(owner, {})
    entry = cache.get(tag)
    key = key + (source.data_ptr(), source._version)
    if entry is not None:
        old_key, packed, source_ref, fingerprint = entry
        if old_key == key and source_ref() is source and torch.equal(fingerprint, _fingerprint(weight)):
            return packed
    with torch.no_grad():
        cache[tag] = (key, pack(), weakref.ref(source), _fingerprint(weight))
    return cache[tag][1]


def clear_cache() -> None:
    """Drop every packed weight (they are rebuilt on the next call)."""
    _PACKED.clear()
    _ROW_MISSES.clear()


def packed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    owner: nn.Module,
    tag: str,
    source: torch.Tensor | None = None,
    pack: bool = True,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; on the CPU without autograd, MKL's sgemm on a copy of `weight` packed once per
    number of rows and kept for `owner` under `tag`. `source` is the parameter `weight` is taken from when it is a
    view or a detached copy made for this call (it tells whether the packed copy is still current). `pack=False`
    is for inputs whose number of rows changes from call to call: a copy packed for one number does not serve
    another, and re-packing on every call costs more than it saves (mostly in fresh memory), so they take the plain
    op."""
    rows = x.numel() // x.shape[-1] if x.ndim >= 2 else 0
    if not (pack and _HAS_MKL_LINEAR and rows > 0 and _tensors_ok(x, weight, bias)):
        return F.linear(x, weight, bias)
    # The packing is specific to the number of rows. A row count that differs from the packed one only once in a
    # row takes the plain op instead of re-packing: batched sampling computes its first step once for all the
    # identical rows (`masked_logits`) and the other steps at the full batch, and re-packing twice per call cost
    # 1% of a batch-4 sampling run. Two calls in a row with the new count re-pack.
    entry = _PACKED.get(owner, {}).get(tag)
    misses = _ROW_MISSES.setdefault(owner, {})
    if entry is not None and entry[0][0] != rows and misses.get(tag) != rows:
        misses[tag] = rows
        return F.linear(x, weight, bias)
    misses.pop(tag, None)
    source = weight if source is None else source
    weight = weight.detach()
    key = (rows, weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()))
    packed = _packed(
        owner, tag, source, weight, key, lambda: torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), rows)
    )
    return torch.ops.mkl._mkl_linear(x, packed, weight, _detached(bias), rows)


def linear(module: nn.Linear, x: torch.Tensor, pack: bool = True) -> torch.Tensor:
    """`module(x)`, through [`packed_linear`] when the module is a plain, hook-free `nn.Linear` (and `pack`: see
    there)."""
    if not (pack and _module_ok(module, nn.Linear)):
        return module(x)
    return packed_linear(x, module.weight, module.bias, module, "weight")


def _conv_ok(module: nn.Conv2d, x: torch.Tensor) -> bool:
    return (
        _HAS_MKLDNN_CONV
        and torch.backends.mkldnn.enabled
        and x.ndim == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and _module_ok(module, nn.Conv2d)
        and _tensors_ok(x, module.weight, module.bias)
    )


def conv2d(module: nn.Conv2d, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`module(x)`; on the CPU without autograd and for channels-last input, the native Winograd kernel for 3x3
    convolutions it takes (see the module docstring), and oneDNN with a weight reordered once per input shape for
    the others. `out`: a spare tensor the result may be written into (zeroed, then the convolution's fused sum
    adds into it; see [`conv2d_add_`]), so that no new activation is made; it is used only when it has the output's
    shape and layout. Always use the returned tensor."""
    if not _conv_ok(module, x):
        return module(x)
    if _winograd_ok(module):
        if out is None or not _is_sum_target(module, x, out):
            out = torch.empty((x.shape[0], module.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device,
                              memory_format=torch.channels_last)
        return torch.ops.mage_hf.winograd_conv3x3_(x, _winograd_packed(module), _detached(module.bias), out, False)
    if out is not None and _is_sum_target(module, x, out):
        return conv2d_add_(module, x, out.zero_())  # conv(x) + 0: the convolution's values
    packed, padding, stride, dilation = _packed_conv(module, x)
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, _detached(module.bias), padding, stride, dilation, module.groups, "none", [], ""
    )


def _is_sum_target(module: nn.Conv2d, x: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether oneDNN can add `module(x)` into `target` in place: the output's shape (so the convolution keeps the
    input's height and width), dtype and channels-last layout, not `x` itself, and no autograd graph needs it."""
    same_size = module.stride == (1, 1) and all(
        2 * p == d * (k - 1) for p, d, k in zip(module.padding, module.dilation, module.kernel_size)
    )
    return (
        same_size
        and type(target) is torch.Tensor
        and target.dtype == x.dtype
        and target.shape == (x.shape[0], module.out_channels, *x.shape[2:])
        and target.is_contiguous(memory_format=torch.channels_last)
        and not (torch.is_grad_enabled() and target.requires_grad)
        and target.data_ptr() != x.data_ptr()
    )


def conv2d_add_(module: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """`module(x) + residual`. On the fast path of [`conv2d`] the sum is formed by the convolution (the Winograd
    kernel's output transform, or oneDNN's fused post-op) and written into `residual` (no new activation, no separate
    pass), so `residual` must be a buffer the caller no longer needs."""
    if not (_conv_ok(module, x) and _is_sum_target(module, x, residual)):
        return module(x).add_(residual)  # a fresh convolution output, so the in-place sum is autograd-safe
    if _winograd_ok(module):
        return torch.ops.mage_hf.winograd_conv3x3_(x, _winograd_packed(module), _detached(module.bias), residual, True)
    packed, padding, stride, dilation = _packed_conv(module, x)
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        residual, x, packed, _detached(module.bias), padding, stride, dilation, module.groups, "add", None, None, [],
        None,
    )


_WINOGRAD_MIN_CHANNELS = 64  # with fewer, the 16 matmuls per block are too thin to beat oneDNN's direct kernel
# The filter transforms G of F(2x2, 3x3) (entries exact in binary floating point) and of F(4x4, 3x3) (points 0, +-1,
# +-2 and infinity), by output tile size; `csrc/cpu_ops.cpp` holds the matching input and output transforms.
_WINOGRAD_G = {
    2: ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    4: (
        (1 / 4, 0.0, 0.0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0.0, 0.0, 1.0),
    ),
}


def _winograd_ok(module: nn.Conv2d) -> bool:
    """Whether a convolution that passed [`_conv_ok`] is one the Winograd kernel computes: 3x3, stride 1, padding 1,
    no dilation or groups, at least 64 channels in and out, and the native kernels built."""
    return (
        module.kernel_size == (3, 3)
        and module.stride == (1, 1)
        and module.padding == (1, 1)
        and module.dilation == (1, 1)
        and module.groups == 1
        and min(module.in_channels, module.out_channels) >= _WINOGRAD_MIN_CHANNELS
        and native_ops_available()
    )


def _winograd_weight(weight: torch.Tensor, tile: int = 2) -> torch.Tensor:
    """The transformed filters `u = G g G^T` of a 3x3 `weight` `(C_out, C_in, 3, 3)` for `tile` x `tile` output
    tiles, as the `(n^2, C_in, C_out)` right-hand sides of the kernel's n^2 matmuls (n = tile + 2; position `n a + b`
    of the n x n transform). Computed in float64 and rounded once."""
    g = torch.tensor(_WINOGRAD_G[tile], dtype=torch.float64)
    n = g.shape[0]
    u = torch.einsum("ay,oiyx,bx->abio", g, weight.double(), g)  # (n, n, C_in, C_out)
    return u.reshape(n * n, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _winograd_packed(module: nn.Conv2d) -> torch.Tensor:
    """The cached filter transform for this thread's tile size (see [`winograd_tile_size`])."""
    tile = _winograd_tile()
    weight = module.weight.detach()
    key = ("winograd", tile, tuple(weight.shape))  # the transform does not depend on the input's shape
    return _packed(module, f"winograd{tile}_weight", module.weight, weight, key, lambda: _winograd_weight(weight, tile))


def upsample_conv2d(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`module(F.interpolate(x, scale_factor=2.0, mode="nearest"))` for a 3x3 convolution with stride 1, padding 1
    (the VQGAN decoder's up-sampling). On the fast path of [`conv2d`] it is computed as a sub-pixel convolution: each
    of the four output phases (even or odd row, even or odd column) of a 3x3 convolution over a nearest-neighbour
    up-sampled image reads only a 2x2 neighbourhood of `x`, with the 3x3 taps that land on the same pixel of `x`
    summed. So one 2x2 convolution of `x` with 4x the output channels (padding 1: output `(H + 1, W + 1)`), whose
    phases are then interleaved into the `(2H, 2W)` output, does 16 instead of 36 multiply-adds per input pixel and
    output channel, and the up-sampled image is never made. Results differ from the plain ops by the rounding of the
    summed taps (~1e-6 relative)."""
    if not (
        _conv_ok(module, x)
        and module.kernel_size == (3, 3)
        and module.stride == (1, 1)
        and module.padding == (1, 1)
        and module.dilation == (1, 1)
        and module.groups == 1
    ):
        return conv2d(module, F.interpolate(x, scale_factor=2.0, mode="nearest"))
    batch, _, height, width = x.shape
    channels = module.out_channels
    weight = module.weight.detach()
    key = ("subpixel", tuple(x.shape), tuple(weight.shape))
    packed = _packed(
        module,
        "subpixel_weight",
        module.weight,
        weight,
        key,
        lambda: torch.ops.mkldnn._reorder_convolution_weight(
            _subpixel_weight(weight), [1, 1], [1, 1], [1, 1], 1, list(x.shape)
        ),
    )
    bias = None if module.bias is None else module.bias.detach().repeat(4)  # the same bias for every phase
    # (B, 4 C, H + 1, W + 1), channels last: phase (a, b) in channels (2a + b) C onwards, with its row i at i + a
    # and its column j at j + b
    phases = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
    out = torch.empty((batch, channels, 2 * height, 2 * width), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    s_batch, _, s_row, s_col = phases.stride()
    # out[b, :, 2i + a, 2j + b'] = phases[b, (2a + b') C + c, i + a, j + b'], as one strided copy in NHWC order:
    # (B, H, 2, W, 2, C) over the phases, the phase offset folded into the row and column strides.
    interleaved = phases.as_strided(
        (batch, height, 2, width, 2, channels), (s_batch, s_row, s_row + 2 * channels, s_col, s_col + channels, 1)
    )
    out.permute(0, 2, 3, 1).view(batch, height, 2, width, 2, channels).copy_(interleaved)
    return out


def _subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The 2x2 kernels `(4 C_out, C_in, 2, 2)` of the four phases of a 3x3 `weight` applied after nearest 2x
    up-sampling, phase `2a + b` for output rows of parity a and columns of parity b. With padding 1, tap 0 of an even
    output row reads the row above (the 3x3 kernel's row 0) and tap 1 the row itself (rows 1 and 2 land there); an
    odd row reads itself (rows 0 and 1) and the row below (row 2). Columns alike."""
    taps = weight.new_tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]])  # (parity, tap, 3x3 row)
    phases = torch.einsum("ary,oiyx,bsx->aboirs", taps, weight, taps)  # (2, 2, C_out, C_in, 2, 2)
    return phases.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).contiguous()


def _packed_conv(module: nn.Conv2d, x: torch.Tensor):
    weight = module.weight.detach()
    padding, stride, dilation = list(module.padding), list(module.stride), list(module.dilation)
    key = (tuple(x.shape), tuple(weight.shape))  # oneDNN picks its algorithm (and weight layout) per input shape
    packed = _packed(
        module,
        "weight",
        module.weight,
        weight,
        key,
        lambda: torch.ops.mkldnn._reorder_convolution_weight(
            weight.contiguous(), padding, stride, dilation, module.groups, list(x.shape)
        ),
    )
    return packed, padding, stride, dilation


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`F.silu(norm(x))`, returned. For float32 channels-last CPU input without autograd, the native kernel: two
    passes over the data instead of four (statistics; then normalise, scale, shift and swish together), written into
    `out` when it is given (a spare activation of `x`'s shape and layout, or `x` itself), so that no new activation
    is made. Its statistics are accumulated in double precision, so it agrees with float64 to ~1e-6, where torch's
    float32 group norm is off by up to ~5e-5. Otherwise the two torch ops, the swish in place unless autograd needs
    the norm's output, and `out` is not used: always use the returned tensor."""
    if (
        native_ops_available()
        and _module_ok(norm, nn.GroupNorm)
        and norm.affine
        and x.ndim == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and _tensors_ok(x, norm.weight, norm.bias)
        and norm.weight.is_contiguous()
        and norm.bias.is_contiguous()
        and x.shape[1] % norm.num_groups == 0
    ):
        if out is None or not (
            type(out) is torch.Tensor
            and out.shape == x.shape
            and out.dtype == x.dtype
            and out.device == x.device
            and out.is_contiguous(memory_format=torch.channels_last)
            and not (torch.is_grad_enabled() and out.requires_grad)
        ):
            out = torch.empty_like(x, memory_format=torch.channels_last)
        return torch.ops.mage_hf.group_norm_silu_out(
            x, norm.weight.detach(), norm.bias.detach(), norm.num_groups, norm.eps, out
        )
    h = norm(x)
    return F.silu(h, inplace=not (torch.is_grad_enabled() and h.requires_grad) and outputs_private(norm))


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


_SOURCE = Path(__file__).with_name("csrc") / "cpu_ops.cpp"
_NATIVE_OPS = (
    "dropout_mask_mul", "dropout_mask_mul_", "group_norm_silu_out", "attention_dropout_fwd", "attention_dropout_bwd",
    "sum_of_squares", "winograd_conv3x3_", "gelu_dropout", "gelu_dropout_backward",
)
_native = {"state": None}  # None: not tried yet; then True (loaded) or False (unavailable)
_native_lock = threading.Lock()


def _cpu_fingerprint() -> str:
    # The kernel is compiled for the build machine's instruction set (-march=native), and the build cache may be
    # shared between machines (a network home directory), so the CPU's feature flags are part of its name.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return flags or platform.processor() or platform.machine()


def native_ops_available() -> bool:
    """Whether the native CPU kernels (`csrc/cpu_ops.cpp`) are loaded, compiling them on the first call (a few
    seconds, then cached). False when `MAGE_HF_NATIVE_KERNELS=0` or when they cannot be built here (no C++ compiler,
    or a platform it does not support); the callers then use the pure-torch paths, and the first failure is logged
    once with its reason. They are compiled for this machine's instruction set (`-march=native`), or for the GCC
    `-march` value in `MAGE_HF_NATIVE_ARCH` (e.g. `haswell`: the AVX2 code paths, on any newer x86 CPU)."""
    if _native["state"] is None:
        with _native_lock:
            if _native["state"] is None:
                _native["state"] = _load_native()
    return _native["state"]


def _load_native() -> bool:
    if os.environ.get("MAGE_HF_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if all(hasattr(torch.ops.mage_hf, op) for op in _NATIVE_OPS):
        return True  # loaded already (by another copy of this module)
    # For the build machine's instruction set, or the one MAGE_HF_NATIVE_ARCH names (a GCC -march value, e.g.
    # "haswell": AVX2 code on an AVX-512 machine, to see what an AVX2 CPU runs).
    arch = os.environ.get("MAGE_HF_NATIVE_ARCH", "native").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", arch):
        logger.warning("mage_hf: MAGE_HF_NATIVE_ARCH=%r is not a -march value (such as native or haswell); the "
                       "native CPU kernels are not built, the pure-torch paths run instead.", arch)
        return False
    flags = ["-O3", f"-march={arch}", "-mprefer-vector-width=512", "-fopenmp"]
    key = "\n".join([_SOURCE.read_text(), torch.__version__, _cpu_fingerprint(), " ".join(flags)])
    name = "mage_hf_cpu_ops_" + hashlib.sha1(key.encode()).hexdigest()[:16]
    try:
        from torch.utils.cpp_extension import load

        # `-fopenmp` makes `at::parallel_for` use torch's OpenMP thread pool: the library is linked against
        # `libgomp.so.1`, which resolves to the copy torch has already loaded.
        load(name=name, sources=[str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 (no compiler, bad flags, a read-only cache...): fall back, say why
        logger.warning(
            "mage_hf: the native CPU kernels could not be built (%s: %s); training dropout uses the slower "
            "pure-torch path. Set MAGE_HF_NATIVE_KERNELS=0 to skip this attempt.",
            type(error).__name__, str(error).strip().splitlines()[-1] if str(error).strip() else "",
        )
        return False
    return all(hasattr(torch.ops.mage_hf, op) for op in _NATIVE_OPS)


def _random_int16(shape: torch.Size) -> torch.Tensor:
    """Uniform random int16 values (all 65536 equally likely) of `shape`, from numpy's SFC64 generator seeded by one
    draw from torch's default CPU generator: four values per 64-bit output, about 0.1 ns each."""
    numel = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    raw = np.random.SFC64(seed).random_raw((numel + 3) // 4)  # uint64
    return torch.from_numpy(raw).view(torch.int16)[:numel].view(shape)


class _NativeDropout(torch.autograd.Function):
    """x * mask * scale with the native kernel's counter-based mask; the backward pass applies the same mask,
    recomputed from the seed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, drop: int, scale: float) -> torch.Tensor:
        ctx.mask_args = (seed, drop, scale)
        return torch.ops.mage_hf.dropout_mask_mul(x.contiguous(), seed, drop, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.ops.mage_hf.dropout_mask_mul(grad.contiguous(), *ctx.mask_args), None, None, None


class _NativeDropoutInplace(_NativeDropout):
    """[`_NativeDropout`] written into `x` (autograd checks that no other node saved `x` for its backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, drop: int, scale: float) -> torch.Tensor:
        ctx.mask_args = (seed, drop, scale)
        ctx.mark_dirty(x)
        return torch.ops.mage_hf.dropout_mask_mul_(x, seed, drop, scale)


def dropout(x: torch.Tensor, p: float, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """`F.dropout(x, p, training, inplace)`, with the cheaper keep mask described in the module docstring for CPU
    tensors. `inplace` is a hint: the native kernel writes into a contiguous `x` (saving a fresh activation, which
    costs more than the pass itself on these machines), the other paths return a new tensor. As with `F.dropout`,
    only pass it for a tensor no autograd node has saved (autograd raises an error if one has)."""
    if not training or p == 0.0:
        return x
    if not (0.0 < p < 1.0) or not _state["enabled"] or x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training)
    if _compiling():
        return F.dropout(x, p, training)  # compilers fuse their own dropout
    drop = _drop_threshold(p)
    if drop in (0, 65536):
        return F.dropout(x, p, training)  # p too close to 0 or 1 for 16 bits
    scale = _keep_scale(drop)
    if x.dtype == torch.float32 and type(x) is torch.Tensor and native_ops_available():
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        if inplace and x.is_contiguous() and not x._is_view() and not x.is_leaf:
            return _NativeDropoutInplace.apply(x, seed, drop, scale)
        return _NativeDropout.apply(x, seed, drop, scale)
    # The keep mask in x's dtype, scaled by the inverse of the exact keep probability. (A bool mask would be
    # converted to floats on every use, forward and backward; bool -> float is a slow conversion on the CPU, while
    # the same bytes read as uint8 convert fast.)
    keep = (_random_int16(x.shape) >= drop - 32768).view(torch.uint8).to(x.dtype)
    return x * keep.mul_(scale)


class _NativeGeluDropout(torch.autograd.Function):
    """dropout(gelu(x)) in one pass with [`dropout`]'s mask; the backward pass recomputes GELU's derivative and the
    mask from `x` and the seed, also in one pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, drop: int, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.mask_args = (seed, drop, scale)
        return torch.ops.mage_hf.gelu_dropout(x, seed, drop, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return torch.ops.mage_hf.gelu_dropout_backward(grad.contiguous(), x, *ctx.mask_args), None, None, None


def gelu_dropout(x: torch.Tensor, p: float, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """`dropout(F.gelu(x), p, training)` with [`dropout`]'s mask (the MLP's hidden activations). In training, for a
    contiguous float32 CPU tensor, one native kernel does both in one pass, forward and backward (GELU's exact erf
    form, to about an ulp of torch's kernel; the dropout mask is the one [`dropout`] draws from the same seed), instead
    of two passes and an extra activation each way. Otherwise it is torch's GELU (the faster kernel for GELU alone),
    then [`dropout`]. `inplace` (for a fresh activation such as a linear layer's output): GELU then writes into `x`
    when no autograd graph records it, as in inference, saving a new activation."""
    drop = _drop_threshold(p) if training else 0
    native = (
        0 < drop < 65536 and _state["enabled"] and x.device.type == "cpu" and x.dtype == torch.float32
        and type(x) is torch.Tensor and x.is_contiguous() and not _compiling()
    )
    if native and native_ops_available():
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return _NativeGeluDropout.apply(x, seed, drop, _keep_scale(drop))
    if inplace and not (torch.is_grad_enabled() and x.requires_grad):
        hidden = torch.ops.aten.gelu_(x)  # the same values as F.gelu
    else:
        hidden = F.gelu(x)
    # In place: GELU's backward pass reads its input, not this output.
    return dropout(hidden, p, training, inplace=True)


_ATTENTION_MAX_TOKENS = 1100  # 1025 tokens = 512 px images; per thread at most 3 x 1100^2 floats (14.5 MB) are kept


class _NativeAttention(torch.autograd.Function):
    """softmax(scale q k^T), dropped out, times v, from the qkv projection's output `(B, N, 3 D)` to `(B, N, D)`; see
    [`attention`]."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, scale: float, seed: int, drop: int, keep_scale: float):
        out, stats = torch.ops.mage_hf.attention_dropout_fwd(qkv, heads, scale, seed, drop, keep_scale)
        ctx.save_for_backward(qkv, stats)
        ctx.args = (heads, scale, seed, drop, keep_scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative through the kernel raises, not silently zero
    def backward(ctx, grad: torch.Tensor):
        qkv, stats = ctx.saved_tensors
        grad_qkv = torch.ops.mage_hf.attention_dropout_bwd(grad.contiguous(), qkv, stats, *ctx.args)
        return grad_qkv, None, None, None, None, None


def attention(qkv: torch.Tensor, num_heads: int, scale: float, p: float) -> torch.Tensor | None:
    """Self-attention on the CPU, with dropout `p` on the probabilities (training; 0 in inference): `qkv` is the
    fused projection's output `(B, N, 3 D)` (q, k, v, each head after head), the result `(B, N, D)` (heads side by
    side), as `dropout(softmax(scale q k^T), p) @ v` with [`dropout`]'s mask for the `(B, H, N, N)` probabilities. None
    when the native kernel cannot take the case (the caller then uses SDPA or the explicit ops)."""
    if not (0.0 <= p < 1.0) or not _state["enabled"] or qkv.device.type != "cpu" or qkv.dtype != torch.float32:
        return None
    if type(qkv) is not torch.Tensor or qkv.dim() != 3 or _compiling():
        return None
    if qkv.shape[0] * num_heads < torch.get_num_threads():
        return None  # one task per (image, head): too few to keep every thread busy; the unfused ops split finer
    if qkv.shape[1] > _ATTENTION_MAX_TOKENS:
        return None  # each thread keeps up to three N x N buffers: past cache sizes they buy nothing
    drop = _drop_threshold(p)
    if drop == 65536 or not native_ops_available():
        return None
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if drop else 0
    return _NativeAttention.apply(qkv.contiguous(), num_heads, scale, seed, drop, _keep_scale(drop))


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`torch.nn.utils.get_total_norm(tensors)` (the 2-norm of all their elements together), for gradient clipping.
    For float32 CPU tensors the native kernel sums the squares in double precision at memory speed (torch's norm
    kernel reads about half as fast on these machines: 63 against 33 ms for a ViT-B's 146 M gradients); the result is
    the float64 norm rounded to float32. Other cases take torch's function."""
    tensors = [t for t in tensors if t is not None]
    plain = all(
        type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
        for t in tensors
    )
    if not (tensors and plain and _state["enabled"] and native_ops_available()) or torch.compiler.is_compiling():
        return torch.nn.utils.get_total_norm(tensors)
    return torch.tensor(math.sqrt(torch.ops.mage_hf.sum_of_squares(tensors)), dtype=torch.float32)
