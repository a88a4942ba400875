"""The packed-weight CPU kernels give the plain ops' results, fall back whenever they must, and never use a stale
packed weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mage_hf import MageForMaskedImageModeling, cpu_kernels
from mage_hf.cpu_kernels import _HAS_MKL_LINEAR, _HAS_MKLDNN_CONV, _PACKED

from test_modeling import tiny_config

needs_mkl = pytest.mark.skipif(not _HAS_MKL_LINEAR, reason="this torch build has no MKL packed sgemm")
needs_mkldnn = pytest.mark.skipif(not _HAS_MKLDNN_CONV, reason="this torch build has no oneDNN convolution")


@pytest.fixture(autouse=True)
def _enabled():
    with cpu_kernels.use_packed_kernels(True):
        yield


@needs_mkl
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_the_plain_op(shape, bias):
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(48, 40, bias=bias)
    x = torch.randn(*shape, generator=g)
    with torch.no_grad():
        out = cpu_kernels.linear(layer, x)
        assert layer in _PACKED  # the fast path was taken
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        # A different number of rows packs again rather than reusing the wrong packing.
        torch.testing.assert_close(cpu_kernels.linear(layer, x[:2]), layer(x[:2]), rtol=1e-5, atol=1e-5)


@needs_mkl
def test_no_stale_packed_weight_after_any_kind_of_update():
    layer = nn.Linear(32, 16)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu_kernels.linear(layer, x)
        layer.weight.add_(1.0)  # in place: bumps the version counter
        torch.testing.assert_close(cpu_kernels.linear(layer, x), layer(x))
        layer.weight.data.mul_(-0.5)  # through .data: no version bump, caught by the sampled values
        torch.testing.assert_close(cpu_kernels.linear(layer, x), layer(x))
        layer.load_state_dict({"weight": torch.randn(16, 32), "bias": torch.randn(16)})
        torch.testing.assert_close(cpu_kernels.linear(layer, x), layer(x))
        layer.weight = nn.Parameter(torch.randn(16, 32))  # a new tensor object
        torch.testing.assert_close(cpu_kernels.linear(layer, x), layer(x))


def test_falls_back_for_autograd_hooks_and_other_dtypes():
    layer = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    out = cpu_kernels.linear(layer, x)  # grad mode, trainable weight: the plain module
    assert out.grad_fn is not None and layer not in _PACKED
    calls = []
    layer.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        cpu_kernels.linear(layer, x)
    assert calls == [1] and layer not in _PACKED  # the hook ran, so the plain call was taken
    half = nn.Linear(8, 8).to(torch.bfloat16)
    with torch.no_grad():
        assert cpu_kernels.linear(half, x.bfloat16()).dtype == torch.bfloat16 and half not in _PACKED


@needs_mkldnn
def test_packed_conv_matches_the_plain_op_on_channels_last_input():
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    x = torch.randn(2, 16, 12, 12, generator=g)
    with torch.no_grad():
        cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(cpu_kernels.conv2d(conv, cl), conv(x), rtol=1e-5, atol=1e-5)
        assert conv in _PACKED
        conv.weight.data.mul_(2.0)
        torch.testing.assert_close(cpu_kernels.conv2d(conv, cl), conv(x), rtol=1e-5, atol=1e-5)
        other = nn.Conv2d(16, 24, 3, padding=1)
        other(x)
        cpu_kernels.conv2d(other, x)  # NCHW input: the plain convolution
        assert other not in _PACKED


def test_model_outputs_do_not_depend_on_the_packed_kernels():
    torch.manual_seed(0)
    model = MageForMaskedImageModeling(tiny_config()).eval()
    config = model.config
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, config.codebook_size, (2, config.num_image_tokens), generator=generator)
    masked = ids.clone()
    masked[:, ::3] = config.mask_token_id
    grid = config.vq_config.grid_size
    results = {}
    for enabled in (False, True):
        with cpu_kernels.use_packed_kernels(enabled), torch.no_grad():
            results[enabled] = (model(input_ids=masked).logits, model.mage.vq_model.decode(ids.view(2, grid, grid)))
    for plain, packed in zip(results[False], results[True]):
        assert packed.is_contiguous()
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
