"""The packed-weight CPU kernels give the plain ops' results, fall back whenever they must, and never use a stale
packed weight."""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

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


@contextlib.contextmanager
def _threads(count: int):
    """torch's intra-op thread count set to `count` for the block, then restored."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def tiny_model_and_ids(seed: int) -> tuple[MageForMaskedImageModeling, torch.LongTensor]:
    """A tiny MAGE (weights from torch seed 0) and two rows of random codebook ids drawn with `seed`."""
    torch.manual_seed(0)
    model = MageForMaskedImageModeling(tiny_config())
    config = model.config
    ids = torch.randint(
        0, config.codebook_size, (2, config.num_image_tokens), generator=torch.Generator().manual_seed(seed)
    )
    return model, ids


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
        # A different number of rows never reuses the wrong packing: once, it takes the plain op (the packed copy is
        # kept for the usual count); twice in a row, it packs again.
        rows = x.numel() // 48
        assert torch.equal(cpu_kernels.linear(layer, x[:1]), layer(x[:1]))
        assert _PACKED[layer]["weight"][0][0] == rows
        torch.testing.assert_close(cpu_kernels.linear(layer, x), layer(x), rtol=1e-5, atol=1e-5)  # packed again
        assert torch.equal(cpu_kernels.linear(layer, x[:1]), layer(x[:1]))
        torch.testing.assert_close(cpu_kernels.linear(layer, x[:1]), layer(x[:1]), rtol=1e-5, atol=1e-5)
        assert _PACKED[layer]["weight"][0][0] == x[:1].numel() // 48
        # pack=False (row counts that change every call) takes the plain op and packs nothing.
        fresh = nn.Linear(48, 40, bias=bias)
        assert torch.equal(cpu_kernels.linear(fresh, x, pack=False), fresh(x)) and fresh not in _PACKED


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


@needs_mkldnn
@pytest.mark.parametrize(
    "batch,channels,height,width,bias", [(1, 8, 5, 7, True), (2, 16, 4, 4, False), (1, 32, 1, 3, True)]
)
def test_upsample_conv_as_sub_pixel_convolution_matches_float64(batch, channels, height, width, bias):
    """Nearest 2x up-sampling + 3x3 convolution, computed as one 2x2 convolution with four phases: against the same
    computation in float64, at least as close as the plain float32 ops (odd sizes, a single row, no bias)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
    reference = copy.deepcopy(conv).double()
    x = torch.randn(batch, channels, height, width).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = reference(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"))
        plain = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        out = cpu_kernels.upsample_conv2d(conv, x)
        assert "subpixel_weight" in _PACKED[conv]  # the sub-pixel path was taken
    assert out.shape == (batch, channels, 2 * height, 2 * width)
    assert out.is_contiguous(memory_format=torch.channels_last)
    plain_error = (plain.double() - expected).abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=max(2 * plain_error, 1e-6))


@needs_mkldnn
def test_upsample_conv_follows_weight_updates_and_falls_back():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)

    def plain():
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

    with torch.no_grad():
        cpu_kernels.upsample_conv2d(conv, x)
        conv.weight.data.mul_(-2.0)  # a write the version counter does not see
        torch.testing.assert_close(cpu_kernels.upsample_conv2d(conv, x), plain(), rtol=1e-5, atol=1e-5)
        # NCHW input and convolutions of another form take the plain ops
        nchw = cpu_kernels.upsample_conv2d(conv, x.contiguous())
        torch.testing.assert_close(nchw, plain(), rtol=1e-6, atol=1e-6)
        strided = nn.Conv2d(8, 8, 3, padding=1, stride=2)
        assert torch.equal(cpu_kernels.upsample_conv2d(strided, x),
                           cpu_kernels.conv2d(strided, F.interpolate(x, scale_factor=2.0, mode="nearest")))
        assert strided not in _PACKED or "subpixel_weight" not in _PACKED[strided]
    # with autograd: the plain ops, and gradients reach the weight
    out = cpu_kernels.upsample_conv2d(conv, x.requires_grad_())
    out.sum().backward()
    assert conv.weight.grad is not None and x.grad.shape == x.shape


needs_native = pytest.mark.skipif(not cpu_kernels.native_ops_available(), reason="the native kernels cannot be built here")


def _block_conv_inputs(channels: int, size: tuple[int, int], seed: int):
    """A bias-free 3x3 convolution as in the VQGAN's blocks, a channels-last batch of 2 and a residual for it."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    x = torch.randn(2, channels, *size, generator=g).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, channels, *size, generator=g).contiguous(memory_format=torch.channels_last)
    return conv, x, residual


@needs_mkldnn
@needs_native
@pytest.mark.parametrize(
    "batch,in_channels,out_channels,height,width,bias",
    [(1, 64, 64, 8, 8, True), (2, 64, 80, 7, 5, False), (1, 96, 64, 1, 3, True), (1, 128, 128, 32, 32, False),
     (2, 64, 64, 10, 13, True)],
)
def test_winograd_conv_matches_float64(batch, in_channels, out_channels, height, width, bias):
    """3x3 convolutions by Winograd's F(2x2, 3x3) and F(4x4, 3x3), at sides that are multiples of the tile and sides
    that are not (tiles hanging over the edge), a single row, with and without bias, against float64:
    F(2x2, 3x3) at least as close as oneDNN's direct float32 convolution up to a factor 2 (in practice closer);
    F(4x4, 3x3) within the error its documentation states (relative RMS below 4e-6 at these channel counts, largest
    error below 2e-5 of the output's scale; measured 1.1-1.6e-6 and 3-10e-6). A wrong transform entry gives errors
    of the output's own size."""
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
    x = torch.randn(batch, in_channels, height, width).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = copy.deepcopy(conv).double()(x.double())
        out = cpu_kernels.conv2d(conv, x)
        assert "winograd2_weight" in _PACKED[conv]  # the Winograd path was taken, with 2x2 tiles by default
        with cpu_kernels.winograd_tile_size(4):
            out4 = cpu_kernels.conv2d(conv, x)
        assert "winograd4_weight" in _PACKED[conv]
        with _winograd_off():
            direct = cpu_kernels.conv2d(copy.deepcopy(conv), x)
    for result in (out, out4):
        assert result.shape == (batch, out_channels, height, width)
        assert result.is_contiguous(memory_format=torch.channels_last)
    direct_error = (direct.double() - expected).abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=max(2 * direct_error, 1e-6))
    scale, rms = expected.abs().max().item(), expected.pow(2).mean().sqrt().item()
    error4 = out4.double() - expected
    assert error4.pow(2).mean().sqrt().item() < 4e-6 * rms
    assert error4.abs().max().item() < 2e-5 * scale


@needs_mkldnn
@needs_native
def test_winograd_tile_size_is_scoped_and_checked():
    conv, x, _ = _block_conv_inputs(64, (8, 8), seed=3)
    with torch.no_grad():
        with cpu_kernels.winograd_tile_size(4):
            with cpu_kernels.winograd_tile_size(2):
                cpu_kernels.conv2d(conv, x)
            assert set(_PACKED[conv]) == {"winograd2_weight"}
            cpu_kernels.conv2d(conv, x)
        assert set(_PACKED[conv]) == {"winograd2_weight", "winograd4_weight"}
        # The setting belongs to the thread that made it.
        seen = []
        with cpu_kernels.winograd_tile_size(4):
            worker = threading.Thread(target=lambda: seen.append(cpu_kernels._winograd_packed(conv).shape[0]))
            worker.start()
            worker.join()
        assert seen == [16]
    with pytest.raises(ValueError, match="must be 2 or 4"):
        with cpu_kernels.winograd_tile_size(3):
            pass


@contextlib.contextmanager
def _winograd_off():
    saved = cpu_kernels._winograd_ok
    cpu_kernels._winograd_ok = lambda module: False
    try:
        yield
    finally:
        cpu_kernels._winograd_ok = saved


@needs_mkldnn
@needs_native
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_conv_writes_into_spares_and_residuals_and_follows_weight_updates(tile):
    conv, x, residual = _block_conv_inputs(64, (9, 6), seed=5)
    # F(4x4, 3x3) rounds ~10x more than a direct convolution (see `test_winograd_conv_matches_float64`).
    tolerance = 1e-5 if tile == 2 else 1e-4
    with torch.no_grad(), cpu_kernels.winograd_tile_size(tile):
        plain = conv(x)
        out = cpu_kernels.conv2d(conv, x)
        assert f"winograd{tile}_weight" in _PACKED[conv]
        torch.testing.assert_close(out, plain, rtol=tolerance, atol=tolerance)
        spare = torch.full_like(residual, float("nan"))
        into = cpu_kernels.conv2d(conv, x, out=spare)
        assert into.data_ptr() == spare.data_ptr() and torch.equal(into, out)  # old contents ignored
        buffer = residual.clone()
        summed = cpu_kernels.conv2d_add_(conv, x, buffer)
        assert summed.data_ptr() == buffer.data_ptr()  # the sum went into the residual's memory
        assert torch.equal(summed, out + residual)  # and rounds like a separate add
        conv.weight.data.mul_(-0.5)  # a write the version counter does not see
        torch.testing.assert_close(cpu_kernels.conv2d(conv, x), conv(x), rtol=tolerance, atol=tolerance)
        for threads in (1, 2):  # block sizes follow the thread count; results agree to rounding
            with _threads(threads):
                torch.testing.assert_close(cpu_kernels.conv2d(conv, x), conv(x), rtol=tolerance, atol=tolerance)


@needs_mkldnn
@needs_native
def test_winograd_conv_declines_what_it_cannot_take():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for conv in (
            nn.Conv2d(64, 64, 3, padding=1, stride=2),
            nn.Conv2d(64, 64, 1),
            nn.Conv2d(64, 64, 3, padding=2, dilation=2),
            nn.Conv2d(64, 64, 3, padding=1, groups=2),
            nn.Conv2d(64, 32, 3, padding=1),  # too few output channels to pay
        ):
            torch.testing.assert_close(cpu_kernels.conv2d(conv, x), conv(x), rtol=1e-5, atol=1e-5)
            assert not any(tag.startswith("winograd") for tag in _PACKED.get(conv, {}))
        conv = nn.Conv2d(64, 64, 3, padding=1)
        cpu_kernels.conv2d(conv, x.contiguous())  # NCHW input: the module itself
        assert conv not in _PACKED
    out = cpu_kernels.conv2d(conv, x.requires_grad_())  # autograd: the module itself, and gradients flow
    out.sum().backward()
    assert conv not in _PACKED and conv.weight.grad is not None and x.grad.shape == x.shape
    # The op checks what it is given.
    u = cpu_kernels._winograd_weight(conv.weight.detach())
    with pytest.raises(RuntimeError, match="channels-last"):
        torch.ops.mage_hf.winograd_conv3x3_(x.detach().contiguous(), u, None, torch.empty_like(x), False)
    with pytest.raises(RuntimeError, match="transform of a 3x3 weight"):
        torch.ops.mage_hf.winograd_conv3x3_(x.detach(), u[:, :32], None, torch.empty_like(x), False)
    with pytest.raises(RuntimeError, match="16 or 36"):  # neither F(2x2, 3x3) nor F(4x4, 3x3)
        torch.ops.mage_hf.winograd_conv3x3_(x.detach(), torch.zeros(25, 64, 64), None, torch.empty_like(x), False)


def test_model_outputs_do_not_depend_on_the_packed_kernels():
    model, ids = tiny_model_and_ids(3)
    model.eval()
    config = model.config
    masked = ids.clone()
    masked[:, ::3] = config.mask_token_id
    grid = config.vq_config.grid_size
    results = {}
    for enabled in (False, True):
        with cpu_kernels.use_packed_kernels(enabled), torch.no_grad():
            results[enabled] = (model(input_ids=masked).logits, model.mage.vq_model.decode(ids.view(2, grid, grid)))
    for plain, packed in zip(results[False], results[True]):
        assert packed.is_contiguous()
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)  # logits
    # The decode: the native group norm accumulates its statistics in double precision, torch's in float32 (off by
    # up to ~5e-5 at 256x256), so both are held against a float64 decode, and the fast path must not be the worse.
    vq64 = copy.deepcopy(model.mage.vq_model).double()
    with torch.no_grad():
        exact = vq64.decode(ids.view(2, grid, grid))
    plain_error = (results[False][1].double() - exact).abs().max().item()
    fast_error = (results[True][1].double() - exact).abs().max().item()
    assert fast_error <= max(plain_error, 2e-6), (fast_error, plain_error)
    torch.testing.assert_close(results[True][1].double(), exact, rtol=1e-5, atol=1e-5)


@needs_mkldnn
def test_fused_conv_add_matches_conv_then_add_and_writes_into_the_residual():
    conv, x, residual = _block_conv_inputs(16, (12, 12), seed=4)  # 16 channels: oneDNN's fused sum
    with torch.no_grad():
        expected = cpu_kernels.conv2d(conv, x) + residual
        buffer = residual.clone()
        out = cpu_kernels.conv2d_add_(conv, x, buffer)
        assert out.data_ptr() == buffer.data_ptr()  # the sum went into the residual's memory
        assert torch.equal(out, expected)  # the fused post-op rounds like a separate add
    # With autograd the residual is left alone and gradients flow.
    residual.requires_grad_(True)
    out = cpu_kernels.conv2d_add_(conv, x, residual)
    out.sum().backward()
    assert torch.equal(residual.grad, torch.ones_like(residual)) and conv.weight.grad is not None


def test_inference_in_place_paths_match_the_autograd_path():
    """Without autograd the MLP's GELU and the residual sums are computed in place; with autograd they are not.
    The numbers are the same (the same matmul kernels in both modes: packed ones off)."""
    model, ids = tiny_model_and_ids(5)
    model.eval()
    ids[:, ::3] = model.config.mask_token_id
    with cpu_kernels.use_packed_kernels(False):
        with torch.no_grad():
            inference = model(input_ids=ids, output_hidden_states=True)
        tracked = model(input_ids=ids, output_hidden_states=True)
    assert tracked.logits.grad_fn is not None
    assert torch.equal(inference.logits, tracked.logits.detach())
    # Hidden states handed out are not overwritten by the in-place sums of later blocks.
    for a, b in zip(inference.encoder_hidden_states, tracked.encoder_hidden_states):
        assert torch.equal(a, b.detach())


def _can_build_native() -> bool:
    """Where the native kernels must build: Linux on x86-64 with a C++ compiler, unless turned off."""
    off = os.environ.get("MAGE_HF_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off")
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    return sys.platform == "linux" and platform.machine() == "x86_64" and compiler is not None and not off


@pytest.fixture(params=["native", "numpy"])
def dropout_path(request, monkeypatch):
    """Run a dropout test with the native kernel (which must build where `_can_build_native`) and with the
    pure-torch fallback."""
    if request.param == "native":
        if not cpu_kernels.native_ops_available():
            assert not _can_build_native(), "the native CPU kernels should build on this machine"
            pytest.skip("the native CPU kernels are not available here")
    else:
        monkeypatch.setitem(cpu_kernels._native, "state", False)
    return request.param


def test_native_kernels_build_where_expected():
    assert cpu_kernels.native_ops_available() == _can_build_native()


def test_native_kernels_fall_back_with_a_reason_when_they_cannot_build(tmp_path):
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    broken = tmp_path / "cpu_ops.cpp"
    broken.write_text("#include <torch/library.h>\nthis is not C++;\n")
    # In a fresh process: this one may have registered the real kernels already.
    script = f"""
import logging, pathlib, torch
from mage_hf import cpu_kernels
logging.basicConfig(level=logging.WARNING)
cpu_kernels._SOURCE = pathlib.Path({str(broken)!r})
assert cpu_kernels.native_ops_available() is False
x = torch.ones(100, requires_grad=True)
cpu_kernels.dropout(x, 0.5).sum().backward()  # the fallback path works
assert set(x.grad.unique().tolist()) <= {{0.0, 2.0}}
"""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "build"), "MAGE_HF_NATIVE_KERNELS": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "native CPU kernels could not be built" in run.stderr and "MAGE_HF_NATIVE_KERNELS=0" in run.stderr
    # Turned off: not even tried, and nothing is logged.
    env["MAGE_HF_NATIVE_KERNELS"] = "0"
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "could not be built" not in run.stderr


def _native_results() -> dict:
    """The vectorised native kernels on fixed inputs: dropout, GELU + dropout (both directions), group norm + swish
    and attention."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4099, generator=g) * 4  # not a multiple of any vector width: the scalar tails run too
    images = torch.randn(2, 40, 5, 7, generator=g).contiguous(memory_format=torch.channels_last)
    qkv = torch.randn(2, 37, 3 * 64, generator=g)
    gelu = torch.ops.mage_hf.gelu_dropout(x, 11, 6554, 1 / 0.9)
    norm = torch.ops.mage_hf.group_norm_silu_out(images, torch.ones(40), torch.zeros(40), 8, 1e-6,
                                                 torch.empty_like(images))
    return {
        "dropout": torch.ops.mage_hf.dropout_mask_mul(x, 7, 6554, 1 / 0.9),
        "gelu": gelu,
        "gelu_backward": torch.ops.mage_hf.gelu_dropout_backward(torch.ones_like(x), x, 11, 6554, 1 / 0.9),
        "group_norm_silu": norm,
        "attention": torch.ops.mage_hf.attention_dropout_fwd(qkv, 4, 0.125, 5, 6554, 1 / 0.9)[0],
    }


def test_native_kernels_built_for_another_instruction_set_compute_the_same(tmp_path):
    """MAGE_HF_NATIVE_ARCH=haswell builds the AVX2 code paths (8-float vectors) on any x86-64 machine; they agree
    with this machine's build: the same dropout masks, and values equal up to float32 rounding. A value that is not
    a -march name is refused with a warning, and the pure-torch paths run."""
    if not _can_build_native():
        pytest.skip("the native CPU kernels cannot be built here")
    assert cpu_kernels.native_ops_available()
    script = f"""
import torch, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from mage_hf import cpu_kernels
from test_cpu_kernels import _native_results
assert cpu_kernels.native_ops_available()
torch.save(_native_results(), {str(tmp_path / "haswell.pt")!r})
"""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "build"), "MAGE_HF_NATIVE_ARCH": "haswell"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "-march=haswell" in next((tmp_path / "build").glob("*/build.ninja")).read_text()
    theirs, ours = torch.load(tmp_path / "haswell.pt", weights_only=True), _native_results()
    for name, value in ours.items():
        assert torch.equal(theirs[name] == 0, value == 0), name  # the same elements dropped (or exactly zero)
        torch.testing.assert_close(theirs[name], value, rtol=1e-6, atol=1e-6, msg=name)
    env["MAGE_HF_NATIVE_ARCH"] = "native; rm -rf /"
    run = subprocess.run([sys.executable, "-c", "from mage_hf import cpu_kernels; "
                          "assert cpu_kernels.native_ops_available() is False"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "is not a -march value" in run.stderr


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_rate_scale_and_gradient(p, dropout_path):
    x = torch.ones(400, 1000, requires_grad=True)
    torch.manual_seed(0)
    out = cpu_kernels.dropout(x, p)
    dropped = round(p * 65536)
    scale = 65536 / (65536 - dropped)
    zero = out == 0
    # Every value is dropped or scaled by the inverse of the exact keep probability.
    assert torch.equal(out[~zero], torch.full_like(out[~zero], scale))
    # The drop rate is p (within 5 standard deviations of a binomial over 400k elements).
    rate, std = zero.float().mean().item(), (p * (1 - p) / x.numel()) ** 0.5
    assert abs(rate - dropped / 65536) < 5 * std
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the gradient passes through the same mask and scale


def test_native_dropout_masks_are_uniform_independent_and_thread_count_free():
    if not cpu_kernels.native_ops_available():
        assert not _can_build_native(), "the native CPU kernels should build on this machine"
        pytest.skip("the native CPU kernels are not available here")
    x = torch.ones(1000, 1003)  # not a multiple of 4 elements: the partial last block is drawn too
    torch.manual_seed(3)
    out = cpu_kernels.dropout(x, 0.25)
    zero = (out == 0).reshape(-1)
    # Each of the four 16-bit lanes of a draw drops at the rate, and neighbouring lanes are uncorrelated.
    lanes = zero[: zero.numel() // 4 * 4].reshape(-1, 4).float()
    std = (0.25 * 0.75 / lanes.shape[0]) ** 0.5
    assert torch.all((lanes.mean(0) - 0.25).abs() < 5 * std), lanes.mean(0)
    both = (lanes[:, 0] * lanes[:, 1]).mean().item()
    assert abs(both - 0.25**2) < 5 * (0.0625 * 0.9375 / lanes.shape[0]) ** 0.5
    assert zero[-3:].float().sum() < 3 or out.numel() % 4 == 0  # the tail is drawn, not all dropped
    # The mask is a function of the seed and the element index only, not of how the work is split.
    with _threads(1):
        torch.manual_seed(3)
        assert torch.equal(cpu_kernels.dropout(x, 0.25), out)


def test_native_dropout_in_place_and_non_contiguous_inputs(dropout_path):
    torch.manual_seed(0)
    base = torch.randn(64, 48, requires_grad=True)
    hidden = F.gelu(base * 2)  # GELU's backward reads its input, so its output may be dropped in place
    torch.manual_seed(5)
    expected = cpu_kernels.dropout(hidden.detach().clone(), 0.2)
    torch.manual_seed(5)
    out = cpu_kernels.dropout(hidden, 0.2, inplace=True)
    assert torch.equal(out.detach(), expected)
    if dropout_path == "native":
        assert out.data_ptr() == hidden.data_ptr()
    out.sum().backward()
    torch.manual_seed(5)
    mask = cpu_kernels.dropout(torch.ones_like(hidden), 0.2)  # the same draw: the scale where kept, 0 elsewhere
    reference = torch.autograd.grad(F.gelu(base * 2).mul(mask).sum(), base)[0]
    assert torch.equal(base.grad, reference)
    # A tensor some node saved for its backward (sigmoid's output) cannot be dropped in place: autograd says so.
    if dropout_path == "native":
        saved = torch.sigmoid(base)
        dropped = cpu_kernels.dropout(saved, 0.2, inplace=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            dropped.sum().backward()
    # Non-contiguous input: same mask as its contiguous copy.
    x = torch.randn(32, 40).t()
    torch.manual_seed(7)
    a = cpu_kernels.dropout(x, 0.1)
    torch.manual_seed(7)
    assert torch.equal(a, cpu_kernels.dropout(x.contiguous(), 0.1))


@pytest.mark.parametrize("shape", [(6, 37, 40), (1003,)])  # the second is not a multiple of 4 elements
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_gelu_dropout_is_gelu_then_dropout_forward_and_backward(shape, p, dropout_path):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).requires_grad_()  # well into both tails of GELU
    grad = torch.randn(shape)
    torch.manual_seed(11)
    out = cpu_kernels.gelu_dropout(x, p)
    out.backward(grad)
    torch.manual_seed(11)
    mask = cpu_kernels.dropout(torch.ones(shape), p)  # the same draw: the scale where kept, 0 elsewhere
    assert set(mask.unique().tolist()) <= {0.0, mask.max().item()} and 0 < (mask == 0).float().mean() < 1
    # Against float64 GELU with that mask: the same keep pattern, values and gradients to float32 rounding.
    x64 = x.detach().double().requires_grad_()
    expected = F.gelu(x64) * mask.double()
    expected.backward(grad.double())
    dropped = mask == 0
    kept = ~dropped & (x.detach().abs() < 5)  # GELU far below 0 may round to 0 (1 + erf cancels in torch's)
    assert torch.all(out.detach()[dropped] == 0) and torch.all(out.detach()[kept] != 0)
    if dropout_path == "native":
        torch.testing.assert_close(out.detach().double(), expected.detach(), rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-6, atol=1e-6)
    else:  # the fallback is torch's float32 GELU times that mask, exactly
        x32 = x.detach().clone().requires_grad_()
        reference = F.gelu(x32) * mask
        reference.backward(grad)
        assert torch.equal(out.detach(), reference.detach()) and torch.equal(x.grad, x32.grad)
    # The unfused path it replaces (torch's float32 GELU, then the same dropout) drops the same elements.
    torch.manual_seed(11)
    unfused = cpu_kernels.dropout(F.gelu(x.detach()), p)
    assert torch.all(unfused[dropped] == 0) and torch.all(unfused[kept] != 0)


def test_fused_gelu_dropout_thread_count_free_inference_and_fallbacks():
    _needs_native()
    x = torch.randn(64, 333)
    torch.manual_seed(2)
    two = cpu_kernels.gelu_dropout(x, 0.2)
    with _threads(1):
        torch.manual_seed(2)
        assert torch.equal(cpu_kernels.gelu_dropout(x, 0.2), two)
    # Exactly `dropout`'s mask, draw for draw: over 2^20 elements about 16 draws equal the threshold itself.
    ones = torch.ones(1 << 20)
    fused = torch.ops.mage_hf.gelu_dropout(ones, 9, 6554, 1.0)
    assert torch.equal(fused == 0, torch.ops.mage_hf.dropout_mask_mul(ones, 9, 6554, 1.0) == 0)
    # Inference (or p = 0): torch's GELU, in place only when asked and no graph records the tensor; no dropout.
    y = x.clone()
    assert torch.equal(cpu_kernels.gelu_dropout(y, 0.2, training=False), F.gelu(x)) and torch.equal(y, x)
    assert cpu_kernels.gelu_dropout(y, 0.2, training=False, inplace=True) is y and torch.equal(y, F.gelu(x))
    leaf = x.clone().requires_grad_()
    out = cpu_kernels.gelu_dropout(leaf, 0.0, inplace=True)
    assert torch.equal(out.detach(), F.gelu(x)) and torch.equal(leaf.detach(), x)
    # Other dtypes and non-contiguous input take GELU then `dropout`, with the same mask for the same seed.
    t = torch.randn(40, 32).t()
    torch.manual_seed(4)
    a = cpu_kernels.gelu_dropout(t, 0.3)
    torch.manual_seed(4)
    torch.testing.assert_close(a, cpu_kernels.gelu_dropout(t.contiguous(), 0.3), rtol=1e-6, atol=1e-6)
    assert cpu_kernels.gelu_dropout(x.double(), 0.3).dtype == torch.float64
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.mage_hf.gelu_dropout(x.double(), 1, 100, 1.0)
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.mage_hf.gelu_dropout_backward(torch.ones(3), x, 1, 100, 1.0)


def test_dropout_follows_torch_seed_and_generator_state(dropout_path):
    x = torch.randn(64, 64)
    torch.manual_seed(1)
    a = cpu_kernels.dropout(x, 0.1)
    state = torch.get_rng_state()
    b = cpu_kernels.dropout(x, 0.1)
    torch.set_rng_state(state)
    assert torch.equal(cpu_kernels.dropout(x, 0.1), b)  # a restored state (as on resume) repeats the mask
    torch.manual_seed(1)
    assert torch.equal(cpu_kernels.dropout(x, 0.1), a)
    assert not torch.equal(a, b)


def test_dropout_identity_and_fallbacks():
    x = torch.randn(8, 8)
    assert cpu_kernels.dropout(x, 0.1, training=False) is x
    assert cpu_kernels.dropout(x, 0.0) is x
    assert torch.equal(cpu_kernels.dropout(x, 1.0), torch.zeros_like(x))
    with cpu_kernels.use_packed_kernels(False):  # turned off: exactly F.dropout's draw
        torch.manual_seed(2)
        a = cpu_kernels.dropout(x, 0.2)
        torch.manual_seed(2)
        assert torch.equal(a, F.dropout(x, 0.2, True))
    ints = torch.arange(10)
    with pytest.raises(RuntimeError):
        cpu_kernels.dropout(ints, 0.5)  # as F.dropout: integer tensors are rejected


def test_training_forward_is_reproducible_from_the_seed():
    model, ids = tiny_model_and_ids(6)
    model.train()
    losses = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        losses.append(model(input_ids=ids, mask_ratio=0.6, generator=torch.Generator().manual_seed(0)).loss)
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])


def _wide_vq():
    """A small VQGAN whose levels are wide enough (64 and 128 channels) for the Winograd kernel."""
    from mage_hf import MageVQConfig, MageVQModel

    config = MageVQConfig(base_channels=64, channel_multiplier=[1, 2], num_res_blocks=1, num_embeddings=64,
                          embed_dim=16, resolution=32)
    return MageVQModel(config)


@needs_mkldnn
@pytest.mark.parametrize("width", ["tiny", "wide"])
def test_channels_last_encoder_agrees_with_the_standard_layout(width):
    """`encode(channels_last=True)` (the training scripts' tokenizer) rounds differently from the standard layout:
    latents agree to rounding, and an id differs only where its two nearest codes are nearly tied. The wide VQGAN's
    3x3 convolutions take the Winograd kernel with 4x4 tiles there (2x2 in the decode)."""
    torch.manual_seed(0)
    vq = (MageForMaskedImageModeling(tiny_config()).mage.vq_model if width == "tiny" else _wide_vq()).eval()
    size = vq.config.resolution
    pixels = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        standard = vq.encode(pixels)
        fast = vq.encode(pixels, channels_last=True)
        if width == "wide" and cpu_kernels.native_ops_available():
            encoder_conv, decoder_conv = vq.encoder.down[1].block[0].conv1, vq.decoder.up[1].block[0].conv1
            vq.decode(fast.token_ids)
            assert set(_PACKED[encoder_conv]) == {"winograd4_weight"}
            assert set(_PACKED[decoder_conv]) == {"winograd2_weight"}
    assert fast.latents.is_contiguous()
    # Rounding differences, grown through the convolutions and normalisations: ~4e-5 of the latents' scale here.
    scale = float(standard.latents.abs().max())
    assert float((fast.latents - standard.latents).abs().max()) < 1e-4 * scale
    flat = standard.latents.permute(0, 2, 3, 1).reshape(-1, standard.latents.shape[1])
    distances = torch.cdist(flat, vq.quantize.embedding.weight.detach()) ** 2  # (N, K)
    a, b = standard.token_ids.flatten(), fast.token_ids.flatten()
    gaps = distances.gather(1, b[:, None]) - distances.gather(1, a[:, None])
    assert float(gaps.abs().max()) < 1e-4


@pytest.mark.parametrize("shape", [(2, 64, 16, 16), (1, 96, 7, 5), (3, 32, 1, 1)])
def test_group_norm_silu_matches_float64_in_place_or_not_and_any_thread_count(shape):
    if not cpu_kernels.native_ops_available():
        assert not _can_build_native(), "the native CPU kernels should build on this machine"
        pytest.skip("the native CPU kernels are not available here")
    g = torch.Generator().manual_seed(0)
    norm = nn.GroupNorm(32, shape[1], eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.uniform_(-0.5, 0.5, generator=g)
    x = (torch.randn(shape, generator=g) * 3 + 5).contiguous(memory_format=torch.channels_last)  # mean >> spread
    exact = F.silu(F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-6))
    with torch.no_grad():
        out = cpu_kernels.group_norm_silu(norm, x)
        torch.testing.assert_close(out.double(), exact, rtol=2e-6, atol=2e-6)
        assert out.is_contiguous(memory_format=torch.channels_last) and out.data_ptr() != x.data_ptr()
        spare = torch.empty_like(x)
        assert cpu_kernels.group_norm_silu(norm, x, out=spare).data_ptr() == spare.data_ptr()
        assert torch.equal(spare, out)
        with _threads(1):
            assert torch.equal(cpu_kernels.group_norm_silu(norm, x), out)  # statistics summed in a fixed order
        inplace = x.clone(memory_format=torch.channels_last)
        assert cpu_kernels.group_norm_silu(norm, inplace, out=inplace).data_ptr() == inplace.data_ptr()
        assert torch.equal(inplace, out)
        wrong = torch.empty(1, 1, 1, 1)  # unusable spare: a new tensor instead
        assert torch.equal(cpu_kernels.group_norm_silu(norm, x, out=wrong), out)


def test_group_norm_silu_falls_back_to_torch_for_autograd_and_other_layouts():
    norm = nn.GroupNorm(8, 16)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    out = cpu_kernels.group_norm_silu(norm, x.contiguous(memory_format=torch.channels_last), out=torch.empty(0))
    assert out.grad_fn is not None  # autograd: the torch ops, and `out` unused
    torch.testing.assert_close(out, F.silu(norm(x)))
    with torch.no_grad():
        assert torch.equal(cpu_kernels.group_norm_silu(norm, x), F.silu(norm(x)))  # NCHW: the torch ops, exactly


@needs_mkldnn
def test_conv2d_into_a_spare_gives_the_convolution_and_makes_no_new_tensor():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
    x = torch.randn(2, 16, 12, 12, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = cpu_kernels.conv2d(conv, x)
        spare = torch.full((2, 24, 12, 12), float("nan")).contiguous(memory_format=torch.channels_last)
        out = cpu_kernels.conv2d(conv, x, out=spare)
        assert out.data_ptr() == spare.data_ptr()  # written into the spare (its old contents ignored)
        torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
        for unusable in (torch.empty(2, 24, 12, 11), torch.empty(2, 24, 12, 12)):  # wrong shape; NCHW layout
            result = cpu_kernels.conv2d(conv, x, out=unusable)
            assert result.data_ptr() != unusable.data_ptr() and torch.equal(result, plain)
        strided = nn.Conv2d(16, 24, 3, stride=2, padding=1)  # the output is smaller: no spare of the input's size
        assert cpu_kernels.conv2d(strided, x, out=spare).shape == (2, 24, 6, 6)


def test_vq_blocks_reuse_spares_without_changing_results():
    """The encoder and decoder hand spare activations from block to block in CPU inference; repeated calls and a
    call whose blocks get no spares give the same images and ids."""
    torch.manual_seed(0)
    vq = MageForMaskedImageModeling(tiny_config()).mage.vq_model.eval()
    ids = torch.randint(0, vq.config.num_embeddings, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first, second = vq.decode(ids), vq.decode(ids)
        assert torch.equal(first, second)
        assert torch.equal(vq.encode(images, channels_last=True).token_ids,
                           vq.encode(images, channels_last=True).token_ids)
        quantized = vq.quantize.lookup(ids).contiguous(memory_format=torch.channels_last)
        decoder = vq.decoder
        h = cpu_kernels.conv2d(decoder.conv_in, quantized)
        h = decoder.mid["block_2"](decoder.mid["block_1"](h))  # no scratch list: every block allocates
        for i in reversed(range(len(decoder.up))):
            for block in decoder.up[i].block:
                h = block(h)
            if i != 0:
                h = decoder.up[i].upsample(h)
        h = cpu_kernels.group_norm_silu(decoder.norm_out, h)
        torch.testing.assert_close(cpu_kernels.conv2d(decoder.conv_out, h).contiguous(), first, rtol=1e-6, atol=1e-6)


def _needs_native():
    if not cpu_kernels.native_ops_available():
        assert not _can_build_native(), "the native CPU kernels should build on this machine"
        pytest.skip("the native CPU kernels are not available here")


def _unfused_attention(qkv: torch.Tensor, heads: int, scale: float, p: float, keep=None) -> torch.Tensor:
    """The op-by-op attention of the model's explicit path: `cpu_kernels.dropout` on the probabilities, or `keep` (the
    scaled keep mask, e.g. for a float64 reference) when given."""
    batch, seq_len, width = qkv.shape
    q, k, v = qkv.reshape(batch, seq_len, 3, heads, width // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
    weights = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
    weights = weights * keep if keep is not None else cpu_kernels.dropout(weights, p, p > 0)
    return (weights @ v).transpose(1, 2).reshape(batch, seq_len, width // 3)


@pytest.mark.parametrize(
    "batch,seq_len,width,heads", [(2, 37, 96, 3), (3, 17, 64, 4), (1, 2, 32, 2), (1, 257, 128, 2), (2, 9, 24, 3)]
)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_native_attention_matches_float64_and_the_op_by_op_path_with_the_same_mask(batch, seq_len, width, heads, p):
    _needs_native()
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(batch, seq_len, 3 * width, generator=g) * 2).requires_grad_()  # sharp softmaxes
    grad = torch.randn(batch, seq_len, width, generator=g)
    scale = (width // heads) ** -0.5
    # The keep mask the kernel draws after this seed: `cpu_kernels.dropout`'s for the (B, H, N, N) probabilities.
    torch.manual_seed(5)
    keep = cpu_kernels.dropout(torch.ones(batch, heads, seq_len, seq_len), p, p > 0).double()
    exact_in = qkv.detach().double().requires_grad_()
    exact = _unfused_attention(exact_in, heads, scale, p, keep=keep)
    (exact * grad.double()).sum().backward()
    results = []
    for fn in (_unfused_attention, cpu_kernels.attention):
        torch.manual_seed(5)
        out = fn(qkv, heads, scale, p)
        (out * grad).sum().backward()
        results.append((out.detach(), qkv.grad))
        qkv.grad = None
    (ref, ref_grad), (out, out_grad) = results
    assert out.shape == (batch, seq_len, width) and out_grad.shape == qkv.shape
    # Float32 rounding only (measured: 4e-6 on outputs of ~2 and 1e-5 on gradients of ~12, as the op-by-op path).
    out_tol, grad_tol = 4e-6 * exact.abs().max().item(), 4e-6 * exact_in.grad.abs().max().item()
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=out_tol)
    torch.testing.assert_close(out_grad.double(), exact_in.grad, rtol=0, atol=grad_tol)
    torch.testing.assert_close(ref.double(), exact, rtol=0, atol=out_tol)  # the mask is the one the ops draw
    torch.testing.assert_close(ref_grad.double(), exact_in.grad, rtol=0, atol=grad_tol)
    if p and keep.numel() > 1000:  # enough draws that some are dropped: the mask was applied
        assert (keep == 0).any() and not torch.equal(out, _unfused_attention(qkv.detach(), heads, scale, 0.0))


def test_native_attention_is_thread_count_free():
    _needs_native()
    qkv = torch.randn(2, 23, 3 * 48, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    with _threads(1):  # one task per (image, head), each on one thread: the split cannot change a value
        torch.manual_seed(2)
        one = cpu_kernels.attention(qkv, 4, 12**-0.5, 0.2)
    with _threads(max(2, threads)):
        torch.manual_seed(2)
        assert torch.equal(cpu_kernels.attention(qkv, 4, 12**-0.5, 0.2), one)


def test_native_attention_declines_what_it_cannot_take():
    qkv = torch.randn(2, 5, 3 * 32)
    assert cpu_kernels.attention(qkv.double(), 2, 0.25, 0.1) is None  # float32 only
    assert cpu_kernels.attention(qkv, 2, 0.25, 1.0) is None
    with cpu_kernels.use_packed_kernels(False):
        assert cpu_kernels.attention(qkv, 2, 0.25, 0.1) is None
    with _threads(8):
        assert cpu_kernels.attention(qkv, 2, 0.25, 0.1) is None  # 4 (image, head) tasks cannot keep 8 threads busy
    long = torch.randn(2, cpu_kernels._ATTENTION_MAX_TOKENS + 1, 3 * 8)
    assert cpu_kernels.attention(long, 2, 0.5, 0.1) is None  # its N x N buffers would outgrow any cache
    if cpu_kernels.native_ops_available():
        x = qkv.clone().requires_grad_()
        (grad,) = torch.autograd.grad(cpu_kernels.attention(x, 2, 0.25, 0.0).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
            grad.sum().backward()  # no silent zero second derivative
        with pytest.raises(RuntimeError, match="not 3 x heads"):
            torch.ops.mage_hf.attention_dropout_fwd(qkv, 5, 0.25, 0, 0, 1.0)


def test_model_training_step_is_the_same_with_native_or_op_by_op_attention():
    """In training on the CPU the SDPA configuration takes the native kernel and the eager one the explicit ops; both
    draw the same dropout masks from the same seed, so loss and gradients agree to rounding."""
    _needs_native()
    model, ids = tiny_model_and_ids(0)
    model.train()
    results = {}
    for attn in ("sdpa", "eager"):
        model.config._attn_implementation = attn
        model.zero_grad()
        torch.manual_seed(7)
        loss = model(input_ids=ids).loss
        loss.backward()
        results[attn] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss_a, grads_a), (loss_b, grads_b) = results["sdpa"], results["eager"]
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_total_norm_is_the_float64_norm_and_thread_count_free():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(300, 700, generator=g) * 10, torch.randn(5, generator=g), torch.randn(1, 3, generator=g)]
    exact = torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))
    norm = cpu_kernels.total_norm(tensors)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    torch.testing.assert_close(norm.double(), exact, rtol=1e-7, atol=0)  # float32 rounding of the exact norm
    torch.testing.assert_close(norm, torch.nn.utils.get_total_norm(tensors), rtol=1e-4, atol=0)
    with _threads(1):
        one = cpu_kernels.total_norm(tensors)
    assert torch.equal(one, norm)
    # Other dtypes and layouts take torch's function.
    half = [t.half() for t in tensors[1:]]
    assert torch.equal(cpu_kernels.total_norm(half), torch.nn.utils.get_total_norm(half))
    strided = [tensors[0].t()]
    assert torch.equal(cpu_kernels.total_norm(strided), torch.nn.utils.get_total_norm(strided))


def test_clip_grad_norm_clips_like_torch_and_leaves_small_gradients_untouched():
    from mage_hf.training_utils import clip_grad_norm_

    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(40, 30)), nn.Parameter(torch.zeros(30))]
    grads = [torch.randn(40, 30, generator=g), torch.randn(30, generator=g)]
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    for p, r, grad in zip(params, reference, grads):
        p.grad, r.grad = grad.clone(), grad.clone()
    norm = clip_grad_norm_(params, 3.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(reference, 3.0)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
    assert norm > 3.0
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-7)
    total = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    assert abs(total.item() - 3.0) < 1e-5  # clipped to the bound
    before = [p.grad.clone() for p in params]
    clip_grad_norm_(params, 10.0)  # within bounds: not even multiplied by 1
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
