# Copyright 2026 The mage-hf authors. MIT licence.
"""Time MAGE pre-training steps on the ViT-B shape (random weights) at batch 4: one step is the forward pass (a
masking ratio drawn from the truncated normal, half the tokens dropped), the backward pass, gradient clipping at 3.0
and an AdamW step, (a) from pixels (the frozen VQGAN tokenizes inside the step, as the original does) and (b) from
pre-computed token ids. Prints images per second, the FLOPs counted per image, the FLOP-based floor at the fp32 sgemm
throughput measured in the same run and the fraction of it reached, and, given `--original-repo`, the original
LTH14/mage training step timed alternately with ours.

    python benchmarks/bench_training.py --original-repo /tmp/mage-original --deps /tmp/mage-orig-deps \
        --output benchmarks/results/training.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    OriginalWorker,
    Row,
    clock,
    count_flops,
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

from mage_hf import MageForMaskedImageModeling  # noqa: E402
from mage_hf.training_utils import clip_grad_norm_, keep_freed_memory, param_groups_weight_decay  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode (the best is reported)")
    parser.add_argument("--original-repo", type=Path, default=None, help="checkout of LTH14/mage to time side by side")
    parser.add_argument("--deps", type=Path, default=None, help="folder with the original's old dependencies")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    parser.add_argument("--timer", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: process CPU time (with --threads 1, robust to a busy machine)")
    parser.add_argument("--optimizers", choices=["default", "foreach", "fused"], nargs="+", default=["fused"],
                        help="torch.optim.AdamW implementations to time our steps with (train_mage.py uses fused, "
                        "the original the default)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="malloc keeps freed memory for the next steps, as train_mage.py sets it "
                        "(--no-keep-freed-memory: glibc's default, which unmaps large blocks when they are freed)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, to check that the script works")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    return parser.parse_args(argv)


class Trainer:
    """Our pre-training step, as `training/train_mage.py` takes it (fp32, no accumulation): from pixels, the frozen
    tokenizer runs first (channels-last, as there), then the forward pass on the ids. (`main` also sets malloc up as
    that script does.)"""

    def __init__(self, model: MageForMaskedImageModeling, optimizer_impl: str, seed: int):
        self.model = model.train()
        kwargs = {} if optimizer_impl == "default" else {optimizer_impl: True}
        self.optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1.5e-4, betas=(0.9, 0.95),
                                           **kwargs)
        self.generator = torch.Generator().manual_seed(seed)

    def forward_backward(self, pixel_values=None, input_ids=None) -> torch.Tensor:
        if pixel_values is not None:
            input_ids = self.model.mage.tokenize(pixel_values, channels_last=True)
        out = self.model(input_ids=input_ids, generator=self.generator, masked_logits_only=True)
        out.loss.backward()
        return out.loss

    def step(self, pixel_values=None, input_ids=None) -> float:
        start = clock()
        loss = self.forward_backward(pixel_values, input_ids)
        clip_grad_norm_(self.model.parameters(), 3.0)  # as train_mage.py
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite loss")
        return clock() - start


def our_flops(trainer: Trainer, images: torch.Tensor, ids: torch.Tensor) -> dict:
    """FLOPs per image of the forward + backward pass from ids (mask ratio 0.55, the distribution's mean) and of the
    VQ encode, at the benchmark's batch size: the encode's as the model defines it (direct convolutions, as the
    original computes them), and what the channels-last encode of the training step executes (its 3x3
    convolutions are Winograd ones; see `cpu_kernels.conv2d`)."""
    model, batch_size = trainer.model, images.shape[0]

    def step():
        model(input_ids=ids, mask_ratio=0.55, generator=torch.Generator().manual_seed(0),
              masked_logits_only=True).loss.backward()
        model.zero_grad(set_to_none=True)

    train = count_flops(step)
    with torch.no_grad():
        encode = count_flops(model.mage.vq_model.encode, images)  # the standard layout: FLOPs counted by op
    executed = encode - winograd_savings(model.mage.vq_model.encode, images, channels_last=True)
    return {"train": train / batch_size, "encode": encode / batch_size, "executed_encode": executed / batch_size}


def main(args) -> str:
    # Before anything is allocated, as train_mage.py does. Process-wide: the original's worker is another process and
    # keeps glibc's default.
    kept = keep_freed_memory() if args.keep_freed_memory else False
    threads = set_threads(args.threads)
    set_timer(args.timer)
    load_start = load_average()
    torch.manual_seed(args.seed)
    config = tiny_config() if args.tiny else vit_b_config()
    model = MageForMaskedImageModeling(config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    trainers = {name: Trainer(model, name, args.seed) for name in args.optimizers}
    trainer = trainers[args.optimizers[0]]
    size = config.vq_config.resolution
    images = torch.rand(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        ids = model.mage.tokenize(images, channels_last=True)  # (B, L): the pre-computed tokens of mode (b)
    flops = our_flops(trainer, images, ids)

    worker = None
    if args.original_repo is not None:
        if args.tiny:
            raise SystemExit("--tiny cannot be compared with the original, whose shapes are hard-coded.")
        worker = OriginalWorker(args.original_repo, deps=args.deps, threads=threads)
    results: dict[str, list[float]] = {"encode": [], "original": [], "original encode": []}
    try:
        original_flops = worker.request({"cmd": "train_flops", "batch_size": args.batch_size}) if worker else None
        peaks = [measure_matmul_peak()]
        # One untimed step each first: optimiser state allocation, first-touch memory, thread pools.
        for name, trainer in trainers.items():
            trainer.step(pixel_values=images)
        if worker:
            worker.request({"cmd": "train", "batch_size": args.batch_size, "repeats": 1, "seed": args.seed})
        for _ in range(args.repeats):
            # The machine's speed drifts over minutes: the peak is measured again beside every repeat.
            peaks.append(measure_matmul_peak())
            # Alternate the implementations so that all of them see the same background load.
            for name, trainer in trainers.items():
                results.setdefault(("pixels", name), []).append(trainer.step(pixel_values=images))
                results.setdefault(("ids", name), []).append(trainer.step(input_ids=ids))
            start = clock()
            model.mage.tokenize(images, channels_last=True)
            results["encode"].append(clock() - start)
            if worker:
                run = worker.request({"cmd": "train", "batch_size": args.batch_size, "repeats": 1, "seed": args.seed})
                results["original"] += run["step"]
                results["original encode"] += run["encode"]
    finally:
        if worker:
            worker.close()

    peak = max(peaks)
    per_image = {k: min(v) / args.batch_size for k, v in results.items() if v}
    encode_flops, train_flops = flops["encode"], flops["train"]
    rows = []
    if "original" in per_image:
        rows.append(Row("original (pixels)", args.batch_size,
                        parts={"encode": per_image["original encode"],
                               "rest": per_image["original"] - per_image["original encode"]},
                        flops={"encode": original_flops["encode"],
                               "rest": original_flops["step"] - original_flops["encode"]}))
    for name in args.optimizers:
        rows.append(Row(f"mage-hf (pixels, {name} AdamW)", args.batch_size,
                        parts={"encode": per_image["encode"], "rest": per_image["pixels", name] - per_image["encode"]},
                        flops={"encode": flops["executed_encode"], "rest": train_flops}))
        rows.append(Row(f"mage-hf (token ids, {name} AdamW)", args.batch_size, parts={"rest": per_image["ids", name]},
                        flops={"rest": train_flops}))
    baseline = {args.batch_size: rows[0]} if "original" in per_image else None

    lines = [
        f"MAGE training-step benchmark: {'tiny config' if args.tiny else 'ViT-B shape'}, random weights, batch "
        f"{args.batch_size}, float32, AdamW, clip 3.0"
        + (", gradient checkpointing" if args.gradient_checkpointing else "") + f", best of {args.repeats}; ours "
        + ("keeps freed memory (keep_freed_memory, as train_mage.py)" if kept else "with glibc's default malloc"),
        machine_header(peaks, threads) + f"; load average {load_start} (start), {load_average()} (end)",
        f"FLOPs per image (counted): forward+backward {train_flops / 1e9:.1f} G (mask ratio 0.55), VQ encode "
        f"{encode_flops / 1e9:.1f} G (mage-hf executes {flops['executed_encode'] / 1e9:.1f} G)"
        + (f"; original: step {original_flops['step'] / 1e9:.1f} G, of which encode "
           f"{original_flops['encode'] / 1e9:.1f} G"
           if original_flops else ""),
        f"FLOP-based floor at the measured peak: {(train_flops + encode_flops) / 1e9 / peak:.3f} s/img from pixels, "
        f"{train_flops / 1e9 / peak:.3f} s/img from token ids",
        "('encode' is the VQ encode timed on its own; 'rest' is the step minus that: forward, backward, clip, AdamW)",
        "",
        format_table(rows, peak, baseline),
        "",
    ]
    floors = {"pixels": (train_flops + encode_flops) / 1e9 / peak, "token ids": train_flops / 1e9 / peak}
    for row in rows:
        mode = "token ids" if "token ids" in row.name else "pixels"
        # The fraction of the floor of the model's FLOPs (direct convolutions), whatever a row executes.
        lines.append(f"{row.name}: {1.0 / row.total:.3f} images/s = {floors[mode] / row.total:.0%} of the "
                     f"FLOP-based floor from {mode}")
    for name in args.optimizers:
        for mode in ("pixels", "ids"):
            ratios = sorted(o / m for o, m in zip(results["original"], results[mode, name]))
            if ratios:  # each repeat times ours and the original back to back: robust to slow drifts
                lines.append(
                    f"speed-up per repeat ({'pixels' if mode == 'pixels' else 'token ids'}, {name} AdamW; original / "
                    f"ours, back to back): {', '.join(f'{r:.2f}x' for r in ratios)}; median "
                    f"{ratios[len(ratios) // 2]:.2f}x"
                )
    report = "\n".join(lines)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")
    return report


if __name__ == "__main__":
    main(parse_args())
