# Copyright 2026 The mage-hf authors. MIT licence.
"""Linear probe or fine-tune a MAGE encoder for image classification, with Accelerate.

`--model_name_or_path` is any `MageModel`-compatible folder: a converted pre-training checkpoint, a `train_mage.py`
output, or a converted fine-tuned classifier.

* `--mode linear_probe` (MAGE's `main_linprobe.py`): the encoder is frozen (and run in eval mode), the pooled features
  go through `BatchNorm1d(affine=False, eps=1e-6)` and a linear head trained with LARS (MAGE's choice; SGD or AdamW
  on request). At save time the BatchNorm is folded into the linear layer, which is exact in eval mode, so the result
  is a plain `MageForImageClassification`.
* `--mode finetune` (MAGE's `main_finetune.py`): the whole encoder trains (the tokenizer stays frozen) with AdamW,
  layer-wise learning-rate decay, label smoothing and optional mixup/cutmix. MAGE's drop path and RandAugment are not
  reproduced.

Both use a linear warm-up then a cosine decay, report top-1 on a held-out split, and save a folder (with `id2label`
and a `MageImageProcessor` config) that works with `transformers.pipeline("image-classification", model=folder)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn

from mage_hf import MageConfig, MageForImageClassification, MageImageProcessor
from mage_hf.classifier_training import (
    LARS,
    LinearProbeHead,
    layer_decay_param_groups,
    mixup_cutmix,
    soft_target_cross_entropy,
)
from mage_hf.training_utils import (
    RandomResizedCropFlip,
    ResumableState,
    ShardedBatchSampler,
    center_crop_resize,
    check_mixed_precision,
    check_ranges,
    cosine_lr_with_warmup,
    end_training,
    keep_freed_memory,
    keyed_generator,
    load_image_dataset,
    parameter_checksum,
    record_base_model,
    resolve_checkpoint,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

# MAGE's recipes (README): linear probe blr 0.1, no weight decay, LARS; fine-tuning blr 2.5e-4, wd 0.05, AdamW.
DEFAULTS = {
    "linear_probe": dict(
        base_learning_rate=0.1, weight_decay=0.0, optimizer="lars", label_smoothing=0.0, crop_scale=(0.2, 1.0)
    ),
    "finetune": dict(
        base_learning_rate=2.5e-4, weight_decay=0.05, optimizer="adamw", label_smoothing=0.1, crop_scale=(0.08, 1.0)
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model_name_or_path", required=True, help="A MAGE folder (pre-training, train_mage output or classifier)."
    )
    p.add_argument("--mode", choices=["linear_probe", "finetune"], default="linear_probe")
    p.add_argument(
        "--pooling",
        choices=["mean", "cls"],
        default="mean",
        help="`mean`: LayerNorm of the mean over image tokens (MAGE's --global_pool); `cls`: the class position.",
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", help="Hub dataset or a folder saved with `Dataset.save_to_disk`.")
    data.add_argument("--train_data_dir", help="An imagefolder (`<root>/<class>/<image>`).")
    data.add_argument("--train_split", default="train")
    data.add_argument(
        "--validation_split",
        default="0.1",
        help="A fraction of the training split held out (seeded, stratified), or the name of a split.",
    )
    data.add_argument("--image_column")
    data.add_argument("--label_column")
    data.add_argument("--max_train_samples", type=int)
    data.add_argument("--cache_dir")
    data.add_argument("--resolution", type=int, help="Defaults to the tokenizer's training resolution.")
    data.add_argument("--random_crop_scale", type=float, nargs=2, help="Defaults: 0.2 1 (probe), 0.08 1 (finetune).")
    data.add_argument("--no_hflip", action="store_true")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=["lars", "sgd", "adamw"], help="Defaults: lars (probe), adamw (finetune).")
    opt.add_argument("--learning_rate", type=float, help="Absolute rate; overrides --base_learning_rate.")
    opt.add_argument("--base_learning_rate", type=float, help="lr = base * total batch / 256. Defaults: 0.1 / 2.5e-4.")
    opt.add_argument("--weight_decay", type=float, help="Defaults: 0 (probe), 0.05 (finetune).")
    opt.add_argument("--momentum", type=float, default=0.9, help="LARS/SGD momentum.")
    opt.add_argument("--adam_beta1", type=float, default=0.9)
    opt.add_argument("--adam_beta2", type=float, default=0.999)
    opt.add_argument("--fused_adam", action=argparse.BooleanOptionalAction, default=True,
                    help="torch's fused AdamW kernel: one pass per parameter (--no-fused_adam: the default loop).")
    opt.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                    help="Keep the memory malloc frees for the next steps instead of faulting it in again every step "
                    "(glibc only; see mage_hf.training_utils.keep_freed_memory).")
    opt.add_argument("--layer_decay", type=float, default=0.65, help="Layer-wise lr decay (finetune).")
    opt.add_argument("--label_smoothing", type=float, help="Defaults: 0 (probe), 0.1 (finetune).")
    opt.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha (finetune; MAGE: 0.8).")
    opt.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (finetune; MAGE: 1.0).")
    opt.add_argument("--mixup_prob", type=float, default=1.0)
    opt.add_argument("--mixup_switch_prob", type=float, default=0.5)
    opt.add_argument("--train_batch_size", type=int, default=32, help="Per device.")
    opt.add_argument("--eval_batch_size", type=int, default=64)
    opt.add_argument("--num_train_epochs", type=int, default=10)
    opt.add_argument("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    opt.add_argument("--warmup_epochs", type=float, default=1.0, help="Linear warm-up, in epochs.")
    opt.add_argument("--max_grad_norm", type=float, default=0.0, help="0: no clipping.")
    opt.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="Finetune: hidden and attention dropout of the encoder (MAGE's fine-tuned ViT blocks use none).",
    )
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    run.add_argument("--report_to", default="tensorboard", help="Accelerate tracker(s), or `none`.")
    run.add_argument("--logging_dir", default="logs")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--checkpointing_steps", type=int, default=1000)
    run.add_argument("--checkpoints_total_limit", type=int)
    run.add_argument("--resume_from_checkpoint", help="A checkpoint folder, or `latest`.")
    args = p.parse_args(argv)
    if (args.dataset_name is None) == (args.train_data_dir is None):
        p.error("give exactly one of --dataset_name and --train_data_dir")
    defaults = DEFAULTS[args.mode]
    for name in ("base_learning_rate", "weight_decay", "optimizer", "label_smoothing"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    args.random_crop_scale = tuple(args.random_crop_scale or defaults["crop_scale"])
    if args.mode == "linear_probe" and (args.mixup > 0 or args.cutmix > 0):
        p.error("--mixup/--cutmix are for --mode finetune (MAGE's linear probe uses neither)")
    check_ranges(p, args, {
        "train_batch_size": 1, "eval_batch_size": 1, "num_train_epochs": 1, "max_train_steps": 1, "logging_steps": 1,
        "checkpointing_steps": 1, "checkpoints_total_limit": 1, "warmup_epochs": 0, "max_grad_norm": 0,
        "label_smoothing": 0, "mixup": 0, "cutmix": 0, "max_train_samples": 1, "dataloader_num_workers": 0,
    }, positive=("learning_rate", "base_learning_rate"))
    return args


class LabelledImages(torch.utils.data.Dataset):
    """(pixels, label) pairs. With `augment`, keys are `(epoch, index)` (from `ShardedBatchSampler`) and the random
    crop/flip comes from a generator keyed by (seed, epoch, index), so a resumed run replays the same views;
    without, keys are indices and images are centre-cropped."""

    def __init__(self, dataset, image_column, label_column, resolution, seed=0, augment=None):
        self.dataset, self.image_column, self.label_column = dataset, image_column, label_column
        self.resolution, self.seed, self.augment = resolution, seed, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if self.augment is None:
            example = self.dataset[key]
            return center_crop_resize(example[self.image_column], self.resolution), example[self.label_column]
        epoch, index = key
        example = self.dataset[index]
        return self.augment(example[self.image_column], keyed_generator(self.seed, epoch, index)), example[
            self.label_column
        ]


class LinearProbe(nn.Module):
    """A frozen MAGE classifier's pooled features -> [`LinearProbeHead`]. The encoder always runs in eval mode (no
    dropout), so the features of an image do not change from step to step."""

    def __init__(self, classifier: MageForImageClassification, head: LinearProbeHead):
        super().__init__()
        self.classifier = classifier.requires_grad_(False)
        self.head = head

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.classifier.mage(pixel_values=pixel_values).pooler_output  # (B, D)
        return self.head(features.float())


def load_data(args):
    """(train dataset, validation dataset, image column, label column, class names)."""
    import datasets

    source = dict(
        dataset_name=args.dataset_name,
        train_data_dir=args.train_data_dir,
        image_column=args.image_column,
        class_column=args.label_column,
        cache_dir=args.cache_dir,
    )
    train, image_column, label_column = load_image_dataset(
        split=args.train_split, max_samples=args.max_train_samples, **source
    )
    if label_column is None:
        raise ValueError(
            "The dataset has no label column (no `label`/`labels` and no ClassLabel column); pass --label_column."
        )
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:  # plain ints or strings: classes in sorted order
        names = [str(v) for v in sorted(set(train[label_column]))]
        mapping = {v: i for i, v in enumerate(sorted(set(train[label_column])))}
        train = train.map(lambda ex: {label_column: mapping[ex[label_column]]})
    try:
        fraction = float(args.validation_split)
    except ValueError:
        fraction = None
    if fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(
                f"--validation_split {args.validation_split}: a fraction must lie in (0, 1), or name a split."
            )
        stratify = label_column if isinstance(train.features[label_column], datasets.ClassLabel) else None
        split = train.train_test_split(test_size=fraction, seed=args.seed, stratify_by_column=stratify)
        train, val = split["train"], split["test"]
    else:
        val, _, _ = load_image_dataset(
            split=args.validation_split, **{**source, "image_column": image_column, "class_column": label_column}
        )
        if not isinstance(feature, datasets.ClassLabel):
            val = val.map(lambda ex: {label_column: mapping[ex[label_column]]})
    return train, val, image_column, label_column, names


def build_model(args, names: list[str]) -> MageForImageClassification:
    config = MageConfig.from_pretrained(args.model_name_or_path)
    had_mean_pooling = config.use_mean_pooling
    config.use_mean_pooling = args.pooling == "mean"
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    if args.mode == "finetune":
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = args.dropout
    if had_mean_pooling and not config.use_mean_pooling:
        logger.warning(
            "%s was trained with mean pooling (no final norm); --pooling cls starts that norm afresh.",
            args.model_name_or_path,
        )
    # A pre-training folder has no head, and a classifier folder's head may have another size: those start afresh
    # (a same-size head is kept and trained on). The linear probe always trains its own BatchNorm + linear head.
    model = MageForImageClassification.from_pretrained(
        args.model_name_or_path, config=config, ignore_mismatched_sizes=True
    )
    return model.float()


@torch.no_grad()
def evaluate(accelerator, model: nn.Module, loader) -> float:
    """Top-1 accuracy (%) over `loader`, gathered from every process."""
    model.eval()
    correct = total = 0
    for pixels, labels in loader:
        logits = model(pixels)
        logits = logits.logits if hasattr(logits, "logits") else logits
        preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
        correct += int((preds == labels).sum())
        total += labels.numel()
    model.train()
    return 100.0 * correct / max(total, 1)


def lars_reach(lr: float, steps: int, momentum: float, trust_coefficient: float) -> float:
    """An upper bound, in units of ||w||, on how far LARS can move a weight matrix in `steps` steps: each update is
    scaled to `trust_coefficient * ||w||`, momentum amplifies it by at most `1 / (1 - momentum)`, and the schedule
    never exceeds `lr`. Below 1 the head cannot leave the neighbourhood of its N(0, 0.01) initialisation."""
    return lr * trust_coefficient * steps / (1.0 - momentum)


def main(args: argparse.Namespace) -> dict:
    if args.keep_freed_memory:
        keep_freed_memory()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
    )
    check_mixed_precision(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        record_base_model(args.output_dir, args.model_name_or_path)

    train, val, image_column, label_column, names = load_data(args)
    model = build_model(args, names)
    # Each rank its own dropout masks from here on (the model is built alike everywhere; DDP broadcasts it anyway).
    set_seed(args.seed, device_specific=True)
    resolution = args.resolution or model.config.vq_config.resolution
    augment = RandomResizedCropFlip(resolution, scale=args.random_crop_scale, hflip=not args.no_hflip)
    train_set = LabelledImages(train, image_column, label_column, resolution, args.seed, augment)
    val_set = LabelledImages(val, image_column, label_column, resolution)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = len(train_set) // (args.train_batch_size * world)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training images cannot fill one batch of {args.train_batch_size} x {world} processes; "
            "lower --train_batch_size."
        )
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=args.eval_batch_size, num_workers=args.dataloader_num_workers
    )

    total_batch = args.train_batch_size * world
    lr = args.learning_rate or args.base_learning_rate * total_batch / 256
    if args.mode == "linear_probe":
        head = LinearProbeHead(model.config.hidden_size, len(names), generator=torch.Generator().manual_seed(args.seed))
        trainable = LinearProbe(model, head)
        groups = [{"params": list(head.parameters()), "lr_scale": 1.0}]
    else:
        trainable = model
        groups = layer_decay_param_groups(model, args.weight_decay, args.layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]  # the scheduler scales each group's initial rate, keeping the ratios
        group.pop("names", None)
    if args.optimizer == "lars":
        optimizer = LARS(groups, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum)
        reach = lars_reach(lr, max_steps, args.momentum, optimizer.defaults["trust_coefficient"])
        if reach < 1.0:
            logger.warning(
                "LARS with lr %.4g over %d steps can change the head's weights by at most about %.3g times their own "
                "norm (lr x trust coefficient x steps / (1 - momentum)), so the head will barely train and is likely "
                "to predict the most frequent class. MAGE's recipe reaches ~450 with its batch of 16384 (lr 6.4). "
                "Give a larger --learning_rate (e.g. %.3g), more epochs, or --optimizer adamw.",
                lr, max_steps, reach, lr * 100.0 / max(reach, 1e-12),
            )
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    else:  # fine-tuning groups carry their own weight decay (none on biases and norms)
        optimizer = torch.optim.AdamW(
            groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.weight_decay,
            fused=args.fused_adam or None,
        )
    warmup = min(max_steps, round(args.warmup_epochs * steps_per_epoch))
    scheduler = cosine_lr_with_warmup(optimizer, warmup, max_steps)
    trainable, optimizer, val_loader = accelerator.prepare(trainable, optimizer, val_loader)
    state = ResumableState({}, rank, world)
    accelerator.register_for_checkpointing(scheduler, state)  # stepped by hand, once per optimiser step
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if checkpoint:
        accelerator.load_state(checkpoint)
        logger.info("Resumed from %s at step %d", checkpoint, state.global_step)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("train_classifier", config={k: str(v) for k, v in vars(args).items()})

    sampler = ShardedBatchSampler(
        len(train_set), args.train_batch_size, world, rank, args.seed, state.global_step, max_steps
    )
    # A generator of its own: starting an iterator draws a base seed, which from the global RNG would shift every
    # later draw (dropout) of a resumed run by one.
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    use_mixup = args.mode == "finetune" and (args.mixup > 0 or args.cutmix > 0)
    logger.info(
        "%s: %d train / %d validation images, %d classes, lr %.3g, %d steps",
        args.mode,
        len(train_set),
        len(val_set),
        len(names),
        lr,
        max_steps,
    )
    trainable.train()
    for pixels, labels in train_loader:
        pixels, labels = pixels.to(accelerator.device), labels.to(accelerator.device)
        with accelerator.autocast():
            if use_mixup:
                # Keyed by (step, rank): no generator state to save, and a resumed run mixes the same way.
                generator = keyed_generator(args.seed, 7, state.global_step, rank)
                pixels, targets = mixup_cutmix(
                    pixels,
                    labels,
                    len(names),
                    generator,
                    args.mixup,
                    args.cutmix,
                    args.mixup_prob,
                    args.mixup_switch_prob,
                    args.label_smoothing,
                )
                out = trainable(pixels)
                loss = soft_target_cross_entropy(getattr(out, "logits", out), targets)
            else:
                out = trainable(pixels)
                loss = F.cross_entropy(
                    getattr(out, "logits", out).float(), labels, label_smoothing=args.label_smoothing
                )
        accelerator.backward(loss)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_lr = scheduler.get_last_lr()[-1]  # the head's rate for this step
        scheduler.step()
        state.global_step += 1
        if state.global_step % args.logging_steps == 0 or state.global_step == 1:
            logs = {"train/loss": loss.item(), "lr": step_lr}
            accelerator.log(logs, step=state.global_step)
            logger.info("step %d: %s", state.global_step, logs)
        if state.global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, state.global_step, args.checkpoints_total_limit)
    global_step = state.global_step

    # The saved classifier: for the probe, the BatchNorm folded into the head (exact in eval mode).
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(trainable)
    if args.mode == "linear_probe":
        # DDP hands rank 0's BatchNorm statistics to every rank before each step and each rank then updates them
        # with its own batch, so after the last step they differ: average them, so that every rank folds, evaluates
        # and (rank 0) saves the same head.
        norm = unwrapped.head.norm
        for stats in (norm.running_mean, norm.running_var):
            stats.copy_(accelerator.reduce(stats.detach().clone(), reduction="mean"))
        classifier = unwrapped.classifier
        classifier.classifier = unwrapped.head.folded()
    else:
        classifier = unwrapped
    classifier.eval()
    if accelerator.num_processes > 1:
        # Every rank evaluates its share of the validation set with its own copy: they must all be the one rank 0
        # saves, or the reported top-1 would not be the saved model's.
        checksums = accelerator.gather(torch.tensor([parameter_checksum(classifier)], device=accelerator.device))
        if len(set(checksums.tolist())) != 1:
            raise RuntimeError(f"The ranks hold different classifiers (parameter checksums {checksums.tolist()}).")
    top1 = evaluate(accelerator, classifier, val_loader)
    accelerator.log({"eval/top1": top1}, step=global_step)
    results = {"mode": args.mode, "top1": top1, "num_validation_images": len(val_set), "step": global_step}
    if accelerator.is_main_process:
        classifier.save_pretrained(args.output_dir)
        MageImageProcessor(size=resolution, crop_size=resolution).save_pretrained(args.output_dir)
        (Path(args.output_dir) / "eval_results.json").write_text(json.dumps(results, indent=2))
        logger.info(
            "Saved the classifier to %s: top-1 %.2f%% on %d held-out images", args.output_dir, top1, len(val_set)
        )
    del trainable, optimizer, val_loader  # the wrappers `prepare` made, before the process group (see `end_training`)
    end_training(accelerator)
    return results


if __name__ == "__main__":
    main(parse_args())
