"""The benchmark scripts run (on a tiny model, for a step or two) and count FLOPs correctly. Timings are not
checked here: they take minutes on the real shapes and are reported by the scripts themselves."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_sampler  # noqa: E402
import bench_training  # noqa: E402
from bench_utils import (  # noqa: E402
    Row,
    count_flops,
    count_flops_by_kind,
    format_table,
    is_malloc_variable,
    machine_header,
    tiny_config,
    winograd_savings,
)

from mage_hf import MageForMaskedImageModeling, cpu_kernels  # noqa: E402


@pytest.mark.skipif(not cpu_kernels.native_ops_available(), reason="the native kernels cannot be built here")
def test_winograd_savings_are_the_direct_products_the_kernel_skips():
    conv = torch.nn.Conv2d(64, 80, 3, padding=1, bias=False)
    x = torch.randn(2, 64, 7, 10).contiguous(memory_format=torch.channels_last)
    with cpu_kernels.use_packed_kernels(True):
        saved = winograd_savings(cpu_kernels.conv2d, conv, x)
        plain = winograd_savings(cpu_kernels.conv2d, conv, x.contiguous())  # NCHW: the plain op, nothing saved
    direct = 2 * 64 * 80 * 9 * (2 * 7 * 10)  # what the FLOP counter counts for this convolution
    with torch.no_grad():
        assert count_flops(conv, x) == direct
    tiles = 2 * 4 * 5  # 2x2 tiles; the last tile row hangs over the odd edge
    assert saved == direct - 2 * 64 * 80 * 16 * tiles and plain == 0
    with cpu_kernels.use_packed_kernels(True), cpu_kernels.winograd_tile_size(4):
        saved = winograd_savings(cpu_kernels.conv2d, conv, x)
    tiles = 2 * 2 * 3  # 4x4 tiles of 36 products each, hanging over both edges
    assert saved == direct - 2 * 64 * 80 * 36 * tiles


def test_attention_flops_are_counted_the_same_for_sdpa_and_eager():
    # torch's counter misses the CPU SDPA kernel; bench_utils adds it, so both implementations count the same work.
    model = MageForMaskedImageModeling(tiny_config()).eval()
    ids = torch.full((2, model.config.num_image_tokens), model.config.mask_token_id)
    counts = {}
    for attn in ("sdpa", "eager"):
        model.config._attn_implementation = attn
        with torch.no_grad():
            counts[attn] = count_flops(model, input_ids=ids)
            layer = model.mage.encoder.layers[0].attn
            x = torch.zeros(2, model.config.num_image_tokens + 1, model.config.hidden_size)
            counts[attn, "layer"] = count_flops(layer, x)
    assert counts["sdpa"] == counts["eager"] > 0
    b, n, d = x.shape
    projections = 2 * b * n * d * 3 * d + 2 * b * n * d * d  # qkv and output projection
    attention = 2 * 2 * b * n * n * d  # QK^T and PV over all heads
    assert counts["sdpa", "layer"] == counts["eager", "layer"] == projections + attention


def test_flops_split_into_attention_and_matmuls():
    model = MageForMaskedImageModeling(tiny_config()).eval()
    layer = model.mage.encoder.layers[0].attn
    x = torch.zeros(2, model.config.num_image_tokens + 1, model.config.hidden_size)
    b, n, d = x.shape
    with torch.no_grad():
        kinds = count_flops_by_kind(layer, x)
        total = count_flops(layer, x)
    assert kinds == {"attention": 2 * 2 * b * n * n * d, "matmul": 2 * b * n * d * 3 * d + 2 * b * n * d * d}
    assert sum(kinds.values()) == total


def _clear_malloc_environment(monkeypatch):
    for name in [k for k in os.environ if is_malloc_variable(k)]:
        monkeypatch.delenv(name)


def test_machine_header_takes_the_highest_peak(monkeypatch):
    _clear_malloc_environment(monkeypatch)
    header = machine_header([310.0, 352.5, 298.25], threads=2)
    assert "peak 352.5 GFLOP/s" in header and "3 measurements" in header and "lowest 298.2" in header
    assert "malloc" not in header


def test_machine_header_names_the_malloc_settings_the_original_inherits(monkeypatch):
    _clear_malloc_environment(monkeypatch)  # whatever the suite runs under, only these two are set
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "2147483647")
    header = machine_header([300.0], threads=2)
    assert header.endswith("malloc environment of every process: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647")


def test_table_reports_speed_up_and_fraction_of_peak():
    original = Row("original", 1, parts={"steps": 2.0, "decode": 1.0}, flops={"steps": 150e9, "decode": 150e9})
    ours = Row("mage-hf", 1, parts={"steps": 1.0, "decode": 0.5}, flops={"steps": 150e9, "decode": 150e9})
    table = format_table([original, ours], peak=300.0, baseline={1: original})
    ours_line = table.splitlines()[-1]
    assert "2.00x" in ours_line  # 3.0 s / 1.5 s
    assert "200.0" in ours_line and "67%" in ours_line  # 300 GFLOP in 1.5 s, of a 300 GFLOP/s peak


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+", line)]


def test_sampler_benchmark_runs_on_a_tiny_model(tmp_path):
    out = tmp_path / "sampler.txt"
    report = bench_sampler.main(
        bench_sampler.parse_args(["--tiny", "--steps", "2", "--repeats", "1", "--batch-sizes", "1", "2",
                                  "--output", str(out)])
    )
    assert out.read_text().strip() == report.strip()
    rows = [line for line in report.splitlines() if line.startswith("mage-hf ") and "s/img =" not in line]
    assert len(rows) == 2
    for line in rows:
        steps, decode, total = _numbers(line)[:3]
        assert steps > 0 and decode > 0 and total == pytest.approx(steps + decode, abs=2e-3)
    assert "FLOP-based floor" in report
    bounds = [line for line in report.splitlines() if line.startswith("kernel bound, batch ")]
    assert len(bounds) == 2
    for line in bounds:
        number = r"(\d+(?:\.\d+)?(?:e-\d+)?)"
        linear, attention = re.search(
            rf"linears alone run at {number} GFLOP/s .* attention alone at {number} GFLOP/s", line
        ).groups()
        fraction = re.search(rf"= {number}% of the full-step floor", line).group(1)
        assert float(linear) > 0 and float(attention) > 0 and float(fraction) > 0


def test_training_benchmark_runs_on_a_tiny_model():
    # The malloc setting is process-wide and this runs inside the test process: leave it as it is here (the training
    # scripts' tests run with it, in their own processes).
    args = ["--tiny", "--repeats", "1", "--batch-size", "2", "--optimizers", "default", "fused",
            "--no-keep-freed-memory"]
    report = bench_training.main(bench_training.parse_args(args))
    assert "ours with glibc's default malloc" in report.splitlines()[0]
    for mode in ("pixels", "token ids"):
        for optimizer in ("default", "fused"):
            assert f"mage-hf ({mode}, {optimizer} AdamW)" in report
    rates = [float(m) for m in re.findall(r"([\d.]+) images/s", report)]
    assert len(rates) == 4 and all(rate > 0 for rate in rates)
