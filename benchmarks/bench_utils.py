# Copyright 2026 The mage-hf authors. MIT licence.
"""Helpers shared by the benchmark scripts: the machine's fp32 matmul throughput, FLOP counting, timing, the worker
process that runs the original LTH14/mage code, and the results table.

Nothing here is imported by the library; it only needs torch (and `mage_hf` for the model configurations).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mage_hf import cpu_kernels

__all__ = [
    "OriginalWorker",
    "Row",
    "clock",
    "count_flops",
    "count_flops_by_kind",
    "format_table",
    "machine_header",
    "measure_matmul_peak",
    "set_threads",
    "set_timer",
    "tiny_config",
    "vit_b_config",
    "winograd_savings",
]

BENCH_DIR = Path(__file__).resolve().parent
_TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}
_timer = {"name": "wall"}


def set_timer(name: str) -> None:
    """`"wall"` (elapsed time, the default) or `"cpu"` (CPU time of this process, all threads). With one thread, CPU
    time is not inflated by other processes competing for the cores, so it compares implementations on a busy
    machine; with more threads it also counts time spent spinning at barriers."""
    if name not in _TIMERS:
        raise ValueError(f"timer must be one of {sorted(_TIMERS)}, got {name!r}")
    _timer["name"] = name


def clock() -> float:
    return _TIMERS[_timer["name"]]()


def timer_name() -> str:
    return _timer["name"]


def vit_b_config():
    """MAGE ViT-B (768 wide, 12 blocks, 12 heads; decoder 768 wide, 8 blocks, 16 heads) with the MaskGIT VQGAN
    (ch 128, mult [1, 1, 2, 2, 4], 2 res blocks, codebook 1024 x 256, 256x256 images): the config defaults."""
    from mage_hf import MageConfig

    return MageConfig()


def tiny_config():
    """A very small MAGE for smoke-testing the benchmark scripts (16x16 images, a 4x4 token grid)."""
    from mage_hf import MageConfig, MageVQConfig

    vq = MageVQConfig(base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=1, num_embeddings=16,
                      embed_dim=8, resolution=16)
    return MageConfig(vq_config=vq, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                      decoder_intermediate_size=64)


def set_threads(num_threads: int | None) -> int:
    """Use `num_threads` intra-op threads (default: torch's choice, one per core) and return the number in use."""
    if num_threads:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def measure_matmul_peak(size: int = 2048, repeats: int = 5, loops: int = 4) -> float:
    """The best fp32 GFLOP/s of `loops` back-to-back `size x size` sgemms over `repeats` tries (the best, because other
    processes can only slow a try down). This is the throughput the FLOP-based floors are measured against."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up: thread pool and MKL buffers
    rates = []
    for _ in range(repeats):
        start = clock()
        for _ in range(loops):
            torch.mm(a, b, out=out)
        rates.append(2 * size**3 * loops / (clock() - start) / 1e9)
    return max(rates)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _head_shapes(qkv_shape, heads: int) -> tuple:
    batch, seq_len, width = qkv_shape
    shape = (batch, heads, seq_len, width // 3 // heads)
    return shape, shape, shape


def _native_attention_flops(qkv_shape, heads, *args, **kwargs) -> int:
    return sdpa_flop_count(*_head_shapes(qkv_shape, heads))


def _native_attention_backward_flops(grad_out_shape, qkv_shape, stats_shape, heads, *args, **kwargs) -> int:
    # The 4 matmuls of attention's gradient, as the explicit-matmul path counts them; the kernel also recomputes the
    # scores (a fifth), not counted: the floor is the model's work, not that of one way of computing it.
    batch, seq_len, width = qkv_shape
    return 4 * 2 * batch * seq_len * seq_len * (width // 3)


# torch's FLOP counter knows the CUDA attention kernels but not the CPU flash kernel that SDPA runs here, nor
# mage-hf's native attention kernel (`cpu_kernels.attention`): count them as torch counts the CUDA ones (2 matmuls
# forward; for SDPA's backward 5, the scores recomputed included, for the native kernel's the 4 of the model).
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}
if cpu_kernels.native_ops_available():
    _CPU_ATTENTION_FLOPS[torch.ops.mage_hf.attention_dropout_fwd] = _native_attention_flops
    _CPU_ATTENTION_FLOPS[torch.ops.mage_hf.attention_dropout_bwd] = _native_attention_backward_flops


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs (multiply-adds count 2) of matmuls, convolutions and attention in one call of `fn`. Elementwise work,
    norms and softmax are not counted: the floor is what the matrix units must do."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def count_flops_by_kind(fn, *args, **kwargs) -> dict[str, int]:
    """As [`count_flops`], split into "attention" (the SDPA kernels) and "matmul" (everything else counted: linears,
    batched matmuls, convolutions)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        fn(*args, **kwargs)
    by_op = counter.get_flop_counts()["Global"]
    attention = sum(n for op, n in by_op.items() if "scaled_dot_product" in str(op) or "attention_dropout" in str(op))
    return {"attention": attention, "matmul": sum(by_op.values()) - attention}


class _WinogradCalls(TorchDispatchMode):
    """Adds up, over the calls of mage-hf's Winograd convolution kernel it sees, the multiply-adds (x 2) the direct
    convolution would do and the kernel does not: 9 taps at each of the B H W output pixels, against 16 products per
    2x2 tile or 36 per 4x4 tile (the transform `u` has 16 or 36 positions; tiles hang over the edges). A dispatch
    mode, not module hooks: hooks would send the convolutions down the plain path (see `cpu_kernels`), as the FLOP
    counter's do."""

    def __init__(self):
        super().__init__()
        self.saved = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if cpu_kernels.native_ops_available() and func is torch.ops.mage_hf.winograd_conv3x3_.default:
            x, u = args[0], args[1]
            batch, channels, height, width = x.shape
            positions = u.shape[0]  # (m + 2)^2 for m x m output tiles
            m = math.isqrt(positions) - 2
            tiles = batch * ((height + m - 1) // m) * ((width + m - 1) // m)
            self.saved += 2 * channels * u.shape[2] * (9 * batch * height * width - positions * tiles)
        return func(*args, **(kwargs or {}))


def winograd_savings(fn, *args, **kwargs) -> int:
    """FLOPs of one call of `fn` (run on the fast path, no autograd) that the direct convolutions would execute and
    mage-hf's Winograd 3x3 convolutions do not (`cpu_kernels.conv2d`). The FLOP counter cannot see that path: its
    module hooks send every convolution down the plain ops."""
    calls = _WinogradCalls()
    with torch.no_grad(), calls:
        fn(*args, **kwargs)
    return calls.saved


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_header(peaks: list[float], threads: int) -> str:
    """`peaks`: the sgemm throughput measured at the start and before every repeat; the floors use the highest (the
    machine's best speed during the run, so the fractions reached are not flattered by a slow moment)."""
    spread = f"; {len(peaks)} measurements during the run, lowest {min(peaks):.1f}" if len(peaks) > 1 else ""
    return (
        f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs, {_timer['name']} time; measured fp32 "
        f"sgemm peak {max(peaks):.1f} GFLOP/s (2048^2, best of 5{spread})" + _malloc_environment()
        + _instruction_set_limits()
    )


# Variables that keep MKL, ATen's vectorised kernels, oneDNN and our native kernels to an older instruction set (e.g.
# AVX2 on an AVX-512 machine, to measure the code an AVX2 CPU runs); the original's worker inherits all of them.
_ISA_VARIABLES = ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MAGE_HF_NATIVE_ARCH")


def _instruction_set_limits() -> str:
    settings = [f"{k}={os.environ[k]}" for k in _ISA_VARIABLES if os.environ.get(k)]
    return f"; instruction sets limited by {' '.join(settings)}" if settings else ""


def is_malloc_variable(name: str) -> bool:
    """Whether the environment variable `name` tunes glibc's malloc (`MALLOC_*`, or `GLIBC_TUNABLES`)."""
    return name.startswith("MALLOC_") or name == "GLIBC_TUNABLES"


def _malloc_environment() -> str:
    """glibc's malloc tunables set in the environment, which the original's worker process inherits: they change
    its speed (see training item 12 in the README), so a report says when a run had them."""
    settings = sorted(f"{k}={v}" for k, v in os.environ.items() if is_malloc_variable(k))
    return f"; malloc environment of every process: {' '.join(settings)}" if settings else ""


@dataclass
class Row:
    """One line of a results table. Times are seconds per image; FLOPs are per image."""

    name: str
    batch_size: int
    parts: dict[str, float] = field(default_factory=dict)  # e.g. {"steps": s, "decode": s}
    flops: dict[str, float] = field(default_factory=dict)  # same keys: FLOPs per image
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def total_flops(self) -> float:
        return sum(self.flops.get(k, 0.0) for k in self.parts)


def format_table(rows: list[Row], peak: float, baseline: dict[int, Row] | None = None, unit: str = "s/img") -> str:
    """Render rows as a fixed-width table: per-part times, total, speed-up over `baseline[batch_size]`, achieved
    GFLOP/s and the fraction of the measured sgemm peak (= FLOP-based floor / measured time)."""
    part_names = []
    for row in rows:
        for name in row.parts:
            if name not in part_names:
                part_names.append(name)
    header = ["impl", "batch"] + [f"{p} {unit}" for p in part_names] + [f"total {unit}", "speed-up", "GFLOP/img",
                                                                        "GFLOP/s", "of peak", "floor s/img"]
    lines = [header]
    for row in rows:
        cells = [row.name, str(row.batch_size)]
        cells += [f"{row.parts[p]:.3f}" if p in row.parts else "-" for p in part_names]
        cells.append(f"{row.total:.3f}")
        base = baseline.get(row.batch_size) if baseline else None
        cells.append(f"{base.total / row.total:.2f}x" if base is not None and base is not row else "-")
        gflop = row.total_flops / 1e9
        rate = gflop / row.total
        cells += [f"{gflop:.1f}", f"{rate:.1f}", f"{rate / peak:.0%}", f"{gflop / peak:.3f}"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


class OriginalWorker:
    """A separate Python process that runs the original LTH14/mage code (see `run_original.py`) and answers timing
    requests one JSON line at a time. A separate process keeps the shims it needs (old timm, a stub torchvision,
    a no-op `.cuda`) out of this one, and a long-lived one lets the two implementations be timed alternately, so that
    both see the same background load."""

    def __init__(self, original_repo: str, deps: str | None = None, threads: int | None = None,
                 python: str | None = None, model: str = "mage_vit_base_patch16"):
        command = [python or sys.executable, str(BENCH_DIR / "run_original.py"), "--serve",
                   "--original-repo", str(original_repo), "--model", model, "--timer", _timer["name"]]
        if deps:
            command += ["--deps", str(deps)]
        if threads:
            command += ["--threads", str(threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self.request({"cmd": "ping"})

    def request(self, message: dict) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RuntimeError(f"The original-code worker died (exit code {code}); see its stderr above.")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"The original-code worker failed: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
