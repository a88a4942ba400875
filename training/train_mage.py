# Copyright 2026 The mage-hf authors. MIT licence.
"""Train (or fine-tune) MAGE by masked token modelling on any image dataset, with 🤗 Accelerate.

    accelerate launch training/train_mage.py --dataset_name ./my_saved_dataset --vq_model ./vqgan \
        --model_size base --output_dir mage-out

See training/README.md for the recipe, the options (class-conditional MAGE, MAGE-C, precomputed tokens) and how
to scale out. The helpers live in `mage_hf.training_utils`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed

from mage_hf import MageConfig, MageForMaskedImageModeling, MageImageProcessor, MageVQModel
from mage_hf.modeling_mage import sample_mask_ratio
from mage_hf.training_utils import (
    RandomResizedCropFlip,
    ResumableState,
    ShardedBatchSampler,
    center_crop_resize,
    check_hub_access,
    check_mixed_precision,
    check_ranges,
    clip_grad_norm_,
    cosine_lr_with_warmup,
    end_training,
    image_grid,
    info_nce_loss,
    keep_freed_memory,
    keyed_generator,
    load_image_dataset,
    masked_reconstruction_grid,
    param_groups_weight_decay,
    parameter_checksum,
    precompute_view_tokens,
    record_base_model,
    resolve_checkpoint,
    save_checkpoint,
    write_model_card,
)

logger = get_logger(__name__)

# Encoder/decoder sizes; the tokenizer comes from --vq_model. base and large are MAGE ViT-B and ViT-L.
MODEL_SIZES = {
    "tiny": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                 decoder_hidden_size=192, decoder_num_hidden_layers=2, decoder_num_attention_heads=3,
                 decoder_intermediate_size=768),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 decoder_hidden_size=768, decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                 decoder_intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  decoder_hidden_size=1024, decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                  decoder_intermediate_size=4096),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model", help="A MageForMaskedImageModeling folder to continue from.")
    g.add_argument("--config", help="A MageConfig json (or a folder with config.json) for a model from scratch.")
    g.add_argument("--model_size", choices=sorted(MODEL_SIZES), help="Size preset for a model from scratch.")
    g.add_argument("--vq_model", help="A MageVQModel folder (train_vqgan.py's output or a converted tokenizer).")
    g.add_argument("--contrastive_projection_dim", type=int, default=256, help="MAGE-C head width (new heads).")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", help="Hub dataset or a local save_to_disk folder.")
    g.add_argument("--train_data_dir", help="An image folder (<root>/<class>/<image>).")
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--image_column")
    g.add_argument("--class_column", help="Train class-conditional MAGE on this label column.")
    g.add_argument("--streaming", action="store_true", help="Read the dataset lazily (needs --max_train_steps).")
    g.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="With --streaming.")
    g.add_argument("--max_train_samples", type=int)
    g.add_argument("--cache_dir")
    g.add_argument("--resolution", type=int, help="Defaults to the tokenizer's resolution.")
    g.add_argument("--min_crop_scale", type=float, default=0.2, help="RandomResizedCrop scale=(min, 1).")
    g.add_argument("--no_hflip", action="store_true")
    g.add_argument("--precompute_tokens", action="store_true", help="Tokenize augmented views once, up front.")
    g.add_argument("--precompute_views", type=int, default=4, help="Views per image with --precompute_tokens.")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g = p.add_argument_group("optimisation (MAGE's recipe by default)")
    g.add_argument("--train_batch_size", type=int, default=64, help="Per device.")
    g.add_argument("--num_train_epochs", type=float, default=1.0)
    g.add_argument("--max_train_steps", type=int, help="Optimiser steps; overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--blr", type=float, default=1.5e-4, help="lr = blr * total batch / 256.")
    g.add_argument("--learning_rate", type=float, help="Absolute learning rate (overrides --blr).")
    g.add_argument("--min_lr_ratio", type=float, default=0.0)
    g.add_argument("--lr_warmup_steps", type=int, help="Defaults to 2.5%% of the steps (MAGE: 40 of 1600 epochs).")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.95)
    g.add_argument("--fused_adam", action=argparse.BooleanOptionalAction, default=True,
                    help="torch's fused AdamW kernel: one pass per parameter (--no-fused_adam: the default loop).")
    g.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                    help="Keep the memory malloc frees for the next steps instead of faulting it in again every step "
                    "(glibc only; see mage_hf.training_utils.keep_freed_memory).")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--max_grad_norm", type=float, default=3.0)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--class_dropout_prob", type=float, default=0.1, help="Label -> unconditional, for guidance.")
    g.add_argument("--contrastive_weight", type=float, default=0.0, help="MAGE-C: loss = mage + w * InfoNCE.")
    g.add_argument("--contrastive_temperature", type=float, default=0.1)
    g.add_argument("--local_negatives", action="store_true", help="MAGE-C negatives from this process only.")
    g = p.add_argument_group("checkpoints, logging, hub")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int)
    g.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint-<step> folder.")
    g.add_argument("--report_to", default="tensorboard")
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--validation_steps", type=int, default=500, help="0 disables validation.")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--debug_check_sync", action="store_true",
                   help="Assert after every step that all ranks hold identical weights and disjoint data.")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id")
    g.add_argument("--hub_token")
    args = p.parse_args(argv)

    if sum(x is not None for x in (args.pretrained_model, args.config, args.model_size)) != 1:
        p.error("Give exactly one of --pretrained_model, --config, --model_size.")
    if args.pretrained_model is None and args.vq_model is None:
        p.error("A model from scratch needs its tokenizer: --vq_model PATH (a MageVQModel folder).")
    if args.pretrained_model and args.vq_model:
        p.error("--pretrained_model already holds its tokenizer; drop --vq_model.")
    if args.streaming and (args.max_train_steps is None or args.precompute_tokens):
        p.error("--streaming needs --max_train_steps (the length is unknown) and cannot --precompute_tokens.")
    check_ranges(p, args, {
        "train_batch_size": 1, "gradient_accumulation_steps": 1, "max_train_steps": 1, "checkpointing_steps": 1,
        "checkpoints_total_limit": 1, "validation_steps": 0, "num_validation_images": 1, "precompute_views": 1,
        "contrastive_weight": 0, "max_train_samples": 1, "dataloader_num_workers": 0, "max_grad_norm": 0,
    }, positive=("num_train_epochs", "contrastive_temperature", "learning_rate", "blr"))
    if args.precompute_tokens and args.contrastive_weight and args.precompute_views < 2:
        p.error("--precompute_views must be >= 2 with --contrastive_weight (two views per image).")
    if not 0 <= args.class_dropout_prob <= 1:
        p.error("--class_dropout_prob must be in [0, 1].")
    return args


def build_model(args, num_classes: int) -> MageForMaskedImageModeling:
    overrides = {"num_classes": num_classes} if num_classes else {}
    if args.contrastive_weight > 0:
        overrides["contrastive_projection_dim"] = args.contrastive_projection_dim
    if args.pretrained_model:
        if args.contrastive_weight > 0:  # keep a saved MAGE-C head (and its width)
            saved = MageConfig.from_pretrained(args.pretrained_model).contrastive_projection_dim
            overrides["contrastive_projection_dim"] = saved or args.contrastive_projection_dim
        model = MageForMaskedImageModeling.from_pretrained(args.pretrained_model, **overrides)
        grid = model.config.vq_config.grid_size
        if args.resolution and args.resolution // model.config.vq_config.downsample_factor != grid:
            raise ValueError(
                f"This model takes {grid}x{grid} tokens, i.e. --resolution {model.config.vq_config.resolution}."
            )
        return model
    vq = MageVQModel.from_pretrained(args.vq_model)
    fields = MageConfig.from_pretrained(args.config).to_dict() if args.config else dict(MODEL_SIZES[args.model_size])
    vq_fields = vq.config.to_dict()
    vq_fields["resolution"] = args.resolution or vq.config.resolution  # the tokenizer is fully convolutional
    fields.update(overrides, vq_config=vq_fields)
    model = MageForMaskedImageModeling(MageConfig.from_dict(fields))
    model.mage.vq_model.load_state_dict(vq.state_dict())
    model.freeze_tokenizer()
    return model


class TrainExamples(torch.utils.data.Dataset):
    """Example `(epoch, index)` -> its views (tokens or pixels), label and index. Every random choice comes from
    generators keyed by (seed, epoch, index), so nothing here carries state across a resume."""

    def __init__(self, dataset, args, image_column, class_column, transform, num_views):
        self.dataset, self.args, self.transform, self.num_views = dataset, args, transform, num_views
        self.image_column, self.class_column = image_column, class_column

    def example(self, row, epoch, index):
        seed, out = self.args.seed, {"index": torch.tensor(index)}
        if self.args.precompute_tokens:  # pick distinct precomputed views
            views = torch.randperm(self.args.precompute_views, generator=keyed_generator(seed, 1, epoch, index))
            out["input_ids"] = torch.as_tensor(row["mage_tokens"])[views[: self.num_views]].long()  # (V, L)
        else:
            image = row[self.image_column]
            out["pixel_values"] = torch.stack(
                [self.transform(image, keyed_generator(seed, 1, epoch, index, v)) for v in range(self.num_views)]
            )  # (V, 3, H, W)
        if self.class_column is not None:
            drop = torch.rand((), generator=keyed_generator(seed, 3, epoch, index)) < self.args.class_dropout_prob
            out["class_labels"] = torch.tensor(-1 if drop else int(row[self.class_column]))
        return out

    def __getitem__(self, key):
        epoch, index = key
        return self.example(self.dataset[index], epoch, index)


class StreamedExamples(torch.utils.data.IterableDataset):
    """The same for a streamed dataset: this rank's shard, epoch after epoch, after skipping `skip` examples."""

    def __init__(self, examples: TrainExamples, rank, world, skip):
        self.examples, self.rank, self.world, self.skip = examples, rank, world, skip

    def __iter__(self):
        from datasets.distributed import split_dataset_by_node

        position, epoch = 0, 0
        while True:
            args = self.examples.args
            stream = self.examples.dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
            stream.set_epoch(epoch)
            for row in split_dataset_by_node(stream, rank=self.rank, world_size=self.world):
                if position >= self.skip:  # a key unique to (rank, position) stands in for the example index
                    yield self.examples.example(row, epoch, self.rank * 2**40 + position)
                position += 1
            if position == 0:
                raise ValueError("This process's shard of the streamed dataset is empty.")
            epoch += 1


def collate(examples):
    """Stack examples view-major: rows [v * B, (v + 1) * B) hold view v of the B examples."""
    batch = {"index": torch.stack([e["index"] for e in examples])}
    for key in ("input_ids", "pixel_values"):
        if key in examples[0]:
            batch[key] = torch.stack([e[key] for e in examples], 1).flatten(0, 1)  # (V * B, ...)
    if "class_labels" in examples[0]:
        views = len(batch.get("input_ids", batch.get("pixel_values"))) // len(examples)
        batch["class_labels"] = torch.stack([e["class_labels"] for e in examples]).repeat(views)
    return batch


@torch.no_grad()
def validate(accelerator, model, images, labels, step, args):
    """Masked-token reconstructions (and generated samples once the pipeline exists), logged and saved as PNG."""
    model.eval()
    device = accelerator.device
    pictures = {}
    pictures["reconstruction"], accuracy = masked_reconstruction_grid(
        model, images.to(device), 0.5, keyed_generator(args.seed, 5), labels.to(device) if labels is not None else None
    )
    try:
        from mage_hf.pipeline_mage import MageGenerationPipeline
        from mage_hf.scheduling_mage import MageScheduler
    except ImportError:
        MageGenerationPipeline = None  # the generation pipeline is not in this install
    if MageGenerationPipeline is not None:
        pipe = MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(model.config))
        pipe.set_progress_bar_config(disable=True)
        generators = [keyed_generator(args.seed, 6, i) for i in range(len(images))]
        kwargs = {"class_labels": labels.tolist()} if labels is not None else {}
        samples = pipe(num_images=len(images), num_inference_steps=8, generator=generators, output_type="pt", **kwargs)
        pictures["samples"] = image_grid(samples.images, nrow=len(images))
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    for name, picture in pictures.items():
        picture.save(os.path.join(args.output_dir, "validation", f"{name}-{step:07d}.png"))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(f"validation/{name}", np.asarray(picture), step, dataformats="HWC")
    accelerator.log({"val/masked_token_accuracy_50": accuracy}, step=step)
    model.train()


def main(args):
    if args.keep_freed_memory:
        keep_freed_memory()
    project = ProjectConfiguration(args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to, project_config=project,
    )
    check_mixed_precision(accelerator)
    if args.push_to_hub:  # before anything slow: an upload that cannot happen must not cost a training run
        repo_id = check_hub_access(args.hub_model_id, args.hub_token) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        record_base_model(args.output_dir, args.pretrained_model, push_to_hub=args.push_to_hub)
    set_seed(args.seed)  # model initialisation (identical on every rank); training randomness is keyed below
    rank, world = accelerator.process_index, accelerator.num_processes

    # ---- data and model
    with accelerator.main_process_first():
        dataset, image_column, class_column = load_image_dataset(
            args.dataset_name, args.train_data_dir, args.dataset_split, args.image_column, args.class_column,
            args.streaming, args.max_train_samples, args.cache_dir,
        )
    class_column = class_column if args.class_column else None  # labels are used only when asked for
    num_classes, class_names = 0, None
    if class_column is not None:
        feature = dataset.features[class_column]
        if args.streaming and not hasattr(feature, "names"):
            raise ValueError(f"With --streaming, --class_column {class_column!r} must be a ClassLabel column.")
        values = [] if args.streaming else dataset[class_column]
        wrong = next((v for v in values if not isinstance(v, int) or isinstance(v, bool)), None)
        if wrong is not None:
            raise ValueError(
                f"--class_column {class_column!r} must hold class ids (integers from 0) or be a ClassLabel; it holds "
                f"e.g. {wrong!r}. Cast it first (dataset.class_encode_column)."
            )
        if values and min(values) < 0:
            raise ValueError(
                f"--class_column {class_column!r} holds negative ids (such as -1 for unlabelled rows); filter those "
                "rows out, or train without --class_column."
            )
        if hasattr(feature, "names"):  # a ClassLabel
            num_classes, class_names = len(feature.names), list(feature.names)
        else:
            num_classes = max(values) + 1
    model = build_model(args, num_classes)
    if class_names:  # saved with the model, so pipelines and the demo app can show and take class names
        model.config.id2label = dict(enumerate(class_names))
        model.config.label2id = {name: i for i, name in enumerate(class_names)}
    set_seed(args.seed, device_specific=True)  # from here on (dropout), each rank its own stream: seed + rank
    if args.contrastive_weight == 0 and model.contrastive_head is not None:
        model.contrastive_head.requires_grad_(False)  # unused: keep DDP from waiting for its gradients
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers 5 name of gradient checkpointing
    resolution = model.config.vq_config.resolution
    transform = RandomResizedCropFlip(resolution, scale=(args.min_crop_scale, 1.0), hflip=not args.no_hflip)
    num_views = 2 if args.contrastive_weight > 0 else 1

    num_val = args.num_validation_images
    raw = dataset.take(num_val) if args.streaming else dataset.select(range(min(len(dataset), num_val)))
    val_images = torch.stack([center_crop_resize(row[image_column], resolution) for row in raw])
    val_labels = torch.tensor([int(row[class_column]) for row in raw]) if class_column else None

    if args.precompute_tokens:
        vq = model.mage.vq_model.to(accelerator.device)
        with accelerator.main_process_first():
            dataset = precompute_view_tokens(
                dataset, image_column, vq, transform, args.precompute_views, args.seed, accelerator.device,
                os.path.join(args.cache_dir or os.path.join(args.output_dir, "token_cache"), "tokens.arrow"),
            )
        dataset = dataset.with_format("numpy", columns=["mage_tokens"], output_all_columns=True)

    # ---- schedule: lr = blr * total batch / 256, warm-up then half-cycle cosine
    total_batch = args.train_batch_size * world * args.gradient_accumulation_steps
    if args.max_train_steps is None:
        micro_per_epoch = len(dataset) // (args.train_batch_size * world)
        steps = args.num_train_epochs * micro_per_epoch / args.gradient_accumulation_steps
        args.max_train_steps = max(1, math.ceil(steps))
    lr = args.learning_rate if args.learning_rate is not None else args.blr * total_batch / 256
    warmup = args.lr_warmup_steps if args.lr_warmup_steps is not None else math.ceil(0.025 * args.max_train_steps)
    optimizer = torch.optim.AdamW(
        param_groups_weight_decay(model, args.weight_decay), lr=lr, betas=(args.adam_beta1, args.adam_beta2),
        fused=args.fused_adam or None,
    )
    warmup = min(warmup, args.max_train_steps)
    lr_scheduler = cosine_lr_with_warmup(optimizer, warmup, args.max_train_steps, args.min_lr_ratio)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The step count. Masks come from generators keyed by micro-batch and example (see draw_masks), so they need
    # no saved state of their own; torch/numpy/python RNGs (dropout) are saved per rank by Accelerate.
    state = ResumableState({}, rank, world)
    accelerator.register_for_checkpointing(lr_scheduler, state)  # stepped by hand: one step per optimiser step

    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint:
        accelerator.load_state(checkpoint)  # weights, optimiser, scheduler, every rank's RNGs, generators, step
        logger.info(f"Resumed from {checkpoint} at step {state.global_step}")
        if accelerator.is_main_process:  # forget what the interrupted run logged after this checkpoint
            drop_metrics_after(os.path.join(args.output_dir, "metrics.jsonl"), state.global_step)
    if accelerator.is_main_process:
        hparams = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("train_mage", config=hparams)

    # ---- data stream, resumed at the first micro-batch not yet consumed
    examples = TrainExamples(dataset, args, image_column, class_column, transform, num_views)
    accum = args.gradient_accumulation_steps
    start, total = state.global_step * accum, args.max_train_steps * accum  # in micro-batches
    loader_rng = torch.Generator().manual_seed(args.seed)  # so that making a loader draws nothing from torch's RNG
    if args.streaming:
        loader = torch.utils.data.DataLoader(StreamedExamples(examples, rank, world, start * args.train_batch_size),
                                             batch_size=args.train_batch_size, collate_fn=collate, generator=loader_rng)
    else:
        sampler = ShardedBatchSampler(len(dataset), args.train_batch_size, world, rank, args.seed, start, total)
        loader = torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=args.dataloader_num_workers, generator=loader_rng)

    logger.info(f"{args.max_train_steps} steps of {total_batch} images, lr {lr:.3g}, warm-up {warmup}, {world} ranks")
    unwrapped = accelerator.unwrap_model(model)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    sums, clock, loss = {}, time.perf_counter(), None
    model.train()
    for micro, batch in enumerate(loader, start=start):
        if state.global_step >= args.max_train_steps:
            break
        with accelerator.accumulate(model):
            if "input_ids" in batch:
                ids = batch["input_ids"].to(accelerator.device)
            else:  # the frozen tokenizer in float32, outside autocast
                ids = unwrapped.mage.tokenize(batch["pixel_values"].to(accelerator.device), channels_last=True)
            labels = batch["class_labels"].to(accelerator.device) if "class_labels" in batch else None
            views = len(ids) // len(batch["index"])
            mask_ratio, noise = draw_masks(unwrapped.config, args.seed, micro, batch["index"], views)
            out = model(input_ids=ids, class_labels=labels, mask_ratio=mask_ratio, noise=noise.to(ids.device),
                        masked_logits_only=True)  # the loss and the accuracy read masked positions only
            loss = out.loss
            step_metrics = {"mage_loss": out.loss.detach(), "mask_ratio": torch.tensor(out.mask_ratio),
                            "masked_token_accuracy": (out.logits.argmax(-1) == ids)[out.token_mask].float().mean()}
            if args.contrastive_weight > 0:
                z1, z2 = out.contrastive_embeddings.chunk(2)  # view 0 rows, then view 1 rows
                contrastive = info_nce_loss(z1, z2, args.contrastive_temperature, gather=not args.local_negatives)
                loss = loss + args.contrastive_weight * contrastive
                step_metrics["contrastive_loss"] = contrastive.detach()
            step_metrics["loss"] = loss.detach()
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                clip_grad_norm_(model.parameters(), args.max_grad_norm, accelerator)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for key, value in step_metrics.items():
            sums[key] = sums.get(key, 0.0) + value.float().cpu() / args.gradient_accumulation_steps
        if args.debug_check_sync:
            sums.setdefault("indices", []).append(batch["index"].to(accelerator.device))
        if not accelerator.sync_gradients:
            continue

        # ---- one optimiser step done
        step_lr = lr_scheduler.get_last_lr()[0]  # the rate this step used
        if not accelerator.optimizer_step_was_skipped:
            lr_scheduler.step()
        state.global_step += 1
        step = state.global_step
        indices = sums.pop("indices", None)
        keys = sorted(sums)
        means = accelerator.reduce(torch.stack([sums[k] for k in keys]).to(accelerator.device), "mean")
        logs = {k: float(v) for k, v in zip(keys, means)}
        now = time.perf_counter()
        logs.update(lr=step_lr, images_per_second=total_batch * num_views / (now - clock))
        if not args.streaming:
            logs["epoch"] = step * total_batch / len(dataset)
        sums = {}
        if args.debug_check_sync:
            logs.update(check_sync(accelerator, unwrapped, torch.cat(indices)))
        accelerator.log({k: v for k, v in logs.items() if isinstance(v, float)}, step=step)
        if accelerator.is_main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit)
        if args.validation_steps and step % args.validation_steps == 0 and accelerator.is_main_process:
            # Its own generators, in eval mode, under a forked RNG: validating changes nothing in training.
            with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
                validate(accelerator, unwrapped, val_images, val_labels, step, args)
        accelerator.wait_for_everyone()
        clock = time.perf_counter()  # throughput counts training only, not the checkpoint or validation above

    # ---- final folder: model + image processor (+ model card, upload)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.save_pretrained(args.output_dir)
        MageImageProcessor(size=resolution, crop_size=resolution).save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            # Never the Hub token: this file is uploaded with the model.
            json.dump({k: v for k, v in vars(args).items() if k != "hub_token"}, f, indent=2)
        write_model_card(args.output_dir, args.hub_model_id if args.push_to_hub else None, vars(args),
                         float(loss.detach()) if loss is not None else None)
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                          ignore_patterns=["checkpoint-*", "logs/*", "token_cache/*", "validation/*", "*.jsonl"])
    del model, optimizer  # the wrappers `prepare` made, before the process group (see `end_training`)
    end_training(accelerator)


def drop_metrics_after(path, step):
    if os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def draw_masks(config, seed, micro_batch, indices, num_views):
    """MAGE's masking for micro-batch `micro_batch`: the ratio from `keyed_generator(seed, 4, micro_batch)` (one per
    global batch, as MAGE draws one per batch) and each row's noise from `keyed_generator(seed, 7, micro_batch,
    example, view)`. Keyed by position in the global data stream, not by rank, so N processes draw exactly the
    masks one process would for the same global batch, and a resumed run draws the same masks again."""
    mask_ratio = sample_mask_ratio(config, keyed_generator(seed, 4, micro_batch))
    noise = torch.stack([
        torch.rand(config.num_image_tokens, generator=keyed_generator(seed, 7, micro_batch, int(index), view))
        for view in range(num_views) for index in indices
    ])  # (V * B, L), view-major like the batch
    return mask_ratio, noise


def check_sync(accelerator, model, indices):
    """Every rank must hold bit-identical weights and have trained on different examples this step."""
    checksums = accelerator.gather(torch.tensor([parameter_checksum(model)], device=accelerator.device)).tolist()
    gathered = accelerator.gather(indices).tolist()
    if len(set(checksums)) != 1:
        raise RuntimeError(f"Ranks diverged: parameter checksums {checksums}.")
    if len(set(gathered)) != len(gathered):
        raise RuntimeError(f"Ranks trained on overlapping examples: {gathered}.")
    return {"param_checksum": checksums[0], "indices": gathered}


if __name__ == "__main__":
    main(parse_args())
