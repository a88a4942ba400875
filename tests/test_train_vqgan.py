# Copyright 2026 The mage-hf authors. MIT licence.
"""Tests of `training/train_vqgan.py` and its library pieces (`mage_hf.vq_training`), on scikit-image photos."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mage_hf import MageConfig, MageForMaskedImageModeling, MageVQConfig, MageVQModel
from mage_hf.vq_training import (
    CodebookUsageTracker,
    LPIPSPerceptualLoss,
    MageVQForTraining,
    PatchGANDiscriminator,
    adaptive_adversarial_weight,
    code_histogram,
    hinge_discriminator_loss,
    perplexity_from_counts,
    psnr,
    restart_dead_codes,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_vqgan
from training_data import photo_images, write_imagefolder

RES = 32


# Each script's `main` builds an `Accelerator`, whose state is a process-wide singleton (see conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_vq_config(**kwargs) -> MageVQConfig:
    defaults = dict(
        base_channels=16,
        channel_multiplier=[1, 1, 2],
        num_res_blocks=1,
        num_embeddings=16,
        embed_dim=8,
        norm_num_groups=8,
        resolution=RES,
    )
    defaults.update(kwargs)
    return MageVQConfig(**defaults)


TINY_FLAGS = [
    "--resolution",
    str(RES),
    "--base_channels",
    "16",
    "--channel_multiplier",
    "1",
    "1",
    "2",
    "--num_res_blocks",
    "1",
    "--num_embeddings",
    "16",
    "--embed_dim",
    "8",
    "--norm_num_groups",
    "8",
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("photos"), photo_images(48))


def run(photos: Path, output_dir: Path, *extra: str) -> dict:
    argv = [
        "--train_data_dir",
        str(photos),
        "--output_dir",
        str(output_dir),
        *TINY_FLAGS,
        "--train_batch_size",
        "4",
        "--num_validation_images",
        "4",
        "--image_logging_steps",
        "1000",
        "--checkpointing_steps",
        "1000",
        *extra,
    ]
    return train_vqgan.main(train_vqgan.parse_args(argv))


def scalars(output_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one tensorboard scalar written by the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The run's own events file (its hyper-parameters go to a sub-folder).
    acc = EventAccumulator(str(output_dir / "logs" / "train_vqgan"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ------------------------------------------------------------------------------------------------ library pieces


def test_histogram_usage_and_perplexity_on_known_input():
    ids = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])  # four codes, equally often, out of 16
    counts = code_histogram(ids, 16)
    assert counts.tolist() == [2, 2, 2, 2] + [0] * 12
    assert perplexity_from_counts(counts) == pytest.approx(4.0)
    assert perplexity_from_counts(code_histogram(torch.zeros(5, dtype=torch.long), 16)) == pytest.approx(1.0)
    skewed = torch.tensor([1.0, 3.0])
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert perplexity_from_counts(skewed) == pytest.approx(math.exp(entropy))

    tracker = CodebookUsageTracker(16, window=2)
    tracker.update(code_histogram(torch.tensor([5, 6, 7]), 16))
    tracker.update(counts)
    assert tracker.usage() == pytest.approx(7 / 16)  # codes 0-3 and 5-7 within the window
    tracker.update(counts)
    assert tracker.usage() == pytest.approx(4 / 16)  # the step that used 5-7 left the window
    assert tracker.perplexity() == pytest.approx(4.0)
    # Codes 5-7 were last used two steps ago, the others never (three steps).
    dead = tracker.dead_codes(2)
    assert dead[:4].sum() == 0 and dead[4:].all()
    assert tracker.dead_codes(3)[4:].sum() == 16 - 4 - 3  # only the never-used codes reach three steps


def test_tracker_state_round_trip():
    tracker = CodebookUsageTracker(8, window=3, seed=1)
    for ids in ([0, 1], [1, 2], [2, 3, 3]):
        tracker.update(code_histogram(torch.tensor(ids), 8))
    torch.randint(0, 10, (3,), generator=tracker.generator)  # advance the generator
    copy = CodebookUsageTracker(8, window=3, seed=99)
    copy.load_state_dict(tracker.state_dict())
    assert copy.usage() == tracker.usage() and copy.perplexity() == tracker.perplexity()
    assert torch.equal(copy.steps_unused, tracker.steps_unused)
    assert torch.equal(torch.rand(4, generator=copy.generator), torch.rand(4, generator=tracker.generator))
    with pytest.raises(ValueError, match="usage_window"):
        CodebookUsageTracker(8, window=5).load_state_dict(tracker.state_dict())


def _far_codebook_model(seed: int = 0) -> MageVQModel:
    """A tokenizer whose codes 8..15 lie far from any encoder output, so they are never chosen: dead codes."""
    torch.manual_seed(seed)
    model = MageVQModel(tiny_vq_config())
    with torch.no_grad():
        model.quantize.embedding.weight[8:] = 1e3
    return model


def test_dead_code_restart_revives_codes():
    model = _far_codebook_model()
    pixels = torch.stack([torch.rand(3, RES, RES, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    tracker = CodebookUsageTracker(16, window=4, seed=0)
    with torch.no_grad():
        latents = model.encoder(pixels)
    for _ in range(3):
        tracker.update(code_histogram(model.quantize(latents), 16))
    before = code_histogram(model.quantize(latents), 16)
    assert before[8:].sum() == 0, "the construction should leave codes 8..15 unused"
    dead = tracker.dead_codes(3)
    assert dead[8:].all()

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.quantize.embedding.weight.sum().backward()
    optimizer.step()  # creates Adam moments for the codebook
    restarted = restart_dead_codes(
        model.quantize.embedding.weight, dead, latents, tracker.generator, optimizer=optimizer
    )
    assert restarted == int(dead.sum())
    codebook = model.quantize.embedding.weight.detach()
    flat = latents.permute(0, 2, 3, 1).reshape(-1, 8)
    for code in dead.nonzero().flatten():  # every restarted entry is one of the batch's encoder outputs
        assert (flat - codebook[code]).abs().amax(dim=1).min() == 0
    state = optimizer.state[model.quantize.embedding.weight]
    assert state["exp_avg"][dead].abs().sum() == 0 and state["exp_avg"][~dead].abs().sum() > 0
    after = code_histogram(model.quantize(latents), 16)
    assert after[8:].sum() > 0 and (after > 0).sum() > (before > 0).sum()


def test_dead_code_restart_is_identical_across_processes():
    """Two simulated processes with different batches, the same dead mask and generator seed: after gathering
    their candidates, both write the same rows."""
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[3, 9, 12]] = True
    latents = [torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(p)) for p in range(2)]
    codebooks = [torch.zeros(16, 8) for _ in range(2)]
    # Each process's local candidates, drawn as restart_dead_codes draws them (same seed on both processes).
    local = []
    for p in range(2):
        captured = []
        restart_dead_codes(
            torch.zeros(16, 8),
            dead,
            latents[p],
            torch.Generator().manual_seed(7),
            gather=lambda x, captured=captured: captured.append(x) or x,
        )
        local.append(captured[0])
    gathered = torch.cat(local)
    for p in range(2):
        restart_dead_codes(codebooks[p], dead, latents[p], torch.Generator().manual_seed(7), gather=lambda x: gathered)
    assert not torch.equal(local[0], local[1])
    assert torch.equal(codebooks[0], codebooks[1])
    assert codebooks[0][dead].abs().sum() > 0 and codebooks[0][~dead].abs().sum() == 0


def test_straight_through_gradients():
    torch.manual_seed(0)
    model = MageVQModel(tiny_vq_config())
    wrapper = MageVQForTraining(model)
    pixels = torch.rand(2, 3, RES, RES)
    out = wrapper(pixels)
    assert torch.equal(out.token_ids, model.encode(pixels).token_ids)
    # quantized_st = latents + (quantized - latents).detach() equals the codebook entries up to float32 rounding.
    torch.testing.assert_close(out.reconstruction, model(pixels))
    # Reconstruction gradients reach the encoder (straight through) but not the codebook.
    out.reconstruction.square().mean().backward(retain_graph=True)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None
    model.zero_grad(set_to_none=True)
    out.codebook_loss.backward(retain_graph=True)  # trains the codebook only
    assert model.quantize.embedding.weight.grad.abs().sum() > 0 and model.encoder.conv_in.weight.grad is None
    model.zero_grad(set_to_none=True)
    out.commitment_loss.backward()  # trains the encoder only
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0 and model.quantize.embedding.weight.grad is None
    assert out.codebook_loss.item() == pytest.approx(out.commitment_loss.item())
    quantized = model.quantize.lookup(out.token_ids)
    assert out.codebook_loss.item() == pytest.approx(F.mse_loss(quantized, out.latents).item(), rel=1e-5)


def test_discriminator_hinge_and_adaptive_weight():
    disc = PatchGANDiscriminator(3, base_channels=8, num_layers=2)
    assert disc(torch.rand(2, 3, RES, RES)).shape == (2, 1, RES // 4 - 2, RES // 4 - 2)
    with pytest.raises(ValueError, match="too small"):
        disc(torch.rand(1, 3, 8, 8))
    # Hinge: confident and right costs nothing; each side is relu(1 -/+ logit), averaged.
    assert hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -3.0)).item() == 0.0
    assert hinge_discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    assert hinge_discriminator_loss(torch.tensor([0.5]), torch.tensor([0.5])).item() == pytest.approx(0.5 * (0.5 + 1.5))

    # Adaptive weight: ||grad rec|| / ||grad adv|| at the last layer; scaling the adversarial loss by c divides it by c.
    layer = nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    target = torch.rand(2, 3, 8, 8)
    out = layer(h)
    rec = (out - target).abs().mean()
    adv = -disc(torch.cat([out, out], dim=2).repeat(1, 1, 2, 2)).mean()
    w1 = adaptive_adversarial_weight(rec, adv, layer.weight, eps=0.0)
    w3 = adaptive_adversarial_weight(rec, 3.0 * adv, layer.weight, eps=0.0)
    assert w1.item() == pytest.approx(3.0 * w3.item(), rel=1e-5)
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, layer.weight, retain_graph=True)[0]
    assert w1.item() == pytest.approx((g_rec.norm() / g_adv.norm()).item(), rel=1e-5)
    assert not w1.requires_grad
    assert adaptive_adversarial_weight(rec, 1e-9 * adv, layer.weight, max_weight=50.0).item() == 50.0


def test_adaptive_weight_under_float16_takes_the_loss_scale():
    """Under float16 autocast the gradients flow back through float16 activations; a mean over a large batch gives
    each pixel a gradient below float16's normal range, and unscaled the reconstruction norm underflowed. With the
    loss scale (what `train_vqgan.py` passes from the GradScaler) the weight is the one the same float16 forward
    pass gives where nothing underflows."""
    torch.manual_seed(0)
    model = MageVQModel(tiny_vq_config(resolution=64))
    wrapper = MageVQForTraining(model)
    disc = PatchGANDiscriminator(3, base_channels=16, num_layers=2)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    last = model.decoder.conv_out.weight

    def weight(batch_factor: float, grad_scale=None, autocast: bool = True) -> float:
        # `batch_factor` 1/512 stands for the mean over 512 times as many pixels (a batch of 64 at 256x256), which
        # leaves per-pixel gradients ~1e-7. The weight is a ratio of norms, so the factor cancels out of it.
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            recon = wrapper(pixels).reconstruction
            rec = (recon.float() - pixels).abs().mean() * batch_factor
            adv = -disc(recon).float().mean() * batch_factor
            return adaptive_adversarial_weight(rec, adv, last, eps=0.0, grad_scale=grad_scale).item()

    # The same float16 forward pass, differentiated where nothing underflows (per-pixel gradients ~2.6 after scaling).
    reference = weight(batch_factor=1.0, grad_scale=2.0**16)
    assert abs(weight(batch_factor=1 / 512) / reference - 1) > 0.1  # the underflow this guards against, unscaled
    assert weight(batch_factor=1 / 512, grad_scale=2.0**16) == pytest.approx(reference, rel=1e-3)
    # A scale that overflows float16 is lowered until it does not.
    assert weight(batch_factor=1.0, grad_scale=2.0**40) == pytest.approx(reference, rel=1e-3)
    # Without autocast the scale changes nothing but rounding.
    fp32 = weight(batch_factor=1.0, autocast=False)
    assert weight(batch_factor=1.0, grad_scale=2.0**16, autocast=False) == pytest.approx(fp32, rel=1e-5)


def _random_vgg_like(path: Path, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A two-stage VGG-style net in torchvision's naming: conv 0, relu 1, conv 2, relu 3, pool 4, conv 5, relu 6."""
    shapes = {0: (8, 3), 2: (8, 8), 5: (16, 8)}
    state = {}
    for index, (out_c, in_c) in shapes.items():
        state[f"features.{index}.weight"] = (
            torch.randn(out_c, in_c, 3, 3, generator=generator) * (2 / (9 * in_c)) ** 0.5
        )
        state[f"features.{index}.bias"] = torch.randn(out_c, generator=generator) * 0.1
    save_file(state, str(path))
    return state


def test_perceptual_loss_from_local_file(tmp_path):
    """The plumbing of the LPIPS-style loss, with a randomly initialised VGG-like network saved to a file (no
    pretrained perceptual network exists on this machine, so this checks the computation, not its quality)."""
    g = torch.Generator().manual_seed(0)
    state = _random_vgg_like(tmp_path / "net.safetensors", g)
    loss_fn = LPIPSPerceptualLoss.from_files(tmp_path / "net.safetensors")
    assert [type(m).__name__ for m in loss_fn.features] == [
        "Conv2d",
        "ReLU",
        "Conv2d",
        "ReLU",
        "MaxPool2d",
        "Conv2d",
        "ReLU",
    ]
    assert loss_fn.taps == [3, 6]
    x, y = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    assert loss_fn(x, x).item() == 0.0

    # An independent computation of the same distance.
    def stage_features(img):
        h = ((img * 2 - 1) - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor(
            [0.458, 0.448, 0.450]
        ).view(1, 3, 1, 1)
        h = F.relu(F.conv2d(h, state["features.0.weight"], state["features.0.bias"], padding=1))
        first = F.relu(F.conv2d(h, state["features.2.weight"], state["features.2.bias"], padding=1))
        second = F.relu(
            F.conv2d(F.max_pool2d(first, 2), state["features.5.weight"], state["features.5.bias"], padding=1)
        )
        return [first, second]

    def unit(f):
        return f / (f.norm(dim=1, keepdim=True) + 1e-10)

    lin = [torch.rand(8, generator=g), torch.rand(16, generator=g)]
    expected_plain = sum(
        ((unit(a) - unit(b)) ** 2).sum(1).mean((1, 2)) for a, b in zip(stage_features(x), stage_features(y))
    ).mean()
    expected_lin = sum(
        ((unit(a) - unit(b)) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        for a, b, w in zip(stage_features(x), stage_features(y), lin)
    ).mean()
    assert loss_fn(x, y).item() == pytest.approx(expected_plain.item(), rel=1e-5)
    torch.save({f"lin{k}.model.1.weight": w.view(1, -1, 1, 1) for k, w in enumerate(lin)}, tmp_path / "lin.pth")
    weighted = LPIPSPerceptualLoss.from_files(tmp_path / "net.safetensors", tmp_path / "lin.pth")
    assert weighted(x, y).item() == pytest.approx(expected_lin.item(), rel=1e-5)

    x.requires_grad_(True)
    loss_fn(x, y).backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in loss_fn.parameters())

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LPIPSPerceptualLoss.from_files(tmp_path / "missing.pth")
    torch.save({"lin0.model.1.weight": torch.ones(1, 8, 1, 1)}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="lin0..lin1"):
        LPIPSPerceptualLoss.from_files(tmp_path / "net.safetensors", tmp_path / "short.pth")
    save_file({"conv.weight": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="VGG-style"):
        LPIPSPerceptualLoss.from_files(tmp_path / "other.safetensors")


def test_psnr_values():
    target = torch.full((2, 3, 4, 4), 0.5)
    assert psnr(target + 0.1, target).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # mse 0.01
    assert psnr(target + 1.0, target).tolist() == pytest.approx(
        [10 * math.log10(1 / 0.25)] * 2, abs=1e-4
    )  # clipped to 1


# ------------------------------------------------------------------------------------------------ the script


def test_train_vqgan_end_to_end_checkpoints_resume(photos, tmp_path):
    """Adversarial + perceptual run with checkpoint pruning; a run resumed from `latest` (the step-6 checkpoint)
    ends with the same weights as the run straight through."""
    _random_vgg_like(tmp_path / "vgg.safetensors", torch.Generator().manual_seed(0))
    common = [
        "--disc_weight",
        "0.5",
        "--disc_start_step",
        "3",
        "--disc_num_layers",
        "2",
        "--disc_base_channels",
        "8",
        "--perceptual_weights",
        str(tmp_path / "vgg.safetensors"),
        "--dead_code_steps",
        "3",
        "--logging_steps",
        "1",
    ]
    straight = tmp_path / "straight"
    results = run(
        photos,
        straight,
        *common,
        "--max_train_steps",
        "8",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "2",
        "--image_logging_steps",
        "4",
    )
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in (straight / "reconstructions").iterdir()) == ["step-0000004.png", "step-0000008.png"]
    saved = json.loads((straight / "eval_results.json").read_text())
    assert saved == results and results["step"] == 8 and results["num_validation_images"] == 4
    assert 0 < results["val_psnr"] < 60 and 0 < results["codebook_usage"] <= 1
    steps = [s for s, _ in scalars(straight, "loss/discriminator")]
    assert steps == [4, 5, 6, 7, 8]  # the adversarial part starts at step index 3, i.e. the 4th step
    assert [s for s, _ in scalars(straight, "loss/perceptual")] == list(range(1, 9))
    assert len(scalars(straight, "val/psnr")) == 3  # steps 4 and 8, and the final report

    # An interruption after step 6: only that checkpoint exists in the new run's folder.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight / "checkpoint-6", interrupted / "checkpoint-6")
    run(photos, interrupted, *common, "--max_train_steps", "8", "--resume_from_checkpoint", "latest")
    a = MageVQModel.from_pretrained(straight).state_dict()
    b = MageVQModel.from_pretrained(interrupted).state_dict()
    assert a.keys() == b.keys()
    for key in a:  # exact: every random draw and the codebook statistics are restored
        assert torch.equal(a[key], b[key]), key

    with pytest.raises(FileNotFoundError, match="not a folder"):
        run(photos, tmp_path / "empty", "--max_train_steps", "1", "--resume_from_checkpoint", str(tmp_path / "nope"))


def test_train_vqgan_overfits_a_fixed_batch_and_feeds_mage(photos, tmp_path):
    """Four images, no augmentation, every step the same batch: the reconstruction loss must fall. The output folder
    is a MageVQModel that tokenizes images for a tiny MageForMaskedImageModeling."""
    out = tmp_path / "vq"
    run(
        photos,
        out,
        "--max_train_samples",
        "4",
        "--num_validation_images",
        "0",
        "--random_crop_scale",
        "1",
        "1",
        "--no_hflip",
        "--learning_rate",
        "2e-3",
        "--max_train_steps",
        "40",
        "--logging_steps",
        "1",
        "--dead_code_steps",
        "0",
    )
    losses = [v for _, v in scalars(out, "loss/reconstruction")]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses

    vq = MageVQModel.from_pretrained(out)
    assert vq.config.resolution == RES and vq.config.grid_size == RES // 4
    config = MageConfig(
        vq_config=vq.config.to_dict(),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )
    mage = MageForMaskedImageModeling(config)
    mage.mage.vq_model.load_state_dict(vq.state_dict())
    from mage_hf.training_utils import center_crop_resize

    pixels = torch.stack([center_crop_resize(im, RES) for im in photo_images(48)[:2]])
    output = mage(pixel_values=pixels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(output.labels, vq.encode(pixels).token_ids.flatten(1))
    assert output.logits.shape == (2, (RES // 4) ** 2, 16) and torch.isfinite(output.loss)


def test_train_vqgan_dead_code_restart_in_the_script(photos, tmp_path):
    """Start from a tokenizer with eight unreachable codes: with restarts they come back into use."""
    start = tmp_path / "start"
    _far_codebook_model().save_pretrained(start)
    flags = [
        "--vq_model_name_or_path",
        str(start),
        "--max_train_steps",
        "6",
        "--logging_steps",
        "1",
        "--usage_window",
        "2",
    ]
    without = run(photos, tmp_path / "without", *flags, "--dead_code_steps", "0")
    revived = run(photos, tmp_path / "with", *flags, "--dead_code_steps", "2")
    assert without["codebook_usage"] <= 0.5  # codes 8..15 are never chosen
    restarted = [v for _, v in scalars(tmp_path / "with", "codebook/restarted")]
    assert sum(restarted) >= 8
    assert revived["codebook_usage"] > without["codebook_usage"]


def test_train_vqgan_bad_input(photos, tmp_path):
    with pytest.raises(FileNotFoundError, match="perceptual_weights"):
        run(photos, tmp_path / "a", "--max_train_steps", "1", "--perceptual_weights", str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="too small"):
        run(photos, tmp_path / "b", "--max_train_steps", "1", "--disc_weight", "1", "--disc_num_layers", "4")
    with pytest.raises(SystemExit):
        train_vqgan.parse_args(["--output_dir", "x"])  # no data
