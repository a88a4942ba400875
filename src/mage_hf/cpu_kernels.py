# Copyright 2026 The mage-hf authors. MIT licence.
"""CPU inference kernels with pre-packed weights, used by the MAGE transformer and its VQGAN decoder.

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
(another tensor, storage or version, or different values at 32 sampled positions, which catches writes through
`.data`); `set_enabled(False)` turns the mechanism off and frees the copies.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["clear_cache", "conv2d", "is_enabled", "linear", "packed_linear", "set_enabled", "use_packed_kernels"]

_state = {"enabled": True}
# module -> {tag: (key, packed weight, weakref to the source weight, sampled values)}. Weak, so that a packed copy
# never outlives its module and is never part of its state (no state-dict keys, no deep copies of opaque tensors).
_PACKED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


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
        _PACKED.clear()


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


def _module_ok(module: nn.Module, kind: type) -> bool:
    if not _state["enabled"] or type(module) is not kind:
        return False
    # Hooks (and accelerate's replaced `forward`) must run, so hooked modules take the ordinary call.
    if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
        return False
    return not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


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
    # Compilers pack weights themselves (and must not trace through the cache).
    return not (torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing())


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 32)].clone()  # 32 values spread over the tensor


def _packed(owner: nn.Module, tag: str, source: torch.Tensor, weight: torch.Tensor, key: tuple, pack) -> torch.Tensor:
    """The packed copy of `weight` (which is `source` or a view of it) for `owner`/`tag`, rebuilt unless `source` is
    the same tensor object, with the same storage, version, shape and a few sampled values (writes through `.data`
    bypass the version counter; loading or averaging weights that way still changes the sampled values)."""
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


def packed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    owner: nn.Module,
    tag: str,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; on the CPU without autograd, MKL's sgemm on a copy of `weight` packed once per
    number of rows and kept for `owner` under `tag`. `source` is the parameter `weight` is taken from when it is a
    view or a detached copy made for this call (it tells whether the packed copy is still current)."""
    rows = x.numel() // x.shape[-1] if x.ndim >= 2 else 0
    if not (_HAS_MKL_LINEAR and rows > 0 and _tensors_ok(x, weight, bias)):
        return F.linear(x, weight, bias)
    source = weight if source is None else source
    weight = weight.detach()
    # The packing is specific to the number of rows.
    key = (rows, weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()))
    packed = _packed(
        owner, tag, source, weight, key, lambda: torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), rows)
    )
    return torch.ops.mkl._mkl_linear(x, packed, weight, _detached(bias), rows)


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, through [`packed_linear`] when the module is a plain, hook-free `nn.Linear`."""
    if not _module_ok(module, nn.Linear):
        return module(x)
    return packed_linear(x, module.weight, module.bias, module, "weight")


def conv2d(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`; on the CPU without autograd and for channels-last input, oneDNN with a weight reordered once per
    input shape."""
    if not (
        _HAS_MKLDNN_CONV
        and torch.backends.mkldnn.enabled
        and x.ndim == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and _module_ok(module, nn.Conv2d)
        and _tensors_ok(x, module.weight, module.bias)
    ):
        return module(x)
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
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, _detached(module.bias), padding, stride, dilation, module.groups, "none", [], ""
    )


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()
