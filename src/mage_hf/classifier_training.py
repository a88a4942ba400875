# Copyright 2026 The mage-hf authors. MIT licence.
"""Training pieces for MAGE's linear probe and fine-tuning, used by `training/train_classifier.py`.

* Linear probe (MAGE's `main_linprobe.py`): a frozen encoder, `BatchNorm1d(affine=False, eps=1e-6)` in front of a
  linear head, trained with LARS. [`fold_batchnorm_into_linear`] turns the normalisation into the head's weights at
  save time, so the result is a plain [`MageForImageClassification`] that gives the same logits in eval mode.
* Fine-tuning (MAGE's `main_finetune.py`): layer-wise learning-rate decay (BEiT/ELECTRA), label smoothing, and
  mixup/cutmix with soft targets.

Every random choice comes from a `torch.Generator` passed in.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LARS",
    "LinearProbeHead",
    "fold_batchnorm_into_linear",
    "layer_decay_param_groups",
    "layer_id_for_mage",
    "mixup_cutmix",
    "smooth_one_hot",
    "soft_target_cross_entropy",
]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as MAGE (and MAE) use it for the
    linear probe. For every parameter with more than one dimension, weight decay is added to the gradient and the
    update is rescaled by `trust_coefficient * ||w|| / ||update||` (when both norms are positive); biases and other
    1-D parameters get neither weight decay nor scaling. Then `mu = momentum * mu + update; w -= lr * mu`.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        weight_decay: L2 penalty added to the gradient of >1-D parameters.
        momentum: heavy-ball momentum.
        trust_coefficient: scale of the trust ratio.
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1 and trust_coefficient > 0; got lr={lr}, "
                f"weight_decay={weight_decay}, momentum={momentum}, trust_coefficient={trust_coefficient}."
            )
        super().__init__(
            params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * param_norm / update_norm
                    ratio = torch.where((param_norm > 0) & (update_norm > 0), trust, torch.ones_like(trust))
                    update = update * ratio
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


class LinearProbeHead(nn.Module):
    """MAGE's linear-probe head: `BatchNorm1d(affine=False, eps=1e-6)` then `Linear`, the weight drawn from a
    normal of std 0.01 (MoCo v3's choice, kept by MAE and MAGE) and a zero bias.

    Args:
        in_features: width of the pooled features.
        num_labels: number of classes.
        generator: source of the initial weights.
    """

    def __init__(self, in_features: int, num_labels: int, generator: torch.Generator | None = None):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False, eps=1e-6)
        self.linear = nn.Linear(in_features, num_labels)
        with torch.no_grad():
            weight = torch.randn(self.linear.weight.shape, generator=generator) * 0.01
            self.linear.weight.copy_(weight.clamp(-0.02, 0.02))  # truncated at two standard deviations
            self.linear.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features `(B, D)` -> logits `(B, num_labels)`."""
        return self.linear(self.norm(features))

    def folded(self) -> nn.Linear:
        """A single linear layer equal to this head in eval mode (see [`fold_batchnorm_into_linear`])."""
        return fold_batchnorm_into_linear(self.norm, self.linear)


@torch.no_grad()
def fold_batchnorm_into_linear(norm: nn.BatchNorm1d, linear: nn.Linear) -> nn.Linear:
    """Return one `nn.Linear` computing `linear(norm(x))` with `norm` in eval mode (running statistics).

    With `s = 1 / sqrt(running_var + eps)` (times the BatchNorm's weight if affine) and
    `t = -running_mean * s` (plus its bias if affine): `W' = W * s` (per input column) and `b' = b + W @ t`.
    The result is computed in float64 and cast back, so it matches the two-layer head to rounding error.
    """
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("The BatchNorm has no running statistics (track_running_stats=False); it cannot be folded.")
    scale = (norm.running_var.double() + norm.eps).rsqrt()  # (D,)
    if norm.affine:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.affine:
        shift = shift + norm.bias.double()
    weight = linear.weight.double()  # (K, D)
    if linear.bias is not None:
        bias = linear.bias.double()
    else:
        bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    folded = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)
    folded.weight.copy_(weight * scale)
    folded.bias.copy_(bias + weight @ shift)
    return folded


def layer_id_for_mage(name: str, num_layers: int) -> int:
    """Depth of a [`MageForImageClassification`] parameter for layer-wise lr decay: 0 for the token embeddings,
    `i + 1` for encoder block `i`, `num_layers + 1` for everything after the blocks (norms, head). Names may or may
    not carry the `mage.` prefix."""
    name = name.removeprefix("mage.")
    if name.startswith("embeddings."):
        return 0
    if name.startswith("encoder.layers."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def layer_decay_param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float, num_layers: int | None = None
) -> list[dict]:
    """Parameter groups with layer-wise learning-rate decay (BEiT, as in MAE/MAGE fine-tuning).

    A parameter at depth `d` (see [`layer_id_for_mage`]) gets `lr_scale = layer_decay ** (num_layers + 1 - d)`: the
    head trains at the full rate, each block below it at `layer_decay` times the one above. Biases and other 1-D
    parameters (norms) get no weight decay. Frozen parameters (the tokenizer) are left out. Multiply each group's
    learning rate by its `lr_scale` (schedulers built on the groups' initial `lr` keep the ratio).
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must lie in (0, 1], got {layer_decay}.")
    if num_layers is None:
        num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id_for_mage(name, num_layers)
        decay = param.ndim > 1
        key = (layer, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (num_layers + 1 - layer),
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Labels `(B,)` -> targets `(B, num_classes)`: `1 - smoothing + smoothing / K` on the true class and
    `smoothing / K` elsewhere (the convention of `F.cross_entropy(label_smoothing=...)`)."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.long().unsqueeze(1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets `(B, K)`, averaged over the batch."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def mixup_cutmix(
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) on a batch, in MAE/MAGE's "batch" mode: one mixing
    coefficient for the whole batch, each image paired with the batch flipped.

    With probability `prob` the batch is mixed: CutMix with probability `switch_prob` when both alphas are positive
    (otherwise whichever is positive), with `lam ~ Beta(alpha, alpha)`. Mixup blends the images, `lam * x +
    (1 - lam) * flip(x)`; CutMix pastes a box covering `1 - lam` of the area from `flip(x)` (clipped at the border,
    `lam` corrected to the area actually pasted). The targets are the same blend of label-smoothed one-hot vectors.

    Returns `(mixed pixel_values (B, C, H, W), soft targets (B, num_classes))`.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0 or not (mixup_alpha > 0 or cutmix_alpha > 0):
        raise ValueError(
            f"Need non-negative alphas with at least one positive, got mixup={mixup_alpha}, cutmix={cutmix_alpha}."
        )
    # NumPy's Beta sampler, seeded from the torch generator, keeps the draw tied to `generator`.
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator)))
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if rng.random() >= prob:
        return pixel_values, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    flipped = pixel_values.flip(0)
    if use_cutmix:
        height, width = pixel_values.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        mixed = pixel_values.clone()
        mixed[..., top:bottom, left:right] = flipped[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
    else:
        mixed = pixel_values * lam + flipped * (1.0 - lam)
    return mixed, targets * lam + targets.flip(0) * (1.0 - lam)
