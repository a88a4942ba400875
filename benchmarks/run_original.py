# Copyright 2026 The mage-hf authors. MIT licence.
"""Time the ORIGINAL MAGE code (a checkout of LTH14/mage) on the CPU: its `gen_image` sampling loop from
`gen_img_uncond.py` with its VQGAN decode, and its pre-training step (`MaskedGenerativeEncoderViT.forward` + backward
+ AdamW), on the ViT-B shape with random weights.

The original is run as it is. What is needed to make it run on this CPU and a current torch, and nothing that
changes its computation, is installed at start-up (see `install_shims`):

* `torch._six` (removed from torch) with the `container_abcs`/`string_classes`/`int_classes` that timm 0.3.2 imports;
* a stub `torchvision` package: timm 0.3.2's `timm.data` imports torchvision transforms at import time, and the
  CPU torch here has no working torchvision. Nothing the benchmark runs touches it;
* `pytorch_lightning.LightningModule` = `torch.nn.Module`: the VQGAN class derives from it only for training hooks;
* `numpy.float` = `float` (removed from NumPy), used by `util/pos_embed.py` for the (unused) sin-cos tables;
* `torch.Tensor.cuda` = identity: the sampling loop hard-codes `.cuda()`.

timm 0.3.2, omegaconf, antlr4 and einops come from a `--target` folder outside the repository (`--deps`), e.g.
`pip install --no-deps --target /tmp/mage-orig-deps timm==0.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3
einops`. The torch is this environment's.

Run it directly for one-off numbers, or let `bench_sampler.py` / `bench_training.py` drive it with `--serve` (JSON
requests on stdin, one JSON reply per line on stdout; everything the original prints goes to stderr).
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import contextlib
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import clock, count_flops, measure_matmul_peak, set_threads, set_timer  # noqa: E402


def install_shims() -> None:
    """Make the 2022-era original importable on a current torch/NumPy without touching its computation."""
    six = types.ModuleType("torch._six")
    six.container_abcs = collections.abc
    six.string_classes = (str, bytes)
    six.int_classes = int
    sys.modules.setdefault("torch._six", six)

    class _Unused:  # stands in for every torchvision name timm.data uses at import time; never called here
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            raise RuntimeError("torchvision is stubbed out for the benchmark of the original code")

    def stub(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        def getattr_(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Unused

        module.__getattr__ = getattr_
        module.__path__ = []
        sys.modules[name] = module
        return module

    if "torchvision" not in sys.modules:
        torchvision = stub("torchvision")
        torchvision.transforms = stub("torchvision.transforms")
        torchvision.transforms.functional = stub("torchvision.transforms.functional")

    lightning = types.ModuleType("pytorch_lightning")
    lightning.LightningModule = nn.Module
    sys.modules.setdefault("pytorch_lightning", lightning)

    if not hasattr(np, "float"):
        np.float = float  # noqa: NPY001 - the original's pos_embed.py still uses the removed alias

    torch.Tensor.cuda = lambda self, *args, **kwargs: self


@contextlib.contextmanager
def chdir(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def load_original(repo: Path, model_name: str):
    """Build the original model (random init, no checkpoint) as `gen_img_uncond.py` and `main_pretrain.py` do, and
    take its `gen_image` function. The script itself cannot be imported (it parses arguments and loads a checkpoint at
    module level), so its two functions are compiled from its source, unmodified."""
    sys.path.insert(0, str(repo))
    with chdir(repo), contextlib.redirect_stdout(sys.stderr):  # models_mage reads config/vqgan.yaml relative to cwd
        import models_mage

        sampler_model = models_mage.__dict__[model_name](
            norm_pix_loss=False, mask_ratio_mu=0.55, mask_ratio_std=0.25, mask_ratio_min=0.0, mask_ratio_max=1.0,
            vqgan_ckpt_path=None,
        )
    source = (repo / "gen_img_uncond.py").read_text()
    tree = ast.parse(source)
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    namespace = {"torch": torch, "np": np, "math": math}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(repo / "gen_img_uncond.py"), "exec"), namespace)
    return models_mage, sampler_model.eval(), namespace["gen_image"]


class Original:
    def __init__(self, repo: Path, model_name: str):
        self.repo = repo
        self.model_name = model_name
        self.models_mage, self.model, self.gen_image = load_original(repo, model_name)
        self._decode_times: list[float] = []
        vqgan = self.model.vqgan
        decode = vqgan.decode

        def timed_decode(quant):  # an instance attribute: gen_image's call to vqgan.decode is timed, not changed
            start = clock()
            out = decode(quant)
            self._decode_times.append(clock() - start)
            return out

        vqgan.decode = timed_decode
        self.train_model = None

    def sampler(self, batch_size: int, steps: int, seed: int, temperature: float = 4.5) -> dict:
        self._decode_times.clear()
        start = clock()
        with torch.no_grad():
            images = self.gen_image(self.model, bsz=batch_size, seed=seed, num_iter=steps,
                                    choice_temperature=temperature)
        total = clock() - start
        assert images.shape == (batch_size, 3, 256, 256), images.shape
        decode = sum(self._decode_times)
        return {"total": total, "decode": decode, "steps": total - decode}

    def sampler_flops(self) -> dict:
        with torch.no_grad():
            one_step = count_flops(self.gen_image, self.model, bsz=1, seed=0, num_iter=1)
            quant = torch.zeros(1, 256, 16, 16)
            decode = count_flops(self.model.vqgan.decode, quant)
        return {"step": one_step - decode, "decode": decode}

    def _build_train(self, seed: int):
        if self.train_model is None:
            with chdir(self.repo), contextlib.redirect_stdout(sys.stderr):
                torch.manual_seed(seed)
                # main_pretrain.py's defaults: mask ratio min 0.5, mu 0.55, std 0.25, max 1.0 (drop = ceil(0.5 L)).
                self.train_model = self.models_mage.__dict__[self.model_name](
                    norm_pix_loss=False, mask_ratio_mu=0.55, mask_ratio_std=0.25, mask_ratio_min=0.5,
                    mask_ratio_max=1.0, vqgan_ckpt_path=None,
                )
            from timm.optim import optim_factory

            param_groups = optim_factory.add_weight_decay(self.train_model, 0.05)
            self.optimizer = torch.optim.AdamW(param_groups, lr=1.5e-4, betas=(0.9, 0.95))
        return self.train_model

    def train_step(self, images: torch.Tensor) -> float:
        """engine_pretrain.train_one_epoch's step without AMP (fp32 on CPU): loss, backward, clip 3.0, AdamW."""
        model = self.train_model
        loss, _, _ = model(images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss)

    def train(self, batch_size: int, repeats: int, seed: int) -> dict:
        model = self._build_train(seed)
        model.train()
        generator = torch.Generator().manual_seed(seed)
        images = torch.rand(batch_size, 3, 256, 256, generator=generator)
        np.random.seed(seed)
        torch.manual_seed(seed)
        times, encode_times = [], []
        for _ in range(repeats):
            start = clock()
            self.train_step(images)
            times.append(clock() - start)
            start = clock()
            with torch.no_grad():
                model.vqgan.encode(images)
            encode_times.append(clock() - start)
        return {"step": times, "encode": encode_times}

    def train_flops(self, batch_size: int) -> dict:
        model = self._build_train(0)
        model.train()
        images = torch.rand(batch_size, 3, 256, 256, generator=torch.Generator().manual_seed(0))

        def step():
            loss, _, _ = model(images)
            loss.backward()
            model.zero_grad()

        total = count_flops(step)
        with torch.no_grad():
            encode = count_flops(model.vqgan.encode, images)
        return {"step": total / batch_size, "encode": encode / batch_size}


def serve(original: Original) -> None:
    """Answer JSON requests from stdin until it closes."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the original prints must not corrupt the replies
    for line in sys.stdin:
        request = json.loads(line)
        try:
            cmd = request.pop("cmd")
            if cmd == "ping":
                reply = {"model": original.model_name, "threads": torch.get_num_threads(), "torch": torch.__version__}
            elif cmd == "sampler":
                reply = original.sampler(**request)
            elif cmd == "sampler_flops":
                reply = original.sampler_flops()
            elif cmd == "train":
                reply = original.train(**request)
            elif cmd == "train_flops":
                reply = original.train_flops(**request)
            elif cmd == "sleep":  # lets the driver leave this process idle while it measures the peak
                reply = {}
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as error:  # report, keep serving
            reply = {"error": f"{type(error).__name__}: {error}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original-repo", required=True, type=Path, help="checkout of LTH14/mage (outside this repo)")
    parser.add_argument("--deps", type=Path, default=None,
                        help="folder with timm==0.3.2, omegaconf, antlr4, einops (pip install --target ...)")
    parser.add_argument("--model", default="mage_vit_base_patch16", help="original model factory name")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's choice)")
    parser.add_argument("--timer", choices=["wall", "cpu"], default="wall", help="see bench_utils.set_timer")
    parser.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (used by bench_*.py)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--train-repeats", type=int, default=3)
    return parser.parse_args(argv)


def main(args) -> None:
    repo = args.original_repo.resolve()
    if not (repo / "models_mage.py").is_file() or not (repo / "gen_img_uncond.py").is_file():
        raise SystemExit(
            f"{repo} is not a checkout of LTH14/mage (no models_mage.py / gen_img_uncond.py). Make one outside this "
            "repository, e.g. `git archive` of the original into /tmp/mage-original (see benchmarks/README.md)."
        )
    if args.deps is not None:
        sys.path.insert(0, str(args.deps.resolve()))
    set_threads(args.threads)
    set_timer(args.timer)
    install_shims()
    try:
        original = Original(repo, args.model)
    except ImportError as error:
        raise SystemExit(
            f"Cannot import the original code: {error}. Install its old dependencies into a folder outside the "
            "repository and pass it as --deps (see benchmarks/README.md)."
        ) from error
    if args.serve:
        serve(original)
        return
    peak = measure_matmul_peak()
    flops = original.sampler_flops()
    print(f"original {args.model}: {torch.get_num_threads()} threads, sgemm peak {peak:.1f} GFLOP/s")
    print(f"FLOPs per image: transformer step {flops['step'] / 1e9:.1f} G, VQ decode {flops['decode'] / 1e9:.1f} G")
    for batch_size in args.batch_sizes:
        original.sampler(batch_size, 1, seed=0)  # warm-up
        runs = [original.sampler(batch_size, args.steps, seed=i) for i in range(args.repeats)]
        run = min(runs, key=lambda r: r["total"])
        per_image = {k: v / batch_size for k, v in run.items()}
        gflop = (args.steps * flops["step"] + flops["decode"]) / 1e9
        print(f"sampler batch {batch_size}, {args.steps} steps: {per_image['total']:.2f} s/img "
              f"(steps {per_image['steps']:.2f}, decode {per_image['decode']:.2f}); "
              f"{gflop / per_image['total']:.1f} GFLOP/s = {gflop / per_image['total'] / peak:.0%} of peak")
    if args.train_repeats:
        train = original.train(args.train_batch_size, args.train_repeats + 1, seed=0)
        step = min(train["step"][1:]) / args.train_batch_size
        print(f"training batch {args.train_batch_size}: {step:.2f} s/img per step, "
              f"{args.train_batch_size / min(train['step'][1:]):.3f} img/s")


if __name__ == "__main__":
    main(parse_args())
