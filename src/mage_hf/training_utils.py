# Copyright 2026 The mage-hf authors. MIT licence.
"""Helpers shared by the training scripts in `training/`: image datasets, augmentations drawn from explicit
`torch.Generator`s (so a resumed run replays them exactly), optimiser parameter groups, the learning-rate schedule
and checkpoint bookkeeping.

torchvision is deliberately not used (it does not work with the CPU torch this project pins): the crops follow
torchvision's `RandomResizedCrop`/`Resize`/`CenterCrop` arithmetic, written with PIL and torch.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from . import cpu_kernels

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import datasets

__all__ = [
    "RandomResizedCropFlip",
    "ResumableState",
    "ShardedBatchSampler",
    "center_crop_resize",
    "check_hub_access",
    "check_mixed_precision",
    "check_ranges",
    "checkpoint_dirs",
    "clip_grad_norm_",
    "cosine_lr_with_warmup",
    "end_training",
    "gather_with_grad",
    "image_grid",
    "info_nce_loss",
    "keep_freed_memory",
    "keyed_generator",
    "keyed_seed",
    "load_image_dataset",
    "masked_reconstruction_grid",
    "param_groups_weight_decay",
    "parameter_checksum",
    "pil_to_tensor",
    "precompute_view_tokens",
    "prune_checkpoints",
    "save_checkpoint",
    "resolve_checkpoint",
    "to_rgb",
    "tokenize_views",
    "weights_fingerprint",
    "record_base_model",
    "write_model_card",
]

IMAGE_COLUMN_CANDIDATES = ("image", "img")
CLASS_COLUMN_CANDIDATES = ("label", "labels")


# ---------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------


def _is_saved_dataset(path: str) -> bool:
    """True for a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    if not os.path.isdir(path):
        return False
    files = set(os.listdir(path))
    return {"dataset_info.json", "state.json"} <= files or "dataset_dict.json" in files


def _column_names(dataset) -> list[str]:
    names = dataset.column_names
    if names is None and dataset.features is not None:  # some streamed datasets only know their features
        names = list(dataset.features)
    return list(names or [])


def _pick_column(dataset, wanted: str | None, candidates: tuple[str, ...], feature_type, role: str, flag: str,
                 required: bool) -> str | None:
    names = _column_names(dataset)
    if wanted is not None:
        if names and wanted not in names:
            raise ValueError(
                f"{flag}={wanted!r} is not a column of this dataset; its columns are {names}. Pass the right {flag}."
            )
        return wanted
    for name in candidates:
        if name in names:
            return name
    features = dataset.features or {}
    typed = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    if len(typed) == 1:
        return typed[0]
    if required:
        raise ValueError(
            f"Could not find the {role} column: none of {list(candidates)} exists"
            + (f" and {len(typed)} columns have the {feature_type.__name__} type ({typed})" if typed else "")
            + f". The dataset has columns {names}; pass {flag}."
        )
    return None


def load_image_dataset(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    split: str = "train",
    image_column: str | None = None,
    class_column: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, str, str | None]:
    """Load an image dataset for training.

    Args:
        dataset_name: a dataset on the Hugging Face Hub (`"user/name"`), or a local folder written by
            `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (recognised by its `state.json` +
            `dataset_info.json` or `dataset_dict.json`), or any other local folder `datasets.load_dataset` reads.
        train_data_dir: an image folder (`<root>/<class name>/<image>`, datasets' `imagefolder` layout). Give
            either this or `dataset_name`.
        split: which split to use.
        image_column / class_column: column names; found automatically when not given (`"image"`/`"img"`, then
            the only `Image`-typed column; `"label"`/`"labels"`, then the only `ClassLabel` column). No class
            column is not an error: `class_column` is then returned as `None`.
        streaming: return an `IterableDataset` that reads lazily (a saved folder is converted with
            `to_iterable_dataset`).
        max_samples: keep only the first `max_samples` examples (for debugging or quick runs).
        cache_dir: where `datasets` caches downloaded or prepared data.

    Returns:
        `(dataset, image_column, class_column)`.
    """
    import datasets

    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "Pass exactly one of --dataset_name (Hub name or saved folder) and --train_data_dir (imagefolder)."
        )
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise FileNotFoundError(f"--train_data_dir {train_data_dir!r} is not a folder of images.")
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=train_data_dir, split=split, streaming=streaming, cache_dir=cache_dir
        )
    elif _is_saved_dataset(dataset_name):
        dataset = datasets.load_from_disk(dataset_name)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"Split {split!r} not in the saved dataset {dataset_name!r}; it has {list(dataset)}.")
            dataset = dataset[split]
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        dataset = datasets.load_dataset(dataset_name, split=split, streaming=streaming, cache_dir=cache_dir)

    if max_samples is not None:
        if max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}.")
        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.take(max_samples)
        else:
            dataset = dataset.select(range(min(max_samples, len(dataset))))

    image_column = _pick_column(
        dataset, image_column, IMAGE_COLUMN_CANDIDATES, datasets.Image, "image", "--image_column", required=True
    )
    class_column = _pick_column(
        dataset, class_column, CLASS_COLUMN_CANDIDATES, datasets.ClassLabel, "class", "--class_column", required=False
    )
    return dataset, image_column, class_column


# ---------------------------------------------------------------------------------------------------------------
# Image transforms (no torchvision)
# ---------------------------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image -> RGB. Transparent pixels are composited onto `background` (a plain `convert("RGB")` would
    reveal whatever colour the transparent pixels happen to store, often black)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"Expected a PIL image, got {type(img).__name__}.")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor `(3, H, W)` in [0, 1] (what MAGE's `ToTensor()` gives)."""
    array = np.asarray(to_rgb(img), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def center_crop_resize(img: Image.Image, resolution: int) -> torch.Tensor:
    """MAGE's evaluation transform: resize the shorter side to `resolution` (bicubic), then centre-crop a square.
    Follows torchvision's rounding (`int(size * long / short)` for the long side, `round((H - h) / 2)` offsets).
    Returns `(3, resolution, resolution)` in [0, 1]."""
    img = to_rgb(img)
    width, height = img.size
    if width <= height:
        new_w, new_h = resolution, int(resolution * height / width)
    else:
        new_w, new_h = int(resolution * width / height), resolution
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    return pil_to_tensor(img.crop((left, top, left + resolution, top + resolution)))


class RandomResizedCropFlip:
    """MAGE's training augmentation: `RandomResizedCrop(resolution, scale, ratio, bicubic)` then a horizontal flip
    with probability 1/2, with every random number drawn from the `torch.Generator` passed in (so saving its state
    is enough to replay the augmentations after a resume). The crop box follows torchvision's algorithm: ten tries
    at a box of random area and log-uniform aspect ratio inside the image, then a centre crop at the clamped ratio.

    Call: `transform(img: PIL.Image, generator: torch.Generator) -> (3, resolution, resolution)` in [0, 1].
    """

    def __init__(self, resolution: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}.")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}.")
        self.resolution = int(resolution)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip

    @staticmethod
    def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
        u = torch.rand((), generator=generator, dtype=torch.float64, device=_generator_device(generator))
        return low + (high - low) * float(u)

    @staticmethod
    def _randint(generator: torch.Generator | None, low: int, high: int) -> int:
        """Uniform integer in [low, high]."""
        return int(torch.randint(low, high + 1, (), generator=generator, device=_generator_device(generator)))

    def crop_box(self, width: int, height: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        """(left, top, crop_width, crop_height) of the random crop."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * self._uniform(generator, *self.scale)
            aspect = math.exp(self._uniform(generator, log_low, log_high))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return self._randint(generator, 0, width - w), self._randint(generator, 0, height - h), w, h
        # Fallback: the largest centred box whose aspect ratio is within `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        img = to_rgb(img)
        left, top, w, h = self.crop_box(img.width, img.height, generator)
        # Crop, then resize, as torchvision does for PIL images (the filter never reads pixels outside the box).
        img = img.crop((left, top, left + w, top + h)).resize((self.resolution, self.resolution), Image.BICUBIC)
        if self.hflip and self._uniform(generator, 0.0, 1.0) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(resolution={self.resolution}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"


def _generator_device(generator: torch.Generator | None) -> torch.device | str:
    return generator.device if generator is not None else "cpu"


def keyed_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every integer in `keys` (e.g. `(seed, epoch, example_index, view)`), mixed
    with NumPy's `SeedSequence` so that nearby keys give unrelated streams."""
    state = np.random.SeedSequence([int(k) % (2**63) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def keyed_generator(*keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` seeded with `keyed_seed(*keys)`.

    The training scripts draw each example's augmentation from `keyed_generator(seed, epoch, index, view)`: an
    explicit generator whose whole state is those four numbers, so the same example gets the same view in an
    interrupted-and-resumed run, with any number of processes or data-loader workers, and when its tokens are
    precomputed."""
    return torch.Generator(device=device).manual_seed(keyed_seed(*keys))


# ---------------------------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------------------------


def param_groups_weight_decay(
    model: torch.nn.Module, weight_decay: float, skip_names: tuple[str, ...] = ()
) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices only. Biases, norm weights and every other 1-d
    parameter are not decayed (timm's `add_weight_decay`, as MAE and MAGE call it). Like the original, learned
    position embeddings *are* decayed; parameters whose name contains one of `skip_names` are not (e.g.
    `("position_embeddings",)` for the common ViT recipe). Frozen parameters (the VQGAN tokenizer) are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(skip in name for skip in skip_names):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def clip_grad_norm_(parameters, max_norm: float, accelerator=None) -> torch.Tensor:
    """`accelerator.clip_grad_norm_(parameters, max_norm)` (or torch's, without an accelerator), with two savings on
    the CPU (without sharded or scaled gradients, every gradient on the CPU):

    * torch multiplies every gradient by `min(1, max_norm / (norm + 1e-6))` on every step, a multiplication by
      exactly 1 whenever the norm is within bounds, which on the CPU is a pass over all gradients (~1% of a ViT-B
      step); here the gradients are rescaled only when that factor is below 1;
    * the norm is [`cpu_kernels.total_norm`]'s (float32 gradients: summed in double precision, twice as fast as
      torch's norm kernel here), which is torch's to float32 rounding.

    Returns the total norm before clipping."""
    from accelerate.utils import DistributedType

    parameters = [p for p in parameters if p.grad is not None]
    plain = accelerator is None or (
        accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU) and accelerator.scaler is None
    )
    if not (plain and all(p.grad.device.type == "cpu" for p in parameters)):
        if accelerator is None:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return accelerator.clip_grad_norm_(parameters, max_norm)
    total_norm = cpu_kernels.total_norm([p.grad for p in parameters])
    if total_norm + 1e-6 > max_norm:  # torch's factor max_norm / (norm + 1e-6) is below 1 (a host value: no sync)
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm


def keep_freed_memory() -> bool:
    """Have this process's C allocator keep the memory it frees, for its next allocations, instead of handing it back
    to the operating system. The training scripts call this at start-up (`--no-keep_freed_memory` turns it off).

    By default glibc's malloc serves each block above a threshold (128 KiB, rising up to 32 MiB as such blocks are
    freed) with a fresh `mmap`, unmaps it when it is freed, and trims the top of its heap. On the CPU, a training step
    allocates and frees its activations and gradients (and, from pixels, the tokenizer's activations), so every step
    takes that memory from the kernel again, one zeroed page fault per 4 KiB. A ViT-B pre-training step at batch 4
    faulted 70-80 thousand pages from token ids and ~200 thousand from pixels, 7-18% of the step on the benchmarks'
    VM, where a fault is expensive. With this, the same step faults 0-5 thousand, and its peak resident memory is
    unchanged (4.1 GB).

    What changes: the process keeps the memory of its largest step until it exits, and blocks of every size come from
    malloc's heap (`M_MMAP_MAX` 0, `M_TRIM_THRESHOLD` 2 GiB). GPU memory is not affected (torch caches it anyway).
    Only with glibc (Linux); elsewhere nothing changes. Returns whether the setting was applied."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def cosine_lr_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """MAE/MAGE's schedule, per optimiser step: linear warm-up from 0 over `warmup_steps`, then a half-cycle cosine
    from the peak down to `min_lr_ratio` times the peak at `total_steps`."""
    if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"Need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total_steps > 0.")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice. Written with all_reduce, which
    every backend (gloo too) has, unlike the reduce-scatter/all-to-all of `torch.distributed.nn`."""

    @staticmethod
    def forward(ctx, tensor):
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # each rank's loss depends on every rank's rows
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` `(B, ...)` from every process in rank order, `(world * B, ...)`, keeping gradients to
    each rank's own rows (identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """SimCLR's NT-Xent loss between two views `z1`, `z2` `(B, P)` of the same `B` images (row i of each is a
    positive pair). Each of the 2B embeddings is classified against the 2N - 1 others of the global batch (N
    images over all processes when `gather`, with gradients through the gathered negatives), cosine similarity
    over `temperature`. Returns the mean over this process's 2B anchors."""
    z1, z2 = torch.nn.functional.normalize(z1.float(), dim=1), torch.nn.functional.normalize(z2.float(), dim=1)
    batch = z1.shape[0]
    all1, all2 = (gather_with_grad(z1), gather_with_grad(z2)) if gather else (z1, z2)
    total = all1.shape[0]
    import torch.distributed as dist

    gathered = gather and dist.is_available() and dist.is_initialized()
    offset = dist.get_rank() * batch if gathered else 0  # where this rank's rows sit in the gathered batch
    keys = torch.cat([all1, all2], dim=0)  # (2N, P)
    anchors = torch.cat([z1, z2], dim=0)  # (2B, P)
    logits = anchors @ keys.T / temperature  # (2B, 2N)
    local = torch.arange(batch, device=z1.device) + offset  # global index of each local image
    self_index = torch.cat([local, local + total])  # where each anchor sits among the keys
    positive = torch.cat([local + total, local])
    logits[torch.arange(2 * batch, device=z1.device), self_index] = float("-inf")  # never its own match
    return torch.nn.functional.cross_entropy(logits, positive)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resumable state
# ---------------------------------------------------------------------------------------------------------------


class ResumableState:
    """What a training run needs, besides the model/optimiser/scheduler and the global RNGs that `Accelerator`
    saves, to continue exactly: the optimiser step count and named `torch.Generator`s that live on every process
    (e.g. the mask generator, seeded differently per rank).

    Register it with `accelerator.register_for_checkpointing`. `Accelerator.save_state` calls `state_dict()` on
    every process and writes the result from the main one, so `state_dict()` gathers all ranks' generator states
    (a collective: every rank must call it, which `save_state` does); `load_state_dict` picks this rank's.
    """

    def __init__(self, generators: dict[str, torch.Generator], process_index: int = 0, num_processes: int = 1):
        self.generators = generators
        self.process_index, self.num_processes = process_index, num_processes
        self.global_step = 0

    def _local(self) -> dict:
        return {name: g.get_state() for name, g in self.generators.items()}

    def state_dict(self) -> dict:
        local = self._local()
        if self.num_processes > 1:
            import torch.distributed as dist

            per_rank = [None] * self.num_processes
            dist.all_gather_object(per_rank, local)
        else:
            per_rank = [local]
        return {"global_step": self.global_step, "num_processes": self.num_processes, "generators": per_rank}

    def load_state_dict(self, state: dict) -> None:
        if state["num_processes"] != self.num_processes:
            raise ValueError(
                f"The checkpoint was written by {state['num_processes']} processes and this run has "
                f"{self.num_processes}: every rank's random streams cannot be restored. Resume with the same number "
                "of processes (or start a new run from the saved weights with --pretrained_model)."
            )
        self.global_step = int(state["global_step"])
        for name, value in state["generators"][self.process_index].items():
            self.generators[name].set_state(value)


def check_ranges(parser, args, at_least: dict[str, int], positive: tuple[str, ...] = ()) -> None:
    """`parser.error` (exit 2, with the usage) for every argument of `at_least` that is set below its minimum, and
    every one of `positive` that is set but not above 0: a zero batch size, step interval or learning rate would
    otherwise run to the end doing nothing, or fail deep inside the loop."""
    for name, minimum in at_least.items():
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {value:g}.")
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            parser.error(f"--{name} must be > 0, got {value:g}.")


def check_mixed_precision(accelerator) -> None:
    """Refuse fp16 on the CPU: Accelerate then neither autocasts nor scales the loss, so the run would be float32
    while its logs and model card said fp16."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError(
            "--mixed_precision fp16 needs a GPU: on the CPU Accelerate trains in float32 regardless. Use "
            "--mixed_precision no (or bf16, which on CPUs without bf16 instructions is much slower)."
        )


def checkpoint_dirs(output_dir: str) -> list[str]:
    """`checkpoint-<step>` folders in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    return [os.path.join(output_dir, d) for d in sorted(names, key=lambda d: int(d.split("-")[-1]))]


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """`"latest"` -> the newest `checkpoint-<step>` in `output_dir` (None when there is none yet), a path -> itself
    (it must exist)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    if not os.path.isdir(resume_from_checkpoint):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a folder; pass a checkpoint-<step> folder or "
            "'latest'."
        )
    return resume_from_checkpoint


def end_training(accelerator) -> None:
    """`accelerator.end_training()`, after releasing everything `accelerator.prepare` wrapped; the caller deletes its
    own references to those objects first.

    A DDP wrapper's gradient reducer holds the process group. When the reducer holds the last reference, the gloo group
    is destroyed from the reducer's destructor, which runs with the GIL held, and joining the group's worker threads
    there can deadlock at interpreter exit (a two-rank CPU run once hung like that, in `~ProcessGroupGloo` joining
    its workers). Released first, the wrappers only drop their references, and the group goes with
    `destroy_process_group`."""
    accelerator.free_memory()
    accelerator.end_training()


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None) -> str:
    """`accelerator.save_state` to `<output_dir>/checkpoint-<step>`, written under a temporary name and renamed when
    complete, so that a run killed while saving leaves no half-written checkpoint for `--resume_from_checkpoint
    latest` to pick up; then the oldest are pruned down to `total_limit`. Call it on every process."""
    import shutil

    final = os.path.join(output_dir, f"checkpoint-{step}")
    accelerator.save_state(final + ".tmp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(final + ".tmp", final)
        prune_checkpoints(output_dir, total_limit)
    return final


def prune_checkpoints(output_dir: str, total_limit: int | None) -> list[str]:
    """Delete the oldest `checkpoint-<step>` folders so that at most `total_limit` remain. Returns the removed ones."""
    import shutil

    if not total_limit or total_limit <= 0:
        return []
    found = checkpoint_dirs(output_dir)
    removed = found[: max(0, len(found) - total_limit)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def parameter_checksum(model: torch.nn.Module) -> int:
    """A 63-bit hash of every parameter's exact bytes (for checking that data-parallel ranks hold identical
    weights: any difference in any bit changes it)."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1)


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """`(N, 3, H, W)` images in [0, 1] -> one PIL image with `nrow` images per row."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(3, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------------------------------


def check_hub_access(hub_model_id: str | None, token: str | None = None) -> str:
    """Fail fast (before any training) when `--push_to_hub` cannot work: no repo id, offline mode, the Hub
    unreachable, or no valid token (the same check as `mage-hf push`, `publishing.require_hub_access`). Creates the
    repo if needed; returns its id."""
    from huggingface_hub import HfApi

    from .publishing import HubAccessError, require_hub_access

    if not hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id, e.g. --hub_model_id your-name/mage-emoji.")
    api = HfApi(token=token)
    try:
        require_hub_access(token, api)
    except HubAccessError as error:
        if error.offline:
            raise RuntimeError(
                "--push_to_hub was given but HF_HUB_OFFLINE is set, so nothing can be uploaded. Unset HF_HUB_OFFLINE, "
                "or drop --push_to_hub and publish the output folder later with `mage-hf push`."
            ) from None
        cause = error.__cause__ or error
        raise RuntimeError(
            f"--push_to_hub: cannot reach the Hugging Face Hub or use its token ({type(cause).__name__}: {cause}). "
            "Check the network and log in with `hf auth login` (or pass --hub_token), or drop --push_to_hub."
        ) from error
    try:
        return api.create_repo(hub_model_id, exist_ok=True).repo_id
    except Exception as error:  # 403s, a name taken by someone else, ...: the upload at the end would fail
        raise RuntimeError(
            f"--push_to_hub: cannot create or use repo {hub_model_id!r} ({type(error).__name__}: {error}). Pass a "
            "--hub_model_id you can write to, or drop --push_to_hub."
        ) from error


# ---------------------------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------------------------


class ShardedBatchSampler:
    """Deterministic data order for data-parallel training of a map-style dataset, resumable at any micro-batch.

    Epoch `e` is the permutation `randperm(num_examples)` drawn from `keyed_generator(seed, e)`. It is cut into
    global batches of `batch_size * num_processes` examples (the incomplete last one is dropped, so every rank
    always has a full batch and ranks never wait on each other), and rank `r` takes the `r`-th slice of each. The
    stream runs over epochs without a break; micro-batch `k` of it is a pure function of `k`, so resuming skips
    `start` micro-batches in O(1), and the global batch `k` holds the same examples whatever the number of
    processes (for a given global batch size).

    Yields lists of `(epoch, example_index)` pairs for micro-batches `start, start + 1, ..., total - 1`.
    """

    def __init__(self, num_examples: int, batch_size: int, num_processes: int = 1, process_index: int = 0,
                 seed: int = 0, start: int = 0, total: int | None = None):
        self.global_batch = batch_size * num_processes
        if num_examples < self.global_batch:
            raise ValueError(
                f"The dataset has {num_examples} examples, fewer than one global batch ({batch_size} per process x "
                f"{num_processes} processes). Lower --train_batch_size or add data."
            )
        self.num_examples, self.batch_size, self.process_index = num_examples, batch_size, process_index
        self.seed, self.start, self.total = seed, start, total
        self.batches_per_epoch = num_examples // self.global_batch
        self._epoch, self._perm = None, None

    def batch(self, k: int) -> list[tuple[int, int]]:
        epoch, position = divmod(k, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.num_examples, generator=keyed_generator(self.seed, epoch))
        first = position * self.global_batch + self.process_index * self.batch_size
        return [(epoch, int(i)) for i in self._perm[first : first + self.batch_size]]

    def __iter__(self):
        k = self.start
        while self.total is None or k < self.total:
            yield self.batch(k)
            k += 1

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("An endless ShardedBatchSampler (total=None) has no length.")
        return max(0, self.total - self.start)


# ---------------------------------------------------------------------------------------------------------------
# MAGE specifics: precomputed tokens, validation grids, model card
# ---------------------------------------------------------------------------------------------------------------


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Hex digest of a module's parameters and buffers (names and exact values)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def tokenize_views(vq_model, images: list, transform, generators: list[torch.Generator], device, chunk: int = 64):
    """Augment `images[i]` with `generators[i]` and tokenize them with `vq_model` in float32: `(N, L)` int64."""
    pixels = torch.stack([transform(image, generator) for image, generator in zip(images, generators)])
    ids = []
    for start in range(0, len(pixels), chunk):
        batch = pixels[start : start + chunk].to(device)
        # Channels-last: faster, and a rare near-tie between two codes does not matter for training targets.
        ids.append(vq_model.encode(batch, channels_last=True).token_ids.flatten(1).cpu())  # (n, L)
    return torch.cat(ids)


def precompute_view_tokens(dataset, image_column: str, vq_model, transform, num_views: int, seed: int, device,
                           cache_file: str, batch_size: int = 64, tokens_column: str = "mage_tokens"):
    """Tokenize `num_views` augmented views of every image once with the frozen tokenizer, so that training steps
    skip it. View `v` of example `i` is `transform(image, keyed_generator(seed, 2, i, v))`, so it can be recomputed
    (and checked) independently. Returns the dataset with an int32 column `tokens_column` of shape
    `(num_views, L)` and no image column.

    The result is cached by `datasets` in `cache_file` under a fingerprint of the dataset, the tokenizer's weights
    and every augmentation setting: a rerun or a resumed run reads it back instead of tokenizing again."""
    import hashlib

    import datasets

    num_tokens = vq_model.config.grid_size**2
    key = f"{getattr(dataset, '_fingerprint', '')}-{weights_fingerprint(vq_model)}-{transform!r}-{num_views}-{seed}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    features = datasets.Features({
        **{k: v for k, v in dataset.features.items() if k != image_column},
        tokens_column: datasets.Array2D(shape=(num_views, num_tokens), dtype="int32"),
    })

    def tokenize(batch, indices):
        images = [image for image in batch[image_column] for _ in range(num_views)]
        generators = [keyed_generator(seed, 2, index, view) for index in indices for view in range(num_views)]
        ids = tokenize_views(vq_model, images, transform, generators, device)
        return {tokens_column: ids.view(len(indices), num_views, num_tokens).int().numpy()}

    os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
    vq_model.eval()
    return dataset.map(
        tokenize, batched=True, batch_size=batch_size, with_indices=True, remove_columns=[image_column],
        features=features, cache_file_name=cache_file.replace(".arrow", f"-{fingerprint}.arrow"),
        new_fingerprint=fingerprint, desc="Tokenizing augmented views",
    )


@torch.no_grad()
def masked_reconstruction_grid(model, pixel_values: torch.Tensor, mask_ratio: float, generator: torch.Generator,
                               class_labels: torch.Tensor | None = None) -> tuple[Image.Image, float]:
    """A validation picture for a [`MageForMaskedImageModeling`]: four rows of `pixel_values` `(N, 3, H, W)`:
    the images, their VQGAN reconstruction, the masked input (masked tokens greyed out) and the reconstruction
    with the masked tokens filled by the model's most likely ids. Returns the grid and the masked-token accuracy."""
    config = model.config
    ids = model.mage.tokenize(pixel_values)  # (N, L)
    noise = torch.rand(ids.shape, generator=generator, device=generator.device).to(ids.device)
    num_masked = math.ceil(config.num_image_tokens * mask_ratio)
    mask = noise.argsort(1).argsort(1) < num_masked  # (N, L)
    out = model(input_ids=ids.masked_fill(mask, config.mask_token_id), class_labels=class_labels)
    predicted = torch.where(mask, out.logits.argmax(-1), ids)
    grid = config.vq_config.grid_size
    vq = model.mage.vq_model
    recon = vq.decode(ids.view(-1, grid, grid)).clamp(0, 1)
    filled = vq.decode(predicted.view(-1, grid, grid)).clamp(0, 1)
    cell = pixel_values.shape[-1] // grid
    pixel_mask = mask.view(-1, 1, grid, grid).repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    masked = torch.where(pixel_mask, torch.full_like(recon, 0.5), recon)
    accuracy = float((out.logits.argmax(-1) == ids)[mask].float().mean())
    rows = torch.cat([pixel_values.clamp(0, 1), recon, masked, filled])
    return image_grid(rows, nrow=len(pixel_values)), accuracy


def record_base_model(output_dir: str, base: str | None, push_to_hub: bool = False) -> None:
    """Record where the weights of `base` (the folder or Hub repo a run starts from; None: from scratch) come from, in
    `output_dir/base_provenance.json`, for the licence and attribution of the output's model card. With `push_to_hub`,
    stop now if that cannot be told (the card could not choose a licence at the end of the run)."""
    if base is None:
        return
    from .publishing import write_base_provenance

    record = write_base_provenance(output_dir, base)
    if push_to_hub and record["official_weights"] is None:
        raise SystemExit(
            f"Cannot tell where the weights of {base} come from (no conversion.json, base_provenance.json or "
            "training_args.json could be read), so the model card could not choose their licence. Train without "
            "--push_to_hub and publish with `mage-hf push --license ...`."
        )


def write_model_card(output_dir: str, repo_id: str | None, args: dict, final_loss: float | None) -> str | None:
    """Write the model card (README.md) of a trained MAGE folder, listing how it was trained; return its path.

    It is built by `mage_hf.publishing.build_model_card` (the card `mage-hf push` writes) from `args` and the files
    already in `output_dir`, without loading the weights. Without `repo_id` its snippets load `output_dir`. When the
    licence of the weights cannot be told (a base model of unknown origin), no card is written (None is returned)
    and a warning says how to publish with one."""
    from .publishing import build_model_card, training_folder_info

    info = training_folder_info(output_dir, training_args=args, final_loss=final_loss)
    if info.unknown_base is not None:
        logger.warning(
            f"No model card written: the licence of weights trained from {info.unknown_base} cannot be told. Publish "
            "with `mage-hf push --folder ... --license LICENCE`, which writes the card."
        )
        return None
    path = os.path.join(output_dir, "README.md")
    build_model_card(info, repo_id).save(path)
    return path
