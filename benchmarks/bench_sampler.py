# Copyright 2026 The mage-hf authors. MIT licence.
"""Time image generation on the ViT-B shape (random weights): `MageGenerationPipeline` at batch 1 and 4 with 20 steps,
split into the transformer steps (model + scheduler) and the VQGAN decode, in seconds per image. Prints the FLOPs
counted for MAGE's full step, for the average step our sampler executes (it skips work whose result is never read) and
for one decode, the fp32 sgemm throughput measured in the same run, the FLOP-based floor of MAGE's full steps and the
fraction of it reached, and, given `--original-repo`, the same for the original LTH14/mage code timed alternately
with ours in the same run. The table credits each implementation with the FLOPs it executes. A last line per
batch size gives a kernel bound: the time an image would take with every FLOP at the speed of the model's kernels
timed alone and nothing else costing any time.

    python benchmarks/bench_sampler.py --original-repo /tmp/mage-original --deps /tmp/mage-orig-deps \
        --output benchmarks/results/sampler.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    OriginalWorker,
    Row,
    clock,
    count_flops,
    count_flops_by_kind,
    format_table,
    load_average,
    machine_header,
    measure_matmul_peak,
    set_threads,
    set_timer,
    tiny_config,
    vit_b_config,
    winograd_savings,
)

from mage_hf import MageForMaskedImageModeling, MageGenerationPipeline, MageScheduler, cpu_kernels  # noqa: E402
from mage_hf.modeling_mage_vq import MageVQUpsample  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per image")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (the best is reported)")
    parser.add_argument("--original-repo", type=Path, default=None, help="checkout of LTH14/mage to time side by side")
    parser.add_argument("--deps", type=Path, default=None, help="folder with the original's old dependencies")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    parser.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: process CPU time (with --threads 1, robust to a busy machine)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd transformer and VQ decoder (compile time reported apart)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, to check that the script works")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    return parser.parse_args(argv)


class TimedPipeline:
    """Our pipeline, with its VQ decode and scheduler steps timed through instance attributes (nothing changes what
    they compute)."""

    def __init__(self, pipe: MageGenerationPipeline):
        self.pipe = pipe
        self.decode_time = 0.0
        self.scheduler_time = 0.0
        decode, step = pipe.decode, pipe.scheduler.step

        def timed_decode(*args, **kwargs):
            start = clock()
            out = decode(*args, **kwargs)
            self.decode_time += clock() - start
            return out

        def timed_step(*args, **kwargs):
            start = clock()
            out = step(*args, **kwargs)
            self.scheduler_time += clock() - start
            return out

        pipe.decode, pipe.scheduler.step = timed_decode, timed_step

    def __call__(self, batch_size: int, steps: int, seed: int) -> dict:
        self.decode_time = self.scheduler_time = 0.0
        generators = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(batch_size)]
        start = clock()
        images = self.pipe(num_images=batch_size, num_inference_steps=steps, generator=generators,
                           output_type="pt").images
        total = clock() - start
        if images.shape[0] != batch_size or not torch.isfinite(images).all():
            raise RuntimeError("the pipeline returned bad images")
        return {"total": total, "decode": self.decode_time, "steps": total - self.decode_time,
                "scheduler": self.scheduler_time}


def our_flops(pipe: MageGenerationPipeline, steps: int) -> dict:
    """FLOPs per image at batch 1: MAGE's full transformer step (half the tokens masked, every position computed,
    as the original does), what our sampler executes per step on average over a real `steps`-step run (it skips
    work whose result is never read; see `MageForMaskedImageModeling.masked_logits`), and one VQ decode: MAGE's, and
    what ours executes (its up-sampling convolutions are sub-pixel ones, its other 3x3 convolutions Winograd ones; see
    `cpu_kernels.upsample_conv2d` and `cpu_kernels.conv2d`)."""
    model = pipe.model
    config = model.config
    grid = config.vq_config.grid_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.codebook_size, (1, config.num_image_tokens), generator=generator)
    ids[:, ::2] = config.mask_token_id
    # Counted with the plain ops: the counter does not know the packed-weight kernels, which do the same products.
    codes = ids.clamp(max=config.codebook_size - 1).view(1, grid, grid)
    with torch.no_grad(), cpu_kernels.use_packed_kernels(False):
        step = count_flops(model, input_ids=ids)
        decode = count_flops(model.mage.vq_model.decode, codes)
        run = count_flops(pipe, num_images=1, num_inference_steps=steps, generator=generator, output_type="latent")
    vq_model = model.mage.vq_model
    executed_decode = decode - _sub_pixel_savings(vq_model, codes) - winograd_savings(vq_model.decode, codes)
    return {"step": step, "decode": decode, "executed_step": run / steps, "executed_decode": executed_decode}


def _sub_pixel_savings(vq_model, codes: torch.Tensor) -> int:
    """FLOPs per decode that the sub-pixel up-sampling of CPU inference does not execute (see
    `cpu_kernels.upsample_conv2d`; the counter cannot see that path: it takes the plain ops under the counter's module
    hooks). Each up-sampling convolution of an (H, W) input does 9 taps at each of the 4 H W large pixels as plain ops,
    and 4 taps for each of the 4 parities at (H + 1) (W + 1) small ones as a sub-pixel convolution."""
    if not (cpu_kernels.is_enabled() and torch.backends.mkldnn.is_available()):
        return 0
    inputs = []
    upsamplers = [m for m in vq_model.decoder.modules() if isinstance(m, MageVQUpsample)]
    hooks = [m.register_forward_pre_hook(lambda module, args: inputs.append((module.conv, args[0].shape)))
             for m in upsamplers]
    try:
        with torch.no_grad():
            vq_model.decode(codes)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(
        2 * conv.in_channels * conv.out_channels * batch * (9 * 4 * height * width - 16 * (height + 1) * (width + 1))
        for conv, (batch, _, height, width) in inputs
    )


def _figure(value: float) -> str:
    """Whole numbers at ViT-B's sizes; two significant digits for the small ones of a tiny test model (which would
    otherwise print as 0)."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def _percent(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction >= 0.1 else f"{100 * fraction:.2g}%"


def _best_time(fn, calls: int = 10, tries: int = 5) -> float:
    """Seconds per call of `fn`, best of `tries` loops of `calls` (after a warm-up)."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(tries):
        start = clock()
        for _ in range(calls):
            fn()
        best = min(best, (clock() - start) / calls)
    return best


@torch.no_grad()
def kernel_rates(model: MageForMaskedImageModeling, batch_size: int) -> dict:
    """GFLOP/s of the model's own kernels timed alone, at the shapes of a full sampling step at `batch_size`, weights
    and inputs hot in cache: the linear layers of one encoder and one decoder block (the packed path the sampler
    takes), weighted by how many blocks each stack has, and the attention (the native kernel where the model takes it,
    else SDPA) at both stacks' head shapes. An upper bound on the speed those kernels reach inside the model."""
    config = model.config
    seq_len = config.num_image_tokens + 1
    stacks = [(model.mage.encoder.layers, config.num_hidden_layers),
              (model.decoder.transformer.layers, config.decoder_num_hidden_layers)]
    linear_flops = linear_time = attention_flops = attention_time = 0.0
    for layers, count in stacks:
        layer = layers[0]
        for module in (layer.attn.qkv, layer.attn.proj, layer.mlp.fc1, layer.mlp.fc2):
            x = torch.randn(batch_size, seq_len, module.in_features)
            linear_time += count * _best_time(lambda m=module, x=x: cpu_kernels.linear(m, x))
            linear_flops += count * 2 * x.numel() * module.out_features
        heads, head_dim = layer.attn.num_heads, layer.attn.head_dim
        qkv = torch.randn(batch_size, seq_len, 3 * heads * head_dim)
        q, k, v = qkv.view(batch_size, seq_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
        with torch.no_grad():
            native = cpu_kernels.attention(qkv, heads, layer.attn.scale, 0.0) is not None  # what the model runs
        attention_time += count * _best_time(
            (lambda qkv=qkv, h=heads, s=layer.attn.scale: cpu_kernels.attention(qkv, h, s, 0.0)) if native else
            (lambda q=q, k=k, v=v, s=layer.attn.scale: F.scaled_dot_product_attention(q, k, v, scale=s))
        )
        attention_flops += count * 4 * batch_size * heads * seq_len * seq_len * head_dim
    return {"linear": linear_flops / linear_time / 1e9, "attention": attention_flops / attention_time / 1e9}


def compile_model(model: MageForMaskedImageModeling) -> None:
    """Compile the transformer stacks and the VQ decoder in place (state-dict keys unchanged), with Inductor's
    freezing (weights as constants, so that it packs them itself: without it the compiled model was slower than the
    eager one with packed weights)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    model.mage.encoder.compile(dynamic=False)
    model.decoder.compile(dynamic=False)
    model.mage.vq_model.decoder.compile(dynamic=False)


def main(args) -> str:
    threads = set_threads(args.threads)
    set_timer(args.timer)
    torch.manual_seed(args.seed)
    config = tiny_config() if args.tiny else vit_b_config()
    model = MageForMaskedImageModeling(config).eval()
    pipe = MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(config))
    pipe.set_progress_bar_config(disable=True)
    ours = TimedPipeline(pipe)
    flops = our_flops(pipe, args.steps)

    worker = None
    if args.original_repo is not None:
        if args.tiny:
            raise SystemExit("--tiny cannot be compared with the original, whose shapes are hard-coded.")
        worker = OriginalWorker(args.original_repo, deps=args.deps, threads=threads)
    try:
        peaks = [measure_matmul_peak()]  # the worker is idle, waiting for a request
        original_flops = worker.request({"cmd": "sampler_flops"}) if worker else None
        load_before = load_average()
        results: dict[tuple[str, int], list[dict]] = {}
        for batch_size in args.batch_sizes:
            ours(batch_size, 1, seed=args.seed)  # warm-up: first-call allocations, thread pool
            if worker:
                worker.request({"cmd": "sampler", "batch_size": batch_size, "steps": 1, "seed": args.seed})
            for repeat in range(args.repeats):
                # The machine's speed drifts over minutes: the peak is measured again beside every repeat.
                peaks.append(measure_matmul_peak())
                # Alternate the two implementations so that both see the same background load.
                results.setdefault(("mage-hf", batch_size), []).append(ours(batch_size, args.steps, seed=repeat))
                if worker:
                    run = worker.request(
                        {"cmd": "sampler", "batch_size": batch_size, "steps": args.steps, "seed": repeat}
                    )
                    results.setdefault(("original", batch_size), []).append(run)

        compile_note = None
        if args.compile:
            start = clock()
            compile_model(model)
            for batch_size in args.batch_sizes:
                ours(batch_size, 1, seed=args.seed)  # compiles (and recompiles per batch shape)
            compile_time = clock() - start
            compile_note = f"torch.compile: {compile_time:.1f} s to compile (one-step warm-ups included)"
            for batch_size in args.batch_sizes:
                for repeat in range(args.repeats):
                    results.setdefault(("mage-hf compiled", batch_size), []).append(
                        ours(batch_size, args.steps, seed=repeat)
                    )
    finally:
        if worker:
            worker.close()

    # How close these kernels could get at best: the FLOPs of a real run by kind, at the kernels' speed alone. The
    # kernels, the decode and the sgemm peak they are compared with are measured together, at one moment.
    bounds = {}
    for batch_size in args.batch_sizes:
        generators = [torch.Generator().manual_seed(i) for i in range(batch_size)]
        with torch.no_grad(), cpu_kernels.use_packed_kernels(False):  # the counter sees the plain ops
            kinds = count_flops_by_kind(pipe, num_images=batch_size, num_inference_steps=args.steps,
                                        generator=generators, output_type="latent")
        local_peak = measure_matmul_peak()
        rates = kernel_rates(model, batch_size)
        ids = torch.randint(0, config.codebook_size, (batch_size, config.num_image_tokens), generator=generators[0])
        with torch.no_grad():
            decode = _best_time(lambda ids=ids: pipe.decode(ids), calls=1, tries=3) / batch_size
        seconds = (kinds["matmul"] / rates["linear"] + kinds["attention"] / rates["attention"]) / 1e9 / batch_size
        local_floor = (args.steps * flops["step"] + flops["decode"]) / 1e9 / local_peak
        bounds[batch_size] = {"rates": rates, "peak": local_peak, "decode": decode, "total": seconds + decode,
                              "floor": local_floor}

    rows, baseline = [], {}
    for (name, batch_size), runs in results.items():
        run = min(runs, key=lambda r: r["total"])
        # Each row is credited with the FLOPs it executes (GFLOP/s, "of peak"); ours does less than a full step.
        step_flops = original_flops["step"] if name == "original" else flops["executed_step"]
        decode_flops = original_flops["decode"] if name == "original" else flops["executed_decode"]
        row = Row(
            name=name,
            batch_size=batch_size,
            parts={"steps": run["steps"] / batch_size, "decode": run["decode"] / batch_size},
            flops={"steps": args.steps * step_flops, "decode": decode_flops},
        )
        if name == "original":
            baseline[batch_size] = row
        rows.append(row)
    rows.sort(key=lambda r: (r.batch_size, r.name != "original", r.name))

    peak = max(peaks)
    floor = (args.steps * flops["step"] + flops["decode"]) / 1e9 / peak
    lines = [
        f"MAGE sampler benchmark: {'tiny config' if args.tiny else 'ViT-B shape'}, random weights, "
        f"{args.steps} steps, float32, best of {args.repeats}",
        machine_header(peaks, threads) + f"; load average {load_before} (start), {load_average()} (end)",
        f"FLOPs per image (counted, matmul/conv/attention): MAGE's full transformer step {flops['step'] / 1e9:.1f} G "
        f"(mage-hf executes {flops['executed_step'] / 1e9:.1f} G per step on average over {args.steps} steps), "
        f"VQ decode {flops['decode'] / 1e9:.1f} G (mage-hf executes {flops['executed_decode'] / 1e9:.1f} G)"
        + (f"; original: step {original_flops['step'] / 1e9:.1f} G, decode {original_flops['decode'] / 1e9:.1f} G"
           if original_flops else ""),
        f"FLOP-based floor of MAGE's full steps at the measured peak: {floor:.2f} s per {args.steps}-step image "
        f"({args.steps * flops['step'] / 1e9 / peak:.2f} s steps + {flops['decode'] / 1e9 / peak:.2f} s decode)",
        "",
        format_table(rows, peak, baseline),
        "",
    ]
    for row in rows:
        runs = results[(row.name, row.batch_size)]
        scheduler = min(runs, key=lambda r: r["total"]).get("scheduler")
        note = f", of which scheduler {scheduler / row.batch_size:.3f} s/img" if scheduler is not None else ""
        all_runs = ", ".join(f"{r['total'] / row.batch_size:.2f}" for r in runs)
        lines.append(
            f"{row.name} batch {row.batch_size}: {row.total:.2f} s/img = {floor / row.total:.0%} of the full-step floor "
            f"(all runs: {all_runs} s/img{note})"
        )
    for batch_size in args.batch_sizes:
        pairs = zip(results.get(("original", batch_size), []), results[("mage-hf", batch_size)])
        ratios = sorted(original["total"] / ours_run["total"] for original, ours_run in pairs)
        if ratios:  # each repeat times the two back to back: robust to slow drifts of the machine's speed
            lines.append(
                f"batch {batch_size} speed-up per repeat (original / ours, run back to back): "
                f"{', '.join(f'{r:.2f}x' for r in ratios)}; median {ratios[len(ratios) // 2]:.2f}x"
            )
    for batch_size, bound in bounds.items():
        rates, local_peak = bound["rates"], bound["peak"]
        lines.append(
            f"kernel bound, batch {batch_size} (measured together with an sgemm peak of {local_peak:.0f} GFLOP/s): "
            f"the linears alone run at {_figure(rates['linear'])} GFLOP/s ({_percent(rates['linear'] / local_peak)} "
            f"of that peak), attention alone at {_figure(rates['attention'])} GFLOP/s "
            f"({_percent(rates['attention'] / local_peak)}), the decode alone takes {bound['decode']:.2f} s/img; with "
            f"every FLOP of a real run at those speeds and nothing else costing any time, an image would take "
            f"{bound['total']:.2f} s = {_percent(bound['floor'] / bound['total'])} of the full-step floor at that peak"
        )
    if compile_note:
        lines.append(compile_note)
    report = "\n".join(lines)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")
    return report


if __name__ == "__main__":
    main(parse_args())
