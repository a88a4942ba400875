# Copyright 2026 The mage-hf authors. MIT licence.
"""Train the MaskGIT VQGAN tokenizer ([`MageVQModel`]) that MAGE runs on, with Accelerate.

Losses (VQGAN's recipe, see `mage_hf.vq_training`): L1 or L2 reconstruction, codebook + `beta` * commitment through a
straight-through quantiser, an optional LPIPS-style perceptual loss (network read from a local file), and an optional
PatchGAN hinge loss that starts at `--disc_start_step` with VQGAN's adaptive weight. Codebook usage and perplexity are
logged, and codes unused for `--dead_code_steps` steps are restarted from encoder outputs.

The output folder is a `MageVQModel` (safetensors) plus a `MageImageProcessor` config; pass it to
`train_mage.py --vq_model`. Example (a small 64-pixel tokenizer with 4x down-sampling)::

    accelerate launch training/train_vqgan.py --train_data_dir photos/ --resolution 64 \
        --channel_multiplier 1 2 2 --base_channels 64 --num_embeddings 512 --embed_dim 64 \
        --max_train_steps 20000 --disc_start_step 5000 --output_dir vq-64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from mage_hf import MageImageProcessor, MageVQConfig, MageVQModel
from mage_hf.training_utils import (
    RandomResizedCropFlip,
    ResumableState,
    ShardedBatchSampler,
    center_crop_resize,
    check_mixed_precision,
    check_ranges,
    cosine_lr_with_warmup,
    end_training,
    image_grid,
    keep_freed_memory,
    keyed_generator,
    load_image_dataset,
    record_base_model,
    resolve_checkpoint,
    save_checkpoint,
)
from mage_hf.vq_training import (
    CodebookUsageTracker,
    LPIPSPerceptualLoss,
    MageVQForTraining,
    PatchGANDiscriminator,
    adaptive_adversarial_weight,
    code_histogram,
    hinge_discriminator_loss,
    psnr,
    restart_dead_codes,
)

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", help="Hub dataset or a folder saved with `Dataset.save_to_disk`.")
    data.add_argument("--train_data_dir", help="An imagefolder (`<root>/<class>/<image>`).")
    data.add_argument("--split", default="train")
    data.add_argument("--image_column", help="Image column (found automatically when left out).")
    data.add_argument("--max_train_samples", type=int, help="Use only the first N images.")
    data.add_argument("--cache_dir")
    data.add_argument(
        "--resolution", type=int, default=256, help="Training image side (a multiple of the down-sampling factor)."
    )
    data.add_argument(
        "--random_crop_scale",
        type=float,
        nargs=2,
        default=(0.5, 1.0),
        help="Area range of the random resized crop; `1 1` takes the whole (square) image.",
    )
    data.add_argument("--no_hflip", action="store_true", help="Do not flip images horizontally.")
    data.add_argument(
        "--num_validation_images",
        type=int,
        default=16,
        help="Images held out of training (centre-cropped) for reconstruction PSNR and image grids.",
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    model = p.add_argument_group("tokenizer (ignored with --vq_model_name_or_path / --vq_config)")
    model.add_argument("--vq_model_name_or_path", help="Start from this MageVQModel folder (fine-tune a tokenizer).")
    model.add_argument("--vq_config", help="JSON file with MageVQConfig arguments.")
    model.add_argument("--base_channels", type=int, default=128)
    model.add_argument(
        "--channel_multiplier",
        type=int,
        nargs="+",
        default=[1, 1, 2, 2, 4],
        help="One entry per level; down-sampling is 2 ** (levels - 1).",
    )
    model.add_argument("--num_res_blocks", type=int, default=2)
    model.add_argument("--num_embeddings", type=int, default=1024, help="Codebook size.")
    model.add_argument("--embed_dim", type=int, default=256)
    model.add_argument("--norm_num_groups", type=int, default=32)
    loss = p.add_argument_group("losses")
    loss.add_argument("--reconstruction_loss", choices=["l1", "l2"], default="l1")
    loss.add_argument("--codebook_beta", type=float, default=0.25, help="Weight of the commitment loss.")
    loss.add_argument("--perceptual_weights", help="Local VGG-style state dict for the perceptual loss (see README).")
    loss.add_argument("--perceptual_lin_weights", help="Local LPIPS linear-layer weights (lin{k}.model.1.weight).")
    loss.add_argument("--perceptual_weight", type=float, default=1.0)
    loss.add_argument(
        "--disc_weight", type=float, default=0.0, help="Adversarial loss weight; 0 disables the discriminator."
    )
    loss.add_argument("--disc_start_step", type=int, default=10000, help="Step at which the adversarial loss starts.")
    loss.add_argument("--no_adaptive_disc_weight", action="store_true", help="Use --disc_weight as is.")
    loss.add_argument("--disc_num_layers", type=int, default=3)
    loss.add_argument("--disc_base_channels", type=int, default=64)
    loss.add_argument("--disc_learning_rate", type=float, help="Defaults to --learning_rate.")
    code = p.add_argument_group("codebook")
    code.add_argument(
        "--usage_window", type=int, default=100, help="Steps over which usage and perplexity are measured."
    )
    code.add_argument(
        "--dead_code_steps", type=int, default=200, help="Restart codes unused for this many steps (0: never)."
    )
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--train_batch_size", type=int, default=8, help="Per device.")
    opt.add_argument("--num_train_epochs", type=int, default=1)
    opt.add_argument("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    opt.add_argument("--learning_rate", type=float, default=1e-4)
    opt.add_argument("--adam_beta1", type=float, default=0.5)
    opt.add_argument("--adam_beta2", type=float, default=0.9)
    opt.add_argument("--adam_weight_decay", type=float, default=0.0)
    opt.add_argument(
        "--lr_scheduler",
        choices=["constant", "cosine"],
        default="constant",
        help="After the linear warm-up: constant, or a half-cycle cosine to 0 (both networks).",
    )
    opt.add_argument("--lr_warmup_steps", type=int, default=0)
    opt.add_argument("--max_grad_norm", type=float, default=1.0)
    opt.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                    help="Keep the memory malloc frees for the next steps instead of faulting it in again every step "
                    "(glibc only; see mage_hf.training_utils.keep_freed_memory).")
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    run.add_argument("--report_to", default="tensorboard", help="Accelerate tracker(s), or `none`.")
    run.add_argument("--logging_dir", default="logs", help="Under --output_dir.")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument(
        "--image_logging_steps", type=int, default=500, help="Reconstruction grid + held-out PSNR every N steps."
    )
    run.add_argument("--checkpointing_steps", type=int, default=1000)
    run.add_argument("--checkpoints_total_limit", type=int, help="Keep at most this many checkpoints.")
    run.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or `latest`.")
    args = p.parse_args(argv)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        p.error("give exactly one of --dataset_name and --train_data_dir")
    if args.vq_model_name_or_path and args.vq_config:
        p.error("give at most one of --vq_model_name_or_path and --vq_config")
    check_ranges(p, args, {
        "train_batch_size": 1, "num_train_epochs": 1, "max_train_steps": 1, "logging_steps": 1,
        "image_logging_steps": 1, "checkpointing_steps": 1, "checkpoints_total_limit": 1, "lr_warmup_steps": 0,
        "max_grad_norm": 0, "codebook_beta": 0, "perceptual_weight": 0, "disc_start_step": 0, "max_train_samples": 1,
        "dataloader_num_workers": 0,
    }, positive=("learning_rate", "disc_learning_rate"))
    return args


class AugmentedImages(torch.utils.data.Dataset):
    """`(epoch, index)` (from `ShardedBatchSampler`) -> the image's random crop/flip, drawn from a generator keyed by
    (seed, epoch, index): a resumed run, or one with more processes or workers, sees the same views."""

    def __init__(self, dataset, image_column: str, transform: RandomResizedCropFlip, seed: int):
        self.dataset, self.image_column, self.transform, self.seed = dataset, image_column, transform, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, index = key
        return self.transform(self.dataset[index][self.image_column], keyed_generator(self.seed, epoch, index))


def build_vq_model(args: argparse.Namespace) -> MageVQModel:
    if args.vq_model_name_or_path:
        model = MageVQModel.from_pretrained(args.vq_model_name_or_path)
        model.config.resolution = args.resolution
        return model
    if args.vq_config:
        kwargs = json.loads(Path(args.vq_config).read_text())
    else:
        kwargs = dict(
            base_channels=args.base_channels,
            channel_multiplier=args.channel_multiplier,
            num_res_blocks=args.num_res_blocks,
            num_embeddings=args.num_embeddings,
            embed_dim=args.embed_dim,
            norm_num_groups=args.norm_num_groups,
        )
    kwargs["resolution"] = args.resolution
    return MageVQModel(MageVQConfig(**kwargs))


def reconstruct(model: MageVQModel, pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(chunk) for chunk in pixels.split(batch_size)])
    model.train()
    return out


def log_reconstructions(accelerator, model, val_pixels, args, step) -> float:
    """Held-out PSNR (dB) and a grid (originals above reconstructions) as a PNG and in tensorboard."""
    recon = reconstruct(model, val_pixels.to(accelerator.device), args.train_batch_size)
    value = float(psnr(recon, val_pixels.to(recon.device)).mean())
    shown = min(8, len(val_pixels))
    grid = image_grid(torch.cat([val_pixels[:shown].cpu(), recon[:shown].cpu()]), nrow=shown)
    folder = Path(args.output_dir) / "reconstructions"
    folder.mkdir(parents=True, exist_ok=True)
    grid.save(folder / f"step-{step:07d}.png")
    if "tensorboard" in args.report_to:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("reconstructions", np.asarray(grid), step, dataformats="HWC")
    accelerator.log({"val/psnr": value}, step=step)
    return value


def main(args: argparse.Namespace) -> dict:
    if args.keep_freed_memory:
        keep_freed_memory()
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    check_mixed_precision(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        record_base_model(args.output_dir, args.vq_model_name_or_path)

    # Data: hold some images out (a fixed, seeded choice) for PSNR and grids; augment the rest.
    dataset, image_column, _ = load_image_dataset(
        args.dataset_name,
        args.train_data_dir,
        args.split,
        args.image_column,
        max_samples=args.max_train_samples,
        cache_dir=args.cache_dir,
    )
    num_val = min(args.num_validation_images, len(dataset) - 1)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
    val_pixels = (
        torch.stack([center_crop_resize(dataset[i][image_column], args.resolution) for i in order[:num_val]])
        if num_val > 0
        else None
    )
    train_set = AugmentedImages(
        dataset.select(sorted(order[num_val:])),
        image_column,
        RandomResizedCropFlip(args.resolution, scale=tuple(args.random_crop_scale), hflip=not args.no_hflip),
        args.seed,
    )

    # Models and losses.
    vq_model = build_vq_model(args)
    factor = vq_model.config.downsample_factor
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of the down-sampling factor {factor}.")
    wrapper = MageVQForTraining(vq_model).train()
    num_codes = vq_model.config.num_embeddings
    perceptual = None
    if args.perceptual_weights:
        perceptual = LPIPSPerceptualLoss.from_files(args.perceptual_weights, args.perceptual_lin_weights)
        perceptual.to(accelerator.device)
    elif args.perceptual_lin_weights:
        raise ValueError("--perceptual_lin_weights needs --perceptual_weights (the network they weight).")
    disc = None
    if args.disc_weight > 0:
        disc = PatchGANDiscriminator(vq_model.config.num_channels, args.disc_base_channels, args.disc_num_layers)
        disc.check_input_size(args.resolution)  # fail now rather than at --disc_start_step

    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = len(train_set) // (args.train_batch_size * world)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training images cannot fill one batch of {args.train_batch_size} x {world} processes; "
            "lower --train_batch_size or --num_validation_images."
        )
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    betas = (args.adam_beta1, args.adam_beta2)
    min_lr_ratio = 1.0 if args.lr_scheduler == "constant" else 0.0
    opt_g = torch.optim.AdamW(
        wrapper.parameters(), lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay
    )
    schedulers = [cosine_lr_with_warmup(opt_g, args.lr_warmup_steps, max_steps, min_lr_ratio)]
    tracker = CodebookUsageTracker(num_codes, args.usage_window, seed=args.seed)  # same seed on every rank
    state = ResumableState({}, rank, world)
    if disc is not None:
        opt_d = torch.optim.AdamW(
            disc.parameters(),
            lr=args.disc_learning_rate or args.learning_rate,
            betas=betas,
            weight_decay=args.adam_weight_decay,
        )
        # The discriminator's schedule spans the steps it trains: from --disc_start_step to the end.
        disc_steps = max(1, max_steps - args.disc_start_step)
        sched_d = cosine_lr_with_warmup(opt_d, min(args.lr_warmup_steps, disc_steps), disc_steps, min_lr_ratio)
        schedulers.append(sched_d)
        wrapper, disc, opt_g, opt_d = accelerator.prepare(wrapper, disc, opt_g, opt_d)
    else:
        wrapper, opt_g = accelerator.prepare(wrapper, opt_g)
    # The schedulers are stepped by hand, once per optimiser step, whatever the number of processes.
    accelerator.register_for_checkpointing(tracker, state, *schedulers)
    model = accelerator.unwrap_model(wrapper).vq_model
    last_layer = model.decoder.conv_out.weight  # where VQGAN balances the reconstruction and adversarial gradients

    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint:
        accelerator.load_state(checkpoint)  # weights, optimisers, schedulers, RNGs, codebook statistics, step
        logger.info("Resumed from %s at step %d", checkpoint, state.global_step)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("train_vqgan", config={k: str(v) for k, v in vars(args).items()})

    # The data stream, resumed at the first batch not yet consumed.
    sampler = ShardedBatchSampler(
        len(train_set), args.train_batch_size, world, rank, args.seed, state.global_step, max_steps
    )
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=args.dataloader_num_workers)
    logger.info("%d training images, %d held out, %d steps", len(train_set), num_val, max_steps)
    results: dict = {}
    for pixels in loader:
        pixels = pixels.to(accelerator.device)
        global_step = state.global_step
        disc_on = disc is not None and global_step >= args.disc_start_step
        with accelerator.autocast():
            out = wrapper(pixels)
            recon = out.reconstruction
            if args.reconstruction_loss == "l1":
                rec_loss = (recon.float() - pixels.float()).abs().mean()
            else:
                rec_loss = F.mse_loss(recon.float(), pixels.float())
            nll = rec_loss
            logs = {
                "loss/reconstruction": rec_loss.item(),
                "loss/codebook": out.codebook_loss.item(),
                "loss/commitment": out.commitment_loss.item(),
            }
            if perceptual is not None:
                p_loss = perceptual(recon, pixels)
                nll = nll + args.perceptual_weight * p_loss
                logs["loss/perceptual"] = p_loss.item()
            loss = nll + out.codebook_loss + args.codebook_beta * out.commitment_loss
            if disc_on:
                g_loss = -disc(recon).float().mean()
                weight = torch.tensor(args.disc_weight)
                if not args.no_adaptive_disc_weight:
                    # with float16, at the loss scale the main backward pass takes (tiny gradients underflow otherwise)
                    scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
                    weight = adaptive_adversarial_weight(nll, g_loss, last_layer, grad_scale=scale) * args.disc_weight
                loss = loss + weight * g_loss
                logs.update({"loss/generator_adversarial": g_loss.item(), "disc/adaptive_weight": float(weight)})
        accelerator.backward(loss)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(wrapper.parameters(), args.max_grad_norm)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

        if disc_on:
            opt_d.zero_grad(set_to_none=True)  # drop what the generator's loss left on the discriminator
            with accelerator.autocast():
                d_loss = hinge_discriminator_loss(disc(pixels), disc(recon.detach()))
            accelerator.backward(d_loss)
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(disc.parameters(), args.max_grad_norm)
            opt_d.step()
            sched_d.step()
            opt_d.zero_grad(set_to_none=True)
            logs["loss/discriminator"] = d_loss.item()

        # Codebook statistics, summed over processes so every process restarts the same codes the same way.
        counts = accelerator.reduce(code_histogram(out.token_ids, num_codes), reduction="sum")
        tracker.update(counts)
        if args.dead_code_steps > 0:
            dead = tracker.dead_codes(args.dead_code_steps)
            restarted = restart_dead_codes(
                model.quantize.embedding.weight,
                dead,
                out.latents,
                tracker.generator,
                gather=accelerator.gather if accelerator.num_processes > 1 else None,
                optimizer=opt_g,
            )
            tracker.mark_restarted(dead)
            logs["codebook/restarted"] = restarted
        logs.update(
            {
                "loss/total": loss.item(),
                "codebook/usage": tracker.usage(),
                "codebook/perplexity": tracker.perplexity(),
                "lr": schedulers[0].get_last_lr()[0],
            }
        )
        schedulers[0].step()
        state.global_step = global_step = global_step + 1
        if global_step % args.logging_steps == 0 or global_step == 1:
            accelerator.log(logs, step=global_step)
            logger.info("step %d: %s", global_step, {k: round(v, 4) for k, v in logs.items()})
        if val_pixels is not None and accelerator.is_main_process and global_step % args.image_logging_steps == 0:
            log_reconstructions(accelerator, model, val_pixels, args, global_step)
        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)

    global_step = state.global_step
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.save_pretrained(args.output_dir)
        MageImageProcessor(size=args.resolution, crop_size=args.resolution).save_pretrained(args.output_dir)
        results = {"step": global_step, "codebook_usage": tracker.usage(), "codebook_perplexity": tracker.perplexity()}
        if val_pixels is not None:
            results["val_psnr"] = log_reconstructions(accelerator, model, val_pixels, args, global_step)
            results["num_validation_images"] = len(val_pixels)
        (Path(args.output_dir) / "eval_results.json").write_text(json.dumps(results, indent=2))
        logger.info("Saved the tokenizer to %s: %s", args.output_dir, results)
    wrapper = opt_g = disc = opt_d = None  # the wrappers `prepare` made, before the process group (see `end_training`)
    end_training(accelerator)
    return results


if __name__ == "__main__":
    main(parse_args())
