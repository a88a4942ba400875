# Copyright 2026 The mage-hf authors. MIT licence.
# MAGE (Li et al., CVPR 2023) and its reference code (LTH14/mage) are MIT licensed.
"""diffusers pipelines over a MAGE model: generation, inpainting, outpainting and variations.

Both pipelines hold two components, `model` (a [`MageForMaskedImageModeling`], whose VQGAN tokenizer lives inside it,
so its weights are stored once) and `scheduler` (a [`MageScheduler`]). A pipeline folder is `model_index.json`,
`model/` and `scheduler/`; `from_pretrained` also takes a bare converted or trained model folder, and Hub repo ids.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from .modeling_mage import MageForMaskedImageModeling, random_weights
from .scheduling_mage import GeneratorArg, MageScheduler
from .training_utils import to_rgb

__all__ = [
    "MageGenerationPipeline",
    "MageInpaintPipeline",
    "MagePipelineOutput",
    "OUTPAINT_DIRECTIONS",
    "prepare_image",
    "prepare_mask",
    "token_mask_from_pixels",
    "make_outpaint_inputs",
    "center_square",
    "token_mask_overlay",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
OUTPAINT_DIRECTIONS = ("left", "right", "up", "down", "uncrop")


@dataclass
class MagePipelineOutput(BaseOutput):
    """
    Output of the MAGE pipelines.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            With `output_type="pil"`, a list of `batch_size` images; `"np"`: float32 `(batch_size, height, width, 3)`
            in [0, 1]; `"pt"`: `(batch_size, 3, height, width)` in [0, 1]; `"latent"`: the token ids
            `(batch_size, grid_height, grid_width)`.
        token_mask (`torch.BoolTensor` of shape `(batch_size, grid_height, grid_width)`, *optional*):
            For inpainting, outpainting and variations: `True` for the tokens that were generated.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    token_mask: torch.BoolTensor | None = None


def _resolve_folder(name_or_path: str | os.PathLike, **hub_kwargs) -> Path:
    """A local folder for `name_or_path`: the folder itself, or a snapshot of a Hub repo.

    diffusers' own repo-id loading refuses pipelines whose components come from outside diffusers and transformers (it
    looks for a `.py` file per component in the repo). Taking the snapshot first and loading from the folder avoids
    that check, and is the same code path online and offline (with `HF_HUB_OFFLINE=1`, `snapshot_download` returns
    the cached snapshot or raises a clear error)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{name_or_path} is a file; pass a pipeline or model folder (or a Hub repo id).")
    text = str(name_or_path)
    # A repo id is "name" or "owner/name"; anything else that is not a folder is a mistyped path.
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"No such folder: {name_or_path} (nor is it a Hub repo id, which reads owner/name).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    keys = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
    kwargs = {k: hub_kwargs[k] for k in keys if hub_kwargs.get(k) is not None}
    try:
        return Path(snapshot_download(text, **kwargs))
    except HFValidationError as err:
        raise ValueError(f"{name_or_path} is neither a local folder nor a valid Hub repo id: {err}") from None


def _to_float_images(images: torch.Tensor) -> torch.Tensor:
    """Clamp decoded images to [0, 1] (the VQGAN's output is unclipped) in float32."""
    return images.float().clamp_(0.0, 1.0)


def prepare_image(image, resolution: int) -> torch.Tensor:
    """Images -> float32 `(B, 3, resolution, resolution)` in [0, 1].

    Takes a PIL image, a list of them, a numpy array `(H, W, 3)`/`(B, H, W, 3)` (uint8, or float in [0, 1]) or a
    tensor `(3, H, W)`/`(B, 3, H, W)` in [0, 1]. Images must be square; other sizes are resized (bicubic) to the
    model's resolution. Transparent images are composited onto white."""
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image is an empty list.")
        if not all(isinstance(im, PIL.Image.Image) for im in image):
            raise TypeError("A list `image` must hold PIL images.")
        arrays = [np.asarray(to_rgb(im)) for im in image]  # transparency composited onto white
        sizes = {a.shape for a in arrays}
        if len(sizes) != 1:
            raise ValueError(f"All images in a batch must have the same size, got {sorted(sizes)}.")
        image = np.stack(arrays)
    if isinstance(image, np.ndarray):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"A numpy image must be (H, W, 3) or (B, H, W, 3), got {image.shape}.")
        image = torch.from_numpy(image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32))
        image = image.permute(0, 3, 1, 2)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"A tensor image must be (3, H, W) or (B, 3, H, W) in [0, 1], got {tuple(image.shape)}.")
    image = image.float()
    if float(image.min()) < -1e-3 or float(image.max()) > 1 + 1e-3:
        raise ValueError("Tensor and float images must be in [0, 1] (uint8 numpy arrays are scaled automatically).")
    height, width = image.shape[-2:]
    if height != width:
        raise ValueError(
            f"Images must be square, got {width}x{height}. Crop it to a square first (for a wider picture, inpaint "
            "or outpaint a square window of it)."
        )
    if height != resolution:
        image = F.interpolate(image, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)
    return image.clamp(0.0, 1.0)


def prepare_mask(mask_image, batch_size: int, image_size: int) -> torch.Tensor:
    """Masks -> float32 `(B, 1, S, S)` in {0, 1} at the size of the input image: 1 (white) marks pixels to
    regenerate, 0 (black) pixels to keep; grey levels are thresholded at 0.5.

    Takes a PIL image of any mode (converted to greyscale; for RGBA the alpha channel is ignored), a list of them, a
    numpy array or a tensor `(H, W)`/`(B, H, W)`/`(B, 1, H, W)`, or an array with the colour last, `(H, W, C)`/
    `(B, H, W, C)` with 1 or 3 channels (as `np.asarray(Image.open(...))` gives; colour is turned to grey as PIL
    does). Values are bool, float in [0, 1], or uint8: 0/255, or 0/1 when no value exceeds 1. One mask for a batch
    applies to every image."""
    if isinstance(mask_image, PIL.Image.Image):
        mask_image = [mask_image]
    if isinstance(mask_image, (list, tuple)):
        if not mask_image or not all(isinstance(m, PIL.Image.Image) for m in mask_image):
            raise TypeError("A list `mask_image` must hold PIL images.")
        sizes = sorted({m.size for m in mask_image})
        if len(sizes) != 1:
            raise ValueError(f"All masks in a list must have the same size, got {sizes} (width, height).")
        mask_image = np.stack([np.asarray(m.convert("L")) for m in mask_image])
    if isinstance(mask_image, np.ndarray):
        if mask_image.dtype.kind not in "biuf":
            raise TypeError(f"A numpy mask must hold booleans or numbers, got {mask_image.dtype}.")
        mask_image = torch.from_numpy(np.array(mask_image))  # a copy: arrays of PIL images are read-only
    if not isinstance(mask_image, torch.Tensor):
        raise TypeError(f"mask_image must be a PIL image, numpy array or tensor, got {type(mask_image).__name__}.")
    shape = tuple(mask_image.shape)
    mask = mask_image.float()
    if mask.ndim in (3, 4) and mask.shape[-1] in (1, 3) and tuple(mask.shape[-3:-1]) == (image_size, image_size):
        # Colour last: (H, W, C) or (B, H, W, C) -> grey, with PIL's "L" weights.
        if mask.shape[-1] == 3:
            mask = mask @ torch.tensor([0.299, 0.587, 0.114], device=mask.device)
        else:
            mask = mask[..., 0]
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"mask_image must be (H, W), (B, H, W), (B, 1, H, W), (H, W, C) or (B, H, W, C), got {shape}."
        )
    if mask.shape[0] not in (1, batch_size):
        raise ValueError(f"Got {mask.shape[0]} masks for {batch_size} images; pass one mask, or one per image.")
    if tuple(mask.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"mask_image is {mask.shape[-1]}x{mask.shape[-2]} but the image is {image_size}x{image_size}; the mask "
            "must have the size of the image it applies to."
        )
    if mask_image.dtype == torch.uint8:
        # 0/255 as images store masks, or 0/1 as arrays often do: a uint8 mask whose values never exceed 1 is 0/1.
        mask = mask / 255.0 if float(mask.max()) > 1 else mask
    elif float(mask.min()) < 0 or float(mask.max()) > 1:
        raise ValueError(
            f"Float and integer masks must be in [0, 1] (1 = regenerate), got values in [{float(mask.min()):g}, "
            f"{float(mask.max()):g}]; uint8 masks may be 0/255."
        )
    return (mask >= 0.5).float().expand(batch_size, -1, -1, -1)


def token_mask_from_pixels(mask: torch.Tensor, grid_size: int) -> torch.BoolTensor:
    """`(B, 1, S, S)` pixel mask -> `(B, grid, grid)`: `True` for every token whose cell overlaps a masked pixel."""
    return F.adaptive_max_pool2d(mask, grid_size)[:, 0] > 0  # (B, h, w)


def make_outpaint_inputs(image: torch.Tensor, direction: str, amount: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The square window to inpaint for an outpainting preset, and its pixel mask.

    `image` is `(B, 3, S, S)` in [0, 1]. For `"left"`, `"right"`, `"up"` and `"down"`, `amount` in (0, 1) is the
    fraction of `S` to add on that side: the window is the `S`-wide strip at that edge of the grown canvas, holding
    the nearest `(1 - amount) * S` pixels of the image as context and the new area, masked. For `"uncrop"`, the image
    is shrunk by `1 - amount` into the centre of an `S` canvas and the border is masked. Returns `(window, mask)`,
    each `(B, C, S, S)`.

    The new area starts as the image's edge pixels repeated outwards. Its tokens are masked, but the VQGAN encoder's
    receptive field reaches across the boundary, so the known tokens next to it see these pixels: a flat grey fill
    made them look like the start of a grey object, and the model then drew one (on the emoji demo model a white
    margin was continued as coloured clutter); repeating the edge keeps them what the image shows."""
    if direction not in OUTPAINT_DIRECTIONS:
        raise ValueError(f"direction must be one of {OUTPAINT_DIRECTIONS}, got {direction!r}.")
    size = image.shape[-1]
    extra = int(round(amount * size)) if 0.0 < amount < 1.0 else 0
    if extra < 1 or extra > size - 1:
        raise ValueError(f"amount must be in (0, 1) and leave at least one pixel on each side, got {amount}.")
    mask = torch.zeros_like(image[:, :1])
    keep = size - extra
    # F.pad's (left, right, top, bottom) on the last two dimensions; "replicate" repeats the edge pixels.
    if direction == "right":
        window = F.pad(image[..., extra:], (0, extra, 0, 0), mode="replicate")  # (B, 3, S, S)
        mask[..., keep:] = 1
    elif direction == "left":
        window = F.pad(image[..., :keep], (extra, 0, 0, 0), mode="replicate")
        mask[..., :extra] = 1
    elif direction == "down":
        window = F.pad(image[..., extra:, :], (0, 0, 0, extra), mode="replicate")
        mask[..., keep:, :] = 1
    elif direction == "up":
        window = F.pad(image[..., :keep, :], (0, 0, extra, 0), mode="replicate")
        mask[..., :extra, :] = 1
    else:  # uncrop: shrink into the centre, mask the border
        small = F.interpolate(image, size=(keep, keep), mode="bicubic", align_corners=False, antialias=True)
        top = (size - keep) // 2
        bottom = size - keep - top
        window = F.pad(small.clamp(0, 1), (top, bottom, top, bottom), mode="replicate")  # (B, 3, S, S)
        mask.fill_(1)
        mask[..., top : top + keep, top : top + keep] = 0
    return window, mask


def center_square(image: PIL.Image.Image) -> PIL.Image.Image:
    """The largest centred square of `image` (the model works on squares); square images are returned as they are."""
    side = min(image.size)
    if image.width == image.height:
        return image
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def token_mask_overlay(image: PIL.Image.Image, token_mask: torch.Tensor) -> PIL.Image.Image:
    """`image` (square) with the cells of `token_mask` `(h, w)` (e.g. [`MagePipelineOutput.token_mask`]) tinted
    red: the tokens the model was asked to generate."""
    cells = token_mask.detach().cpu().numpy().astype(np.float32)  # (h, w)
    image = image.convert("RGB")
    if image.width != image.height:
        raise ValueError(f"token_mask_overlay needs a square image, got {image.width}x{image.height}.")
    mask = PIL.Image.fromarray((cells * 255).astype(np.uint8)).resize(image.size, PIL.Image.NEAREST)
    tint = np.asarray(mask, dtype=np.float32)[..., None] / 255.0 * 0.5  # (S, S, 1): half-way to red on the cells
    base = np.asarray(image, dtype=np.float32)
    tinted = base * (1 - tint) + np.array([255.0, 0.0, 0.0]) * tint
    return PIL.Image.fromarray(tinted.clip(0, 255).astype(np.uint8))


class MageGenerationPipeline(DiffusionPipeline):
    r"""
    Image generation with MAGE: every image token starts masked and is filled in by iterative decoding
    ([`MageScheduler`]), then the tokens are decoded by the model's VQGAN.

    Args:
        model ([`MageForMaskedImageModeling`]):
            The MAGE model (with its VQGAN tokenizer inside).
        scheduler ([`MageScheduler`]):
            The decoding schedule; its `mask_token_id` must be the model's.
    """

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = ["token_ids", "logits"]

    def __init__(self, model: MageForMaskedImageModeling, scheduler: MageScheduler):
        super().__init__()
        if scheduler.config.mask_token_id != model.config.mask_token_id:
            raise ValueError(
                f"The scheduler's mask_token_id ({scheduler.config.mask_token_id}) is not the model's "
                f"({model.config.mask_token_id}); build it with MageScheduler.from_model_config(model.config)."
            )
        self.register_modules(model=model, scheduler=scheduler)
        self._interrupt = False

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "MageGenerationPipeline":
        """Load a pipeline folder (`model_index.json`), a bare MAGE model folder (converted or trained; the scheduler
        then gets its defaults), or either from the Hub by repo id. Keyword arguments are those of
        `DiffusionPipeline.from_pretrained` (`torch_dtype`/`dtype`, `revision`, `cache_dir`, `token`,
        `local_files_only`, components to replace such as `scheduler=`...)."""
        folder = _resolve_folder(pretrained_model_name_or_path, **kwargs)
        for key in ("revision", "force_download", "proxies"):
            kwargs.pop(key, None)  # already used to fetch the snapshot
        if (folder / "model_index.json").is_file():
            return super().from_pretrained(folder, **kwargs)
        config_file = folder / "config.json"
        if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "mage":
            dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
            dtype = dtype or torch_dtype
            model_kwargs = {k: kwargs.pop(k) for k in ("device_map", "variant", "use_safetensors") if k in kwargs}
            for key in ("cache_dir", "token", "local_files_only"):
                kwargs.pop(key, None)  # already used to fetch the snapshot
            model, scheduler = kwargs.pop("model", None), kwargs.pop("scheduler", None)
            if kwargs:
                raise TypeError(
                    f"Unexpected keyword argument(s) {sorted(kwargs)} for a bare MAGE model folder; it takes dtype, "
                    "device_map, variant, use_safetensors, model= and scheduler=."
                )
            if model is None:
                model, loading = MageForMaskedImageModeling.from_pretrained(
                    folder, dtype=dtype, output_loading_info=True, **model_kwargs
                )
                missing = random_weights(loading)
                if missing:  # such a model would generate noise
                    architecture = (json.loads(config_file.read_text()).get("architectures") or ["?"])[0]
                    raise ValueError(
                        f"{pretrained_model_name_or_path} holds a {architecture} without {len(missing)} of the weights "
                        f"generation needs (e.g. {', '.join(missing[:3])}), which would be random. Generation takes a "
                        "pre-training folder (MageForMaskedImageModeling: encoder, decoder and MLM head), as "
                        "`mage-hf convert` writes from mage-vitb-1600.pth or train_mage.py writes."
                    )
            scheduler = scheduler or MageScheduler.from_model_config(model.config)
            return cls(model=model, scheduler=scheduler)
        raise ValueError(
            f"{pretrained_model_name_or_path} holds neither a pipeline (model_index.json) nor a MAGE model "
            "(config.json with model_type 'mage'). Convert a checkpoint with `mage-hf convert` or train one first."
        )

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained`, with the model's image processor config (`MageImageProcessor` at the
        model's resolution) also written into `model/`, so that transformers' `AutoImageProcessor` and pipelines
        (`pipeline("image-feature-extraction", model=folder + "/model")`) load that folder as they load a converted
        one. With `push_to_hub`, the upload includes it."""
        from .image_processing_mage import MageImageProcessor

        super().save_pretrained(save_directory, *args, **kwargs)
        model_dir = Path(save_directory) / "model"
        if model_dir.is_dir() and not (model_dir / "preprocessor_config.json").is_file():
            MageImageProcessor(size=self.resolution, crop_size=self.resolution).save_pretrained(model_dir)
        if push_to_hub:  # diffusers uploads the folder as its last step: again, now that the folder is complete
            super().save_pretrained(save_directory, *args, push_to_hub=True, **kwargs)

    # ------------------------------------------------------------------ properties

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def grid_size(self) -> int:
        return self.model.config.vq_config.grid_size

    @property
    def resolution(self) -> int:
        return self.model.config.vq_config.resolution

    # ------------------------------------------------------------------ shared steps

    def check_common_inputs(
        self,
        num_inference_steps,
        output_type,
        generator,
        batch_size,
        guidance_scale,
        callback_on_step_end_tensor_inputs,
        choice_temperature=None,
    ) -> None:
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        listed = isinstance(generator, (list, tuple))
        if not (generator is None or isinstance(generator, torch.Generator) or listed) or (
            listed and not all(isinstance(g, torch.Generator) for g in generator)
        ):
            raise TypeError(
                "generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a list of one per "
                f"image, got {generator!r}."
            )
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} images; pass one, or one per image.")
        if choice_temperature is not None and not choice_temperature >= 0:
            raise ValueError(f"choice_temperature must be >= 0 (0: no re-masking noise), got {choice_temperature}.")
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}.")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}, got {sorted(unknown)}.")

    @property
    def labels(self) -> dict[str, int]:
        """Class name -> class id of a class-conditional model whose config names its classes (`id2label`, as
        `train_mage.py --class_column` records a `ClassLabel`'s names); empty otherwise."""
        config = self.model.config
        num_classes = int(getattr(config, "num_classes", 0) or 0)
        if num_classes == 0 or sorted(config.id2label) != list(range(num_classes)):
            return {}  # unconditional, or transformers' placeholder LABEL_0/LABEL_1
        return {name: int(i) for i, name in config.id2label.items()}

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class names -> class ids (as diffusers' `DiTPipeline.get_label_ids`), for `class_labels=`."""
        names = [label] if isinstance(label, str) else list(label)
        if not self.labels:
            raise ValueError(
                "This model's config names no classes (config.id2label); pass class ids as integers "
                f"(0 to {max(int(getattr(self.model.config, 'num_classes', 0) or 0) - 1, 0)})."
            )
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise ValueError(f"Unknown class name(s) {unknown}; this model's classes are: {', '.join(self.labels)}.")
        return [self.labels[name] for name in names]

    def prepare_class_labels(self, class_labels, batch_size: int, guidance_scale: float) -> torch.LongTensor | None:
        """`class_labels` (an id or name, or one per image) -> `(B,)` on the device, or None for unconditional
        models."""
        num_classes = int(getattr(self.model.config, "num_classes", 0) or 0)
        if class_labels is None:
            if guidance_scale > 1.0:
                raise ValueError("guidance_scale > 1 needs class_labels (classifier-free guidance is class-conditional).")
            return None
        if num_classes == 0:
            raise ValueError("This model is class-unconditional (config.num_classes == 0); do not pass class_labels.")
        if isinstance(class_labels, str):
            class_labels = [class_labels]
        if isinstance(class_labels, (list, tuple)):  # names -> ids; ids as they are
            class_labels = [self.get_label_ids(c)[0] if isinstance(c, str) else c for c in class_labels]
        labels = torch.as_tensor(class_labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be integer class ids (or names), got {class_labels!r}.")
        labels = labels.long().reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"Got {labels.numel()} class labels for {batch_size} images; pass one, or one per image.")
        if bool(((labels < -1) | (labels >= num_classes)).any()):
            raise ValueError(f"class_labels must be in [0, {num_classes - 1}] (or -1 for unconditional), got {labels.tolist()}.")
        return labels.to(self._execution_device)

    def predict_logits(self, token_ids: torch.LongTensor, class_labels, guidance_scale: float) -> torch.Tensor:
        """Logits over the codebook `(B, L, K)` at the masked positions of `token_ids` (zero elsewhere: the scheduler
        reads only those), with classifier-free guidance when asked. See
        [`MageForMaskedImageModeling.masked_logits`]."""
        if class_labels is None:
            return self.model.masked_logits(token_ids)
        if guidance_scale > 1.0:
            # One batched pass: the conditional rows, then the same ids with the unconditional (fake) label.
            ids = torch.cat([token_ids, token_ids])
            labels = torch.cat([class_labels, torch.full_like(class_labels, -1)])
            cond, uncond = self.model.masked_logits(ids, class_labels=labels).float().chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        return self.model.masked_logits(token_ids, class_labels=class_labels)

    def denoise(
        self,
        token_ids: torch.LongTensor,
        num_inference_steps: int,
        choice_temperature: float | None,
        generator: GeneratorArg,
        class_labels: torch.LongTensor | None,
        guidance_scale: float,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> torch.LongTensor:
        """The decoding loop: fill the masked ids of `token_ids` `(B, L)`.

        A callback may stop it early by setting `pipeline._interrupt = True` (as in diffusers); the positions still
        masked then take the last step's draw (its `pred_original_sample`), so the result is the model's current
        guess of the image rather than ids that cannot be decoded."""
        self.scheduler.set_timesteps(num_inference_steps, device=token_ids.device)
        guess = None
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(self.scheduler.timesteps):
                if self.interrupt:
                    continue
                logits = self.predict_logits(token_ids, class_labels, guidance_scale)  # (B, L, K)
                step = self.scheduler.step(
                    logits, t, token_ids, generator=generator, choice_temperature=choice_temperature
                )
                token_ids, guess = step.prev_sample, step.pred_original_sample
                if callback_on_step_end is not None:
                    local_vars = {"token_ids": token_ids, "logits": logits}
                    callback_kwargs = {k: local_vars[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    token_ids = callback_outputs.pop("token_ids", token_ids)
                progress_bar.update()
        if self.interrupt and guess is not None:
            token_ids = torch.where(token_ids == self.model.config.mask_token_id, guess, token_ids)
        return token_ids

    def _onload_model(self) -> None:
        """With model CPU offload (`enable_model_cpu_offload`), move the model to the execution device now.
        accelerate's offload hook does that when the model's `forward` runs, but the pipeline calls its
        `masked_logits` and its tokenizer instead, so it runs the hook itself (as diffusers' `apply_forward_hook`
        does for a VAE's `decode`). `maybe_free_model_hooks` offloads the model again at the end of a call."""
        hook = getattr(self.model, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self.model)

    @contextlib.contextmanager
    def _tokenizer_in_float32(self):
        """Run the VQGAN in float32 whatever the model's dtype: its decoder's activations overflow float16, and its
        nearest-code search needs the precision. The model is put back in its dtype afterwards."""
        vq_model = self.model.mage.vq_model
        dtype = vq_model.dtype
        if dtype != torch.float32:
            vq_model.to(torch.float32)
        try:
            yield vq_model
        finally:
            if dtype != torch.float32:
                vq_model.to(dtype)

    # The VQGAN runs one image at a time: convolution kernels pick different algorithms for different batch sizes
    # (on the CPU the decode of the same ids differs by ~1e-5 between batch 1 and 3), and an image must not depend
    # on the batch it was made in. The FLOPs are the same; the transformer steps, which dominate, stay batched.

    def tokenize(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """Images `(B, 3, S, S)` in [0, 1] -> codebook ids `(B, L)`."""
        pixel_values = pixel_values.to(self._execution_device, torch.float32)
        with self._tokenizer_in_float32() as vq_model:
            ids = [vq_model.encode(pixel_values[i : i + 1]).token_ids for i in range(pixel_values.shape[0])]
        return torch.cat(ids).flatten(1)  # (B, L)

    def decode(self, token_ids: torch.LongTensor) -> torch.Tensor:
        """Codebook ids `(B, L)` -> images `(B, 3, S, S)` in [0, 1], float32."""
        grid = token_ids.view(-1, self.grid_size, self.grid_size)  # (B, h, w)
        with self._tokenizer_in_float32() as vq_model:
            images = [vq_model.decode(grid[i : i + 1]) for i in range(grid.shape[0])]
        return _to_float_images(torch.cat(images))  # (B, 3, S, S)

    def postprocess(self, images: torch.Tensor, output_type: str):
        """`(B, 3, H, W)` float in [0, 1] -> the requested output type."""
        if output_type == "pt":
            return images  # on the device, as diffusers returns tensors
        array = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return array
        return self.numpy_to_pil(array)

    def _callback_inputs(self, callback_on_step_end, tensor_inputs):
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            return callback_on_step_end.tensor_inputs
        return list(tensor_inputs)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def __call__(
        self,
        num_images: int = 1,
        num_inference_steps: int = 20,
        choice_temperature: float | None = None,
        generator: GeneratorArg = None,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("token_ids",),
    ) -> MagePipelineOutput | tuple:
        r"""
        Generate images.

        Args:
            num_images (`int`, *optional*, defaults to 1):
                How many images to generate.
            num_inference_steps (`int`, *optional*, defaults to 20):
                Decoding steps. MAGE's ViT-B numbers use 20 (FID 11.1 with choice temperature 6.0).
            choice_temperature (`float`, *optional*):
                Gumbel noise scale of the re-masking choice (annealed to 0); defaults to the scheduler's (4.5).
            generator (`torch.Generator` or a list of one per image, *optional*):
                With one generator per image, image `i` depends only on generator `i`: the same seed gives the same
                image whatever the batch it is in. (The draws are the same; the logits of different batch sizes can
                differ by float rounding, ~1e-6 at ViT-B width, which could flip a nearly tied draw. In a 20-step
                ViT-B run of 4 images at batch 1 and 4, no token differed.)
            class_labels (`int`, `str`, `list` or `torch.LongTensor`, *optional*):
                For class-conditional models: one label, or one per image (-1 = unconditional). Names work when the
                config names the classes (see `labels` and `get_label_ids`).
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance on the logits, `uncond + s * (cond - uncond)`; 1 disables it.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"` (the token ids).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`MagePipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*):
                Called as `callback_on_step_end(pipeline, step, timestep, callback_kwargs)` after every step with the
                tensors named in `callback_on_step_end_tensor_inputs` (`"token_ids"`, `"logits"`); it may return a
                new `"token_ids"`.

        Returns:
            [`MagePipelineOutput`] or `(images,)`.
        """
        # 1. Validate
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}.")
        tensor_inputs = self._callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_common_inputs(
            num_inference_steps, output_type, generator, num_images, guidance_scale, tensor_inputs, choice_temperature
        )
        self._interrupt = False

        # 2. Prepare: every token masked
        self._onload_model()
        device = self._execution_device
        labels = self.prepare_class_labels(class_labels, num_images, guidance_scale)
        num_tokens = self.model.config.num_image_tokens
        token_ids = torch.full((num_images, num_tokens), self.model.config.mask_token_id, dtype=torch.long, device=device)

        # 3. Decoding loop
        token_ids = self.denoise(
            token_ids, num_inference_steps, choice_temperature, generator, labels, guidance_scale,
            callback_on_step_end, tensor_inputs,
        )

        # 4. Decode and 5. postprocess
        if output_type == "latent":
            images = token_ids.view(num_images, self.grid_size, self.grid_size)
        else:
            images = self.postprocess(self.decode(token_ids), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return MagePipelineOutput(images=images)


class MageInpaintPipeline(MageGenerationPipeline):
    r"""
    Inpainting, outpainting, uncropping and variations with MAGE.

    The image is tokenized; every token whose 16x16 cell (one VQGAN cell) overlaps the mask is masked and generated
    again, the others stay known, and the result is decoded. Same components as [`MageGenerationPipeline`].
    """

    @torch.no_grad()
    def __call__(
        self,
        image,
        mask_image=None,
        strength: float | None = None,
        num_inference_steps: int = 20,
        choice_temperature: float | None = None,
        generator: GeneratorArg = None,
        class_labels: int | str | list[int | str] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        paste_back: bool = False,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("token_ids",),
    ) -> MagePipelineOutput | tuple:
        r"""
        Inpaint `image` where `mask_image` is white, or make variations of it.

        Args:
            image (`PIL.Image.Image`, list, `np.ndarray` or `torch.Tensor`):
                Square images (see [`prepare_image`]); they are resized to the model's resolution, and the output is at
                that resolution.
            mask_image (`PIL.Image.Image`, list, `np.ndarray` or `torch.Tensor`, *optional*):
                The same size as `image`: white (>= 0.5) pixels are regenerated. Every token whose cell overlaps a
                white pixel is generated; an empty mask is an error (use `strength` for variations).
            strength (`float`, *optional*):
                Instead of a mask: re-generate this fraction (in (0, 1]) of the tokens, chosen at random from
                `generator`, to make a variation of the image.
            paste_back (`bool`, *optional*, defaults to `False`):
                Put the original pixels back outside the mask (the decoded known tokens are close to, but not
                exactly, the input: the VQGAN is lossy). Ignored for variations and `output_type="latent"`.
            Other arguments: as [`MageGenerationPipeline.__call__`].

        Returns:
            [`MagePipelineOutput`] (with `token_mask`, `True` where tokens were generated) or `(images, token_mask)`.
        """
        # 1. Validate
        if (mask_image is None) == (strength is None):
            raise ValueError("Pass a mask_image to inpaint, or a strength in (0, 1] for variations (not both).")
        if strength is not None and not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        pixels = prepare_image(image, self.resolution)  # (B, 3, S, S)
        batch_size = pixels.shape[0]
        tensor_inputs = self._callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_common_inputs(
            num_inference_steps, output_type, generator, batch_size, guidance_scale, tensor_inputs, choice_temperature
        )
        pixel_mask = None
        if mask_image is not None:
            input_size = _input_size(image)
            pixel_mask = prepare_mask(mask_image, batch_size, input_size)  # (B, 1, s, s) at the input's size
            token_mask = token_mask_from_pixels(pixel_mask, self.grid_size)  # (B, h, w)
            empty = [i for i in range(batch_size) if not bool(token_mask[i].any())]
            if empty:
                raise ValueError(
                    f"mask_image is empty (no pixel >= 0.5) for image(s) {empty}: nothing to inpaint. Paint the area "
                    "to regenerate white, or use strength= for a variation."
                )
            if input_size != self.resolution:
                pixel_mask = (F.adaptive_max_pool2d(pixel_mask, self.resolution) > 0).float()
        self._interrupt = False

        # 2. Prepare: tokenize, then mask the tokens to generate
        self._onload_model()
        device = self._execution_device
        labels = self.prepare_class_labels(class_labels, batch_size, guidance_scale)
        known_ids = self.tokenize(pixels)  # (B, L)
        if pixel_mask is not None:
            token_ids = self.scheduler.add_noise(known_ids, token_mask=token_mask.flatten(1).to(device))
        else:
            token_ids = self.scheduler.add_noise(known_ids, mask_ratio=float(strength), generator=generator)
        generated = (token_ids == self.model.config.mask_token_id).view(batch_size, self.grid_size, self.grid_size)

        # 3. Decoding loop
        token_ids = self.denoise(
            token_ids, num_inference_steps, choice_temperature, generator, labels, guidance_scale,
            callback_on_step_end, tensor_inputs,
        )

        # 4. Decode and 5. postprocess
        if output_type == "latent":
            images = token_ids.view(batch_size, self.grid_size, self.grid_size)
        else:
            decoded = self.decode(token_ids)
            if paste_back and pixel_mask is not None:
                decoded = torch.where(pixel_mask.to(decoded.device) > 0, decoded, pixels.to(decoded.device))
            images = self.postprocess(decoded, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, generated)
        return MagePipelineOutput(images=images, token_mask=generated)

    @torch.no_grad()
    def outpaint(
        self,
        image,
        direction: str = "right",
        amount: float = 0.25,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs,
    ) -> MagePipelineOutput | tuple:
        r"""
        Outpainting presets. The image (square, resized to the model's resolution `S`) is extended:

        * `"left"`, `"right"`, `"up"`, `"down"`: the canvas grows by `round(amount * S)` pixels on that side, so the
          result is `S x (S + extra)` (or `(S + extra) x S`). The new strip is generated in an `S`-wide window at that
          edge, with the nearest `S - extra` pixels of the image as context; the image's own pixels are kept
          exactly.
        * `"uncrop"`: the image is shrunk by `1 - amount` into the centre of an `S x S` canvas and the border is
          generated; the shrunk image is kept exactly.

        Other keyword arguments go to [`__call__`] (`num_inference_steps`, `generator`, ...). `output_type` is
        `"pil"`, `"np"` or `"pt"`; `token_mask` in the output is the generated cells of the window.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"outpaint returns images: output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if "mask_image" in kwargs or "strength" in kwargs or "paste_back" in kwargs:
            raise ValueError("outpaint makes its own mask; call the pipeline directly for a custom mask_image.")
        pixels = prepare_image(image, self.resolution).to(self._execution_device)  # (B, 3, S, S)
        window, mask = make_outpaint_inputs(pixels, direction, amount)
        result = self(window, mask_image=mask, paste_back=True, output_type="pt", **kwargs)
        filled = result.images.to(pixels.device)  # (B, 3, S, S)
        size = self.resolution
        extra = int(round(amount * size))
        if direction == "right":
            canvas = torch.cat([pixels, filled[..., size - extra :]], dim=-1)  # (B, 3, S, S + extra)
        elif direction == "left":
            canvas = torch.cat([filled[..., :extra], pixels], dim=-1)
        elif direction == "down":
            canvas = torch.cat([pixels, filled[..., size - extra :, :]], dim=-2)  # (B, 3, S + extra, S)
        elif direction == "up":
            canvas = torch.cat([filled[..., :extra, :], pixels], dim=-2)
        else:
            canvas = filled  # the shrunk image was pasted back exactly by paste_back
        images = self.postprocess(canvas, output_type)
        if not return_dict:
            return (images, result.token_mask)
        return MagePipelineOutput(images=images, token_mask=result.token_mask)


def _input_size(image) -> int:
    """The side of the (square) input image before resizing."""
    if isinstance(image, PIL.Image.Image):
        return image.width
    if isinstance(image, (list, tuple)):
        return image[0].width
    if isinstance(image, np.ndarray):
        return image.shape[-2]
    return image.shape[-1]
