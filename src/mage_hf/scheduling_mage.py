# Copyright 2026 The mage-hf authors. MIT licence.
# MAGE (Li et al., CVPR 2023) and its reference code (LTH14/mage) are MIT licensed.
"""MAGE's iterative decoding (MaskGIT-style) as a diffusers scheduler.

One step takes the model's logits over the codebook for every image token and the current token ids (the mask id
where unknown). It draws a token for every position, keeps the known ones, and re-masks the least confident of the
new ones so that, after step `t` of `T`, `floor(N0 * schedule((t + 1) / T))` tokens stay masked (`N0`: the number
unknown before the first step). Confidence is the log-probability of the drawn token plus Gumbel noise scaled by a
choice temperature that anneals linearly to zero. The draws come from a `torch.Generator` (one, or one per image), or
are passed in, which is how the port is checked against the original's recorded draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .modeling_mage import rand_on_device

__all__ = ["MageScheduler", "MageSchedulerOutput", "MASKING_SCHEDULES", "mask_schedule"]

GeneratorArg = torch.Generator | list[torch.Generator] | None

# Fraction of the initially unknown tokens that is still masked after a fraction `r` of the steps. Each goes from 1 at
# r = 0 to 0 at r = 1. MAGE uses the cosine; the others are MaskGIT's alternatives.
MASKING_SCHEDULES = {
    "cosine": lambda r: math.cos(math.pi / 2.0 * r),
    "linear": lambda r: 1.0 - r,
    "square": lambda r: 1.0 - r**2,
    "cubic": lambda r: 1.0 - r**3,
    "sqrt": lambda r: 1.0 - math.sqrt(r),
}


def mask_schedule(name: str, ratio: float) -> float:
    """The masked fraction after a fraction `ratio` of the steps under schedule `name`."""
    if name not in MASKING_SCHEDULES:
        raise ValueError(f"Unknown masking_schedule {name!r}; choose one of {sorted(MASKING_SCHEDULES)}.")
    return MASKING_SCHEDULES[name](ratio)


def _uniform(shape: tuple[int, ...], generator: GeneratorArg, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Uniform noise in (0, 1) of `shape` (batch first). With a list of generators, row `i` comes from generator `i`
    alone, so an image's draws do not depend on the rest of the batch. Drawn on the generator's device (a CPU
    generator gives the same numbers whatever device the model is on), then moved to `device`."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}; pass one per image.")
        u = torch.stack([rand_on_device(shape[1:], g, g.device, dtype).to(device) for g in generator])
    else:
        gen_device = generator.device if generator is not None else device
        u = rand_on_device(shape, generator, gen_device, dtype).to(device)
    # torch.rand is in [0, 1); keep the logs finite.
    return u.clamp_(min=torch.finfo(dtype).tiny, max=1.0 - torch.finfo(dtype).eps)


def gumbel_noise(shape: tuple[int, ...], generator: GeneratorArg, device: torch.device, dtype=torch.float64) -> torch.Tensor:
    """Standard Gumbel noise, `-log(-log(u))`, from `generator` (see `_uniform`)."""
    return -torch.log(-torch.log(_uniform(shape, generator, device, dtype)))


@dataclass
class MageSchedulerOutput(BaseOutput):
    """
    Output of [`MageScheduler.step`].

    Args:
        prev_sample (`torch.LongTensor` of shape `(batch_size, num_tokens)`):
            The token ids entering the next step: the drawn ids, with the least confident new ones set back to the
            mask id. After the last step nothing is re-masked, so this equals `pred_original_sample`.
        pred_original_sample (`torch.LongTensor` of shape `(batch_size, num_tokens)`):
            The drawn ids where the input was masked, the input elsewhere: the model's current guess of the image.
        sampled_ids (`torch.LongTensor` of shape `(batch_size, num_tokens)`):
            The raw categorical draw at every position (before keeping the known tokens).
        remask (`torch.BoolTensor` of shape `(batch_size, num_tokens)`):
            `True` where the step re-masked a token.
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor
    sampled_ids: torch.LongTensor | None = None
    remask: torch.BoolTensor | None = None


class MageScheduler(SchedulerMixin, ConfigMixin):
    """
    MAGE's iterative decoding over masked image tokens (`gen_image` in the original `gen_img_uncond.py`).

    Timesteps are the step indices `0 .. T-1` in the order they run. At step `t`, with `r = (t + 1) / T`:

    1. a token is drawn at every position from `softmax(logits / temperature)`; known tokens are kept;
    2. `mask_len = floor(N0 * schedule(r))`, clamped to `[1, unknown - 1]`, where `N0` is the number of tokens unknown
       before the first step and `unknown` the number unknown now;
    3. confidence = `log p(drawn token) + choice_temperature * (1 - r) * gumbel`, `+inf` for known tokens;
    4. the new tokens whose confidence is at or below the `mask_len`-th smallest are masked again.

    The last step's draws are the result (the original also computes a re-masking at the last step and discards it;
    here `prev_sample` of the last step is the final image).

    Args:
        mask_token_id (`int`):
            The id of the mask token (`MageConfig.mask_token_id`).
        masking_schedule (`str`, *optional*, defaults to `"cosine"`):
            How many tokens stay masked after each step: `"cosine"` (MAGE), `"linear"`, `"square"`, `"cubic"` or
            `"sqrt"`.
        choice_temperature (`float`, *optional*, defaults to 4.5):
            Scale of the Gumbel noise added to the confidence at the first step; it anneals linearly to 0. MAGE's
            script default is 4.5; its README uses 6.0 for ViT-B at 20 steps.
        temperature (`float`, *optional*, defaults to 1.0):
            Temperature of the token draw itself (MAGE: 1.0). Lower is more conservative; 0 would be argmax and is
            not allowed (use a small value).
        mask_len_rule (`str`, *optional*, defaults to `"per_sample"`):
            `"per_sample"`: every image computes `mask_len` from its own `N0` and unknown count. `"first"`: the value
            computed for the first image is used for all of them, exactly as the original does. The two agree whenever
            all images start with the same number of unknown tokens (e.g. plain generation from a fully masked
            canvas); they differ for inpainting with different masks, where only `"per_sample"` makes an image
            independent of the rest of its batch. In both, only unknown tokens are ever re-masked.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        mask_token_id: int,
        masking_schedule: Literal["cosine", "linear", "square", "cubic", "sqrt"] = "cosine",
        choice_temperature: float = 4.5,
        temperature: float = 1.0,
        mask_len_rule: Literal["per_sample", "first"] = "per_sample",
    ):
        if masking_schedule not in MASKING_SCHEDULES:
            raise ValueError(f"Unknown masking_schedule {masking_schedule!r}; choose one of {sorted(MASKING_SCHEDULES)}.")
        if mask_len_rule not in ("per_sample", "first"):
            raise ValueError(f"mask_len_rule must be 'per_sample' or 'first', got {mask_len_rule!r}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.timesteps: torch.LongTensor | None = None
        self.num_inference_steps: int | None = None
        self._num_unknown_at_start: torch.LongTensor | None = None

    @classmethod
    def from_model_config(cls, model_config, **kwargs) -> "MageScheduler":
        """A scheduler matching a `MageConfig` (its mask id); `kwargs` override the other settings."""
        return cls(mask_token_id=model_config.mask_token_id, **kwargs)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Prepare `num_inference_steps` decoding steps; `timesteps` are the step indices in the order they run."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.arange(num_inference_steps, device=device)
        self._num_unknown_at_start = None

    def masked_fraction(self, timestep: int) -> float:
        """The fraction of the initially unknown tokens still masked after step `timestep`."""
        return mask_schedule(self.config.masking_schedule, (int(timestep) + 1) / self.num_inference_steps)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.LongTensor,
        generator: GeneratorArg = None,
        choice_temperature: float | None = None,
        sampled_ids: torch.LongTensor | None = None,
        gumbel: torch.Tensor | None = None,
        num_unknown_at_start: torch.LongTensor | None = None,
        return_dict: bool = True,
    ) -> MageSchedulerOutput | tuple:
        """
        One decoding step.

        Args:
            model_output (`torch.Tensor` of shape `(batch_size, num_tokens, codebook_size)`):
                The model's logits over the codebook (e.g. `MageForMaskedImageModeling(...).logits`).
            timestep (`int`):
                The step index, one of `self.timesteps`.
            sample (`torch.LongTensor` of shape `(batch_size, num_tokens)`):
                The current ids, holding `mask_token_id` where unknown.
            generator (`torch.Generator` or a list of one per image, *optional*):
                Source of the token draw and of the Gumbel noise.
            choice_temperature (`float`, *optional*):
                Overrides `config.choice_temperature` for this step.
            sampled_ids (`torch.LongTensor` of shape `(batch_size, num_tokens)`, *optional*):
                A token draw to use instead of drawing one (e.g. recorded from another implementation).
            gumbel (`torch.Tensor` of shape `(batch_size, num_tokens)`, *optional*):
                Standard Gumbel noise for the confidence, to use instead of drawing it.
            num_unknown_at_start (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                `N0`. By default it is counted at the first step and remembered until `set_timesteps` is called again.
        """
        if self.num_inference_steps is None:
            raise RuntimeError("Call set_timesteps(num_inference_steps) before step().")
        step_index = int(timestep)
        if not 0 <= step_index < self.num_inference_steps:
            raise ValueError(f"timestep must be a step index in [0, {self.num_inference_steps - 1}], got {step_index}.")
        if model_output.ndim != 3 or sample.shape != model_output.shape[:2]:
            raise ValueError(
                f"model_output must be (batch, tokens, codebook) logits and sample (batch, tokens) ids; got "
                f"{tuple(model_output.shape)} and {tuple(sample.shape)}."
            )
        batch_size, num_tokens, codebook_size = model_output.shape
        device = model_output.device
        # The float64 parts (as in the original) run where float64 exists: Apple's MPS has none.
        f64_device = torch.device("cpu") if device.type == "mps" else device
        mask_id = self.config.mask_token_id
        choice_temperature = self.config.choice_temperature if choice_temperature is None else choice_temperature
        if not choice_temperature >= 0:
            raise ValueError(f"choice_temperature must be >= 0 (0: no re-masking noise), got {choice_temperature}.")

        unknown = sample == mask_id  # (B, L)
        num_unknown = unknown.sum(dim=1)  # (B,)
        if num_unknown_at_start is not None:
            self._num_unknown_at_start = num_unknown_at_start.to(device)
        elif self._num_unknown_at_start is None or step_index == 0:
            self._num_unknown_at_start = num_unknown

        # Softmax in float32 whatever the model's dtype, as the original does (and so the draw is not half precision).
        logits = model_output.float()
        if self.config.temperature != 1.0:
            logits = logits / self.config.temperature
        if sampled_ids is None:
            # Gumbel-max trick: argmax(logits + g) is a draw from softmax(logits). One noise row per image, so a
            # generator list makes each image depend on its own generator only.
            draw_noise = gumbel_noise((batch_size, num_tokens, codebook_size), generator, device, torch.float32)
            sampled_ids = torch.argmax(logits + draw_noise, dim=-1)  # (B, L)
        elif sampled_ids.shape != sample.shape:
            raise ValueError(f"sampled_ids must have shape {tuple(sample.shape)}, got {tuple(sampled_ids.shape)}.")
        sampled_ids = sampled_ids.to(device)
        pred_original_sample = torch.where(unknown, sampled_ids, sample)  # (B, L)

        if step_index == self.num_inference_steps - 1:
            # The last step's draw is the result: nothing stays masked.
            prev_sample = pred_original_sample
            remask = torch.zeros_like(unknown)
        else:
            ratio = (step_index + 1) / self.num_inference_steps
            fraction = self.masked_fraction(step_index)
            # floor(N0 * fraction), then at least 1 and at most unknown - 1: every step fixes at least one token and
            # leaves at least one for later. (The original multiplies in float64 and rounds down the same way.)
            mask_len = torch.floor(self._num_unknown_at_start.to(f64_device).double() * fraction).long().to(device)
            mask_len = torch.clamp(torch.minimum(num_unknown - 1, mask_len), min=1)
            if self.config.mask_len_rule == "first":
                mask_len = mask_len[:1].expand(batch_size)

            # Confidence: the original takes log(softmax)[drawn] in float32, and adds float64 Gumbel noise scaled in
            # float64 and then rounded to float32. Doing the same keeps its re-masking decisions bit for bit.
            probs = torch.softmax(logits, dim=-1)
            selected = torch.gather(probs, -1, pred_original_sample.clamp(max=codebook_size - 1).unsqueeze(-1))
            log_selected = torch.log(selected.squeeze(-1))  # (B, L)
            if gumbel is None:
                gumbel = gumbel_noise((batch_size, num_tokens), generator, f64_device, torch.float64)
            elif gumbel.shape != sample.shape:
                raise ValueError(f"gumbel must have shape {tuple(sample.shape)}, got {tuple(gumbel.shape)}.")
            scaled = (choice_temperature * (1.0 - ratio) * gumbel.to(f64_device, torch.float64)).float().to(device)
            confidence = torch.where(unknown, log_selected + scaled, torch.full_like(log_selected, math.inf))

            # Re-mask the new tokens at or below the mask_len-th smallest confidence. Rows with nothing unknown (an
            # inpainting mask that misses an image) re-mask nothing.
            sorted_confidence = torch.sort(confidence, dim=-1).values  # (B, L)
            cut_off = torch.gather(sorted_confidence, 1, (mask_len - 1).clamp(min=0).unsqueeze(1))  # (B, 1)
            remask = (confidence <= cut_off) & unknown
            prev_sample = torch.where(remask, torch.full_like(sample, mask_id), pred_original_sample)

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return MageSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample, sampled_ids=sampled_ids, remask=remask
        )

    def add_noise(
        self,
        original_samples: torch.LongTensor,
        token_mask: torch.BoolTensor | None = None,
        mask_ratio: float | None = None,
        generator: GeneratorArg = None,
    ) -> torch.LongTensor:
        """
        Mask known tokens: set `original_samples` to the mask id where `token_mask` is `True`, or, given `mask_ratio`
        instead, at `ceil(mask_ratio * num_tokens)` positions per image chosen at random from `generator`.

        Returns the masked ids `(batch_size, num_tokens)`.
        """
        if (token_mask is None) == (mask_ratio is None):
            raise ValueError("Pass exactly one of token_mask or mask_ratio to add_noise.")
        if token_mask is None:
            if not 0.0 < mask_ratio <= 1.0:
                raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}.")
            batch_size, num_tokens = original_samples.shape
            num_masked = math.ceil(mask_ratio * num_tokens)
            noise = _uniform((batch_size, num_tokens), generator, original_samples.device, torch.float32)
            ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
            token_mask = ranks < num_masked  # the num_masked lowest-noise positions
        elif token_mask.shape != original_samples.shape:
            raise ValueError(f"token_mask must have shape {tuple(original_samples.shape)}, got {tuple(token_mask.shape)}.")
        return original_samples.masked_fill(token_mask.to(original_samples.device).bool(), self.config.mask_token_id)
