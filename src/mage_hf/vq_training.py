# Copyright 2026 The mage-hf authors. MIT licence.
"""Training pieces for the MaskGIT VQGAN tokenizer ([`MageVQModel`]), used by `training/train_vqgan.py`.

The recipe is VQGAN's (Esser et al. 2021, taming-transformers), written here from its description:

* a straight-through quantiser with a codebook loss and a `beta`-weighted commitment loss;
* an L1 or L2 reconstruction loss, plus an optional LPIPS-style perceptual loss whose network is read from a local
  file (nothing is downloaded);
* an optional PatchGAN discriminator trained with the hinge loss, switched on after a warm-up, whose generator-side
  loss is weighted adaptively by the ratio of the reconstruction and adversarial gradient norms at the decoder's last
  layer.

It also keeps codebook statistics (usage over a window of steps, perplexity) and restarts dead codes from encoder
outputs, with every process seeing the same statistics and writing the same new entries.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .modeling_mage_vq import MageVQModel, MageVQQuantizer

__all__ = [
    "CodebookUsageTracker",
    "LPIPSPerceptualLoss",
    "MageVQForTraining",
    "MageVQTrainingOutput",
    "PatchGANDiscriminator",
    "adaptive_adversarial_weight",
    "code_histogram",
    "hinge_discriminator_loss",
    "perplexity_from_counts",
    "psnr",
    "quantize_straight_through",
    "restart_dead_codes",
]


# ---------------------------------------------------------------------------------------------------------------
# Quantiser with straight-through gradients
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MageVQTrainingOutput(ModelOutput):
    """
    Output of [`MageVQForTraining`].

    Args:
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Decoded images (about [0, 1], unclipped). Gradients reach the encoder through the straight-through
            estimator.
        token_ids (`torch.LongTensor` of shape `(batch_size, h, w)`):
            Nearest codebook entry of every latent.
        latents (`torch.FloatTensor` of shape `(batch_size, embed_dim, h, w)`):
            Encoder output before quantisation.
        codebook_loss (`torch.FloatTensor` of shape `()`):
            `mean((sg[latents] - quantized)^2)`: moves the codebook towards the encoder outputs.
        commitment_loss (`torch.FloatTensor` of shape `()`):
            `mean((latents - sg[quantized])^2)`: keeps the encoder close to its codes (weighted by `beta` in the
            total loss).
    """

    reconstruction: torch.FloatTensor | None = None
    token_ids: torch.LongTensor | None = None
    latents: torch.FloatTensor | None = None
    codebook_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None


def quantize_straight_through(
    quantizer: MageVQQuantizer, latents: torch.Tensor
) -> tuple[torch.LongTensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise `latents` `(B, C, h, w)` with the tokenizer's own nearest-neighbour rule.

    Returns `(token_ids (B, h, w), quantized_st (B, C, h, w), codebook_loss, commitment_loss)`. `quantized_st` has the
    values of the codebook entries and the gradient of `latents` (straight-through estimator), so the decoder's
    gradient reaches the encoder; the codebook itself is trained by `codebook_loss`.
    """
    token_ids = quantizer(latents.detach())  # (B, h, w); argmin has no gradient anyway
    quantized = quantizer.lookup(token_ids).to(latents.dtype)  # (B, C, h, w), differentiable in the codebook
    codebook_loss = F.mse_loss(quantized.float(), latents.detach().float())
    commitment_loss = F.mse_loss(latents.float(), quantized.detach().float())
    quantized_st = latents + (quantized - latents).detach()
    return token_ids, quantized_st, codebook_loss, commitment_loss


class MageVQForTraining(nn.Module):
    """Wraps a [`MageVQModel`] so that one `forward` call (which is what DDP synchronises) runs encoder, quantiser
    and decoder with the straight-through estimator and returns the VQ losses. Save `wrapper.vq_model`."""

    def __init__(self, vq_model: MageVQModel):
        super().__init__()
        self.vq_model = vq_model

    def forward(self, pixel_values: torch.Tensor) -> MageVQTrainingOutput:
        self.vq_model._check_pixels(pixel_values)
        latents = self.vq_model.encoder(pixel_values.to(self.vq_model.dtype))  # (B, C, h, w)
        token_ids, quantized, codebook_loss, commitment_loss = quantize_straight_through(
            self.vq_model.quantize, latents
        )
        reconstruction = self.vq_model.decoder(quantized)  # (B, 3, H, W)
        return MageVQTrainingOutput(
            reconstruction=reconstruction,
            token_ids=token_ids,
            latents=latents,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )


# ---------------------------------------------------------------------------------------------------------------
# Adversarial loss
# ---------------------------------------------------------------------------------------------------------------


class PatchGANDiscriminator(nn.Module):
    """The pix2pix PatchGAN discriminator used by VQGAN: a stack of 4x4 convolutions (stride 2, then one of stride
    1) with BatchNorm and LeakyReLU(0.2), ending in a 1-channel map of real/fake logits, one per overlapping patch.

    Args:
        num_channels: image channels.
        base_channels: width of the first convolution; it doubles with every layer, up to 8x.
        num_layers: number of stride-2 convolutions. Every one halves the image, and the last two 4x4 convolutions
            (stride 1, padding 1) take one pixel each, so the input must be at least `2 ** num_layers * 3` pixels
            wide (24 for 3 layers); use fewer layers for tiny images.
    """

    def __init__(self, num_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
        self.num_layers = num_layers
        layers: list[nn.Module] = [nn.Conv2d(num_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = base_channels
        for n in range(1, num_layers + 1):
            out = base_channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1  # the last hidden convolution keeps the resolution
            # No bias before BatchNorm: its shift would be removed by the normalisation anyway.
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    @torch.no_grad()
    def _init_weights(module: nn.Module) -> None:
        # DCGAN's initialisation, which VQGAN keeps for this discriminator.
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def check_input_size(self, side: int) -> None:
        """Raise a clear error if images of `side` pixels would leave no patch logits."""
        # Each stride-2 convolution (k4, s2, p1) maps n -> n // 2, each stride-1 one (k4, s1, p1) n -> n - 1.
        if side // 2**self.num_layers - 2 < 1:
            raise ValueError(
                f"Images of {side} pixels are too small for a {self.num_layers}-layer PatchGAN discriminator (its "
                f"output would be empty; it needs at least {3 * 2**self.num_layers}); use fewer --disc_num_layers."
            )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images `(B, C, H, W)` -> patch logits `(B, 1, h, w)`."""
        self.check_input_size(min(pixel_values.shape[-2:]))
        return self.layers(pixel_values)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: `(mean(relu(1 - real)) + mean(relu(1 + fake))) / 2`."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def adaptive_adversarial_weight(
    reconstruction_loss: torch.Tensor,
    adversarial_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """VQGAN's adaptive weight of the generator's adversarial loss: `||grad rec|| / (||grad adv|| + eps)`, the
    gradients taken with respect to the decoder's last layer, clamped to `[0, max_weight]` and detached. It makes the
    adversarial term pull on the decoder about as hard as the reconstruction term does, whatever their scales.

    `grad_scale` (`float`, *optional*): the loss scale of float16 training (`accelerator.scaler.get_scale()`). Under
    float16 autocast the gradients flow back through float16 activations, where a mean over a batch of images gives
    each pixel a gradient near float16's smallest values (~1e-7 at 64 images of 256x256): unscaled, they underflow and
    the weight comes out too small (29% in the test, which stands in for that size). The losses are multiplied by the
    scale before differentiating and the gradients divided by it after, as the main backward pass does; if that
    overflows, the scale is lowered by 2**8 until it does not (down to 1).
    """
    scale = float(grad_scale) if grad_scale else 1.0
    while True:
        rec_grad = torch.autograd.grad(reconstruction_loss * scale, last_layer_weight, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(adversarial_loss * scale, last_layer_weight, retain_graph=True)[0]
        rec_norm, adv_norm = rec_grad.float().norm() / scale, adv_grad.float().norm() / scale
        if scale <= 1.0 or bool(torch.isfinite(rec_norm) & torch.isfinite(adv_norm)):
            break
        scale = max(scale / 2**8, 1.0)
    weight = rec_norm / (adv_norm + eps)
    return weight.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------------------------
# Perceptual loss (LPIPS-style), from local weights only
# ---------------------------------------------------------------------------------------------------------------

# LPIPS feeds its VGG with images in [-1, 1] shifted and scaled per channel by these constants (close to the ImageNet
# mean/std that torchvision's VGG weights expect, expressed in [-1, 1] units).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_FEATURE_KEY = re.compile(r"^features\.(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin(\d+)\.model\.1\.weight$")


def _load_tensor_file(path: str | Path, what: str, flag: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{flag} {str(path)!r} does not exist. The {what} is read from a local file only (nothing is "
            "downloaded); give the path of a .safetensors or .pth file, or leave the option out."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag} {str(path)!r} does not hold a state dict of tensors.")
    return state


class LPIPSPerceptualLoss(nn.Module):
    """LPIPS-style perceptual distance (Zhang et al. 2018) over a VGG-like feature network read from a local file.

    The network is rebuilt from the file's keys, which must follow torchvision's VGG naming: `features.{i}.weight`
    and `features.{i}.bias` for 3x3 convolutions, each followed by a ReLU at `i + 1`, and a 2x2 max-pool wherever the
    index of the next convolution jumps by 3 instead of 2. A torchvision `vgg16` state dict (or just its `features.*`
    part) gives LPIPS's network; any smaller network of the same form works too. Features are tapped after the last
    ReLU of every stage (before each pool, and at the end), unit-normalised over channels, and their squared
    differences are averaged over space and summed over stages, weighted per channel by LPIPS's learned linear layers
    (`lin{k}.model.1.weight`, shape `(1, C_k, 1, 1)`, the layout of LPIPS's released `vgg.pth`) when a file of them
    is given, and with unit weights otherwise (LPIPS's "baseline" variant).

    The network is frozen. Inputs are images in [0, 1].
    """

    def __init__(self, features: nn.Sequential, taps: list[int], lin_weights: list[torch.Tensor] | None = None):
        super().__init__()
        self.features = features
        self.taps = list(taps)
        if lin_weights is not None:
            self.lin = nn.ParameterList(
                nn.Parameter(w.reshape(1, -1, 1, 1).float(), requires_grad=False) for w in lin_weights
            )
        else:
            self.lin = None
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen, whatever the enclosing model does

    @classmethod
    def from_files(cls, network_path: str | Path, lin_path: str | Path | None = None) -> LPIPSPerceptualLoss:
        """Build the loss from a VGG-like state dict (`--perceptual_weights`) and optionally LPIPS's linear-layer
        weights (`--perceptual_lin_weights`). See the class docstring for the expected keys."""
        state = _load_tensor_file(network_path, "perceptual network", "--perceptual_weights")
        convs: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            match = _FEATURE_KEY.match(key.removeprefix("module.").removeprefix("net."))
            if match:
                convs.setdefault(int(match.group(1)), {})[match.group(2)] = value
        if not convs:
            raise ValueError(
                f"--perceptual_weights {str(network_path)!r} has no `features.{{i}}.weight` entries; it must be a "
                "VGG-style state dict in torchvision's naming (e.g. a torchvision vgg16 state dict)."
            )
        indices = sorted(convs)
        layers: list[nn.Module] = []
        taps: list[int] = []
        in_channels = 3
        for n, index in enumerate(indices):
            weight = convs[index].get("weight")
            if weight is None or weight.ndim != 4 or weight.shape[1] != in_channels:
                raise ValueError(
                    f"features.{index}.weight in {str(network_path)!r} should be a conv weight with {in_channels} "
                    f"input channels, got shape {None if weight is None else tuple(weight.shape)}."
                )
            conv = nn.Conv2d(
                in_channels,
                weight.shape[0],
                weight.shape[-1],
                padding=weight.shape[-1] // 2,
                bias="bias" in convs[index],
            )
            with torch.no_grad():
                conv.weight.copy_(weight)
                if conv.bias is not None:
                    conv.bias.copy_(convs[index]["bias"])
            layers += [conv, nn.ReLU()]
            in_channels = weight.shape[0]
            gap = indices[n + 1] - index if n + 1 < len(indices) else None
            if gap is None or gap == 3:
                taps.append(len(layers) - 1)  # the ReLU ending this stage
                if gap == 3:
                    layers.append(nn.MaxPool2d(2, 2))
            elif gap != 2:
                raise ValueError(
                    f"Cannot read the VGG layout of {str(network_path)!r}: convolution indices {indices} must step by "
                    "2 (conv, ReLU) or 3 (conv, ReLU, max-pool)."
                )
        lin_weights = None
        if lin_path is not None:
            lin_state = _load_tensor_file(lin_path, "LPIPS linear weights", "--perceptual_lin_weights")
            found = {int(m.group(1)): v for k, v in lin_state.items() if (m := _LIN_KEY.match(k))}
            widths = [layers[t - 1].out_channels for t in taps]
            if sorted(found) != list(range(len(taps))) or [found[k].numel() for k in sorted(found)] != widths:
                raise ValueError(
                    f"--perceptual_lin_weights {str(lin_path)!r} must hold lin0..lin{len(taps) - 1}.model.1.weight "
                    f"with {widths} channels to match the network's {len(taps)} stages; got "
                    f"{ {k: found[k].numel() for k in sorted(found)} }."
                )
            lin_weights = [found[k] for k in sorted(found)]
        return cls(nn.Sequential(*layers), taps, lin_weights)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean perceptual distance between two batches of images in [0, 1] `(B, 3, H, W)` -> `()`."""
        dtype = self.shift.dtype
        x = torch.cat([images, targets]).to(dtype)
        x = ((x * 2.0 - 1.0) - self.shift) / self.scale
        total = x.new_zeros(images.shape[0])
        stage = 0
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                feats = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit norm over channels
                a, b = feats.chunk(2)
                diff = (a - b).pow(2)  # (B, C, h, w)
                if self.lin is not None:
                    diff = diff * self.lin[stage]
                total = total + diff.sum(dim=1).mean(dim=(1, 2))
                stage += 1
        return total.mean()


# ---------------------------------------------------------------------------------------------------------------
# Codebook statistics and dead-code restarts
# ---------------------------------------------------------------------------------------------------------------


def code_histogram(token_ids: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """How often each code occurs in `token_ids` (any shape) -> `(num_embeddings,)` float32 counts."""
    return torch.bincount(token_ids.reshape(-1), minlength=num_embeddings).float()


def perplexity_from_counts(counts: torch.Tensor) -> float:
    """`exp(entropy)` of the code distribution given by `counts`: the effective number of codes in use (K when all
    K codes are equally frequent, 1 when one code takes everything)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float(entropy.exp())


class CodebookUsageTracker:
    """Codebook statistics over the last `window` steps, and how long each code has gone unused.

    Feed it the code histogram of every step, summed over processes, so that every process holds the same numbers
    (and so restarts the same codes). It has `state_dict`/`load_state_dict`, so Accelerate can checkpoint it.

    Args:
        num_embeddings: codebook size.
        window: number of most recent steps that `usage()` and `perplexity()` look at.
        seed: seed of the generator that picks replacement latents in `restart_dead_codes`; give every process the
            same seed.
    """

    def __init__(self, num_embeddings: int, window: int = 100, seed: int = 0):
        if window < 1:
            raise ValueError(f"The usage window must be at least one step, got {window}.")
        self.num_embeddings = num_embeddings
        self.window = window
        self.counts = torch.zeros(window, num_embeddings, dtype=torch.float64)  # ring buffer of per-step histograms
        self.steps_unused = torch.zeros(num_embeddings, dtype=torch.long)
        self.num_updates = 0
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, counts: torch.Tensor) -> None:
        """Record one step's histogram `(num_embeddings,)`."""
        counts = counts.detach().to("cpu", torch.float64)
        if counts.shape != (self.num_embeddings,):
            raise ValueError(f"Expected a histogram of shape ({self.num_embeddings},), got {tuple(counts.shape)}.")
        self.counts[self.num_updates % self.window] = counts
        self.num_updates += 1
        self.steps_unused += 1
        self.steps_unused[counts > 0] = 0

    def window_counts(self) -> torch.Tensor:
        return self.counts.sum(0)  # rows not yet written are zero

    def usage(self) -> float:
        """Fraction of codes used at least once in the window."""
        return float((self.window_counts() > 0).double().mean())

    def perplexity(self) -> float:
        """Perplexity of the code distribution over the window."""
        return perplexity_from_counts(self.window_counts())

    def dead_codes(self, min_unused_steps: int) -> torch.BoolTensor:
        """Codes unused for at least `min_unused_steps` consecutive steps `(num_embeddings,)`."""
        return self.steps_unused >= min_unused_steps

    def mark_restarted(self, codes: torch.BoolTensor) -> None:
        """Give restarted codes a fresh period of grace."""
        self.steps_unused[codes.cpu()] = 0

    def state_dict(self) -> dict:
        return {
            "counts": self.counts.clone(),
            "steps_unused": self.steps_unused.clone(),
            "num_updates": self.num_updates,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["counts"].shape != self.counts.shape:
            raise ValueError(
                f"The saved codebook statistics have shape {tuple(state['counts'].shape)}, this run expects "
                f"{tuple(self.counts.shape)}: keep --usage_window and the codebook size when resuming."
            )
        self.counts = state["counts"].clone()
        self.steps_unused = state["steps_unused"].clone()
        self.num_updates = int(state["num_updates"])
        self.generator.set_state(state["generator"])


@torch.no_grad()
def restart_dead_codes(
    codebook: torch.Tensor,
    dead: torch.BoolTensor,
    latents: torch.Tensor,
    generator: torch.Generator,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Re-initialise the `dead` rows of `codebook` `(K, C)` with encoder outputs drawn from `latents` `(B, C, h, w)`.

    Every process draws `n = dead.sum()` latent vectors from its own batch; `gather` (e.g. `accelerator.gather`)
    collects them from all processes, and `n` of the gathered rows are picked with `generator`. With the same
    `generator` state and `dead` mask on every process, every process writes identical rows, so replicated codebooks
    stay equal. When `optimizer` is given, its per-parameter state (e.g. Adam's moments) is zeroed for those rows,
    so stale momentum does not drag the new entries back. Returns the number of codes restarted.
    """
    dead = dead.to(codebook.device)
    num_dead = int(dead.sum())
    if num_dead == 0:
        return 0
    flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (B*h*w, C)
    picks = torch.randint(0, flat.shape[0], (num_dead,), generator=generator).to(flat.device)
    candidates = flat[picks]  # (n, C)
    if gather is not None:
        candidates = gather(candidates.contiguous())  # (P*n, C), identical on every process
    choice = torch.randperm(candidates.shape[0], generator=generator)[:num_dead].to(candidates.device)
    codebook[dead] = candidates[choice].to(codebook.dtype)
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper keeps the real one inside
        for value in inner.state.get(codebook, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == codebook.shape:
                value[dead] = 0
    return num_dead


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and logging helpers
# ---------------------------------------------------------------------------------------------------------------


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio (dB) per image for images in [0, 1] `(B, C, H, W)` -> `(B,)`. The reconstruction
    is clipped to [0, 1] first, as it would be when saved."""
    mse = (reconstruction.float().clamp(0, 1) - target.float()).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse.clamp(min=1e-10))
