"""MageScheduler, MageGenerationPipeline and MageInpaintPipeline on a tiny model, and inpainting/outpainting on real
photos (scikit-image's)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

from mage_hf import (
    MageForMaskedImageModeling,
    MageGenerationPipeline,
    MageInpaintPipeline,
    MageScheduler,
)
from mage_hf.pipeline_mage import make_outpaint_inputs, token_mask_from_pixels
from mage_hf.scheduling_mage import MASKING_SCHEDULES

from test_modeling import tiny_config
from training_data import photo_images

STEPS = 4


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MageForMaskedImageModeling(tiny_config()).eval()


@pytest.fixture(scope="module")
def pipe(model):
    pipe = MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(model.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint(model):
    pipe = MageInpaintPipeline(model=model, scheduler=MageScheduler.from_model_config(model.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def photos():
    return photo_images(256)[:3]


# ---------------------------------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize("name", sorted(MASKING_SCHEDULES))
def test_schedules_go_from_one_to_zero(name):
    fn = MASKING_SCHEDULES[name]
    values = [fn(r / 10) for r in range(11)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("name", ["cosine", "linear", "sqrt"])
def test_scheduler_keeps_known_tokens_and_follows_schedule(name):
    K, L, mask_id = 16, 64, 99
    scheduler = MageScheduler(mask_token_id=mask_id, masking_schedule=name)
    scheduler.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    known = torch.randint(0, K, (3, L), generator=g)
    token_mask = torch.rand(3, L, generator=g) < 0.7
    ids = scheduler.add_noise(known, token_mask=token_mask)
    n0 = token_mask.sum(1)
    for t in scheduler.timesteps:
        logits = torch.randn(3, L, K, generator=g)
        out = scheduler.step(logits, t, ids, generator=g)
        still = out.prev_sample == mask_id
        assert torch.equal(out.prev_sample[~token_mask], known[~token_mask])  # known tokens never change
        if int(t) < 7:
            unknown = (ids == mask_id).sum(1)
            want = torch.clamp(torch.minimum(unknown - 1, torch.floor(n0 * scheduler.masked_fraction(t)).long()), min=1)
            assert torch.equal(still.sum(1), want)
        ids = out.prev_sample
    assert not bool((ids == mask_id).any()) and bool((ids < K).all())


def test_scheduler_mask_len_rules_differ_only_for_different_masks():
    K, L, mask_id = 8, 32, 50
    logits = torch.randn(2, L, K, generator=torch.Generator().manual_seed(1))
    ids = torch.full((2, L), mask_id)
    ids[1, :20] = 3  # the second image has fewer unknown tokens
    counts = {}
    for rule in ("first", "per_sample"):
        scheduler = MageScheduler(mask_token_id=mask_id, mask_len_rule=rule)
        scheduler.set_timesteps(4)
        out = scheduler.step(logits, 0, ids, generator=torch.Generator().manual_seed(0))
        counts[rule] = (out.prev_sample == mask_id).sum(1).tolist()
    # N0 = 32 and 12; floor(N0 * cos(pi/8)) = 29 and 11 (clamped to unknown-1 = 31 and 11).
    assert counts["per_sample"] == [29, 11]
    # The original's rule applies row 0's 29 to every row: the second image (12 unknown) re-masks all of its new
    # tokens and makes no progress this step. Known tokens are never re-masked.
    assert counts["first"] == [29, 12]
    same = ids.clone()
    same[1] = mask_id
    for rule in ("first", "per_sample"):
        scheduler = MageScheduler(mask_token_id=mask_id, mask_len_rule=rule)
        scheduler.set_timesteps(4)
        out = scheduler.step(logits, 0, same, generator=torch.Generator().manual_seed(0))
        counts[rule] = (out.prev_sample == mask_id).sum(1).tolist()
    assert counts["first"] == counts["per_sample"] == [29, 29]


def test_scheduler_row_without_unknowns_is_left_alone():
    scheduler = MageScheduler(mask_token_id=9)
    scheduler.set_timesteps(3)
    ids = torch.tensor([[1, 2, 3, 4], [9, 9, 9, 9]])
    out = scheduler.step(torch.randn(2, 4, 5), 0, ids, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.prev_sample[0], ids[0])


def test_scheduler_add_noise_ratio_and_errors():
    scheduler = MageScheduler(mask_token_id=7)
    ids = torch.zeros(4, 100, dtype=torch.long)
    noisy = scheduler.add_noise(ids, mask_ratio=0.3, generator=torch.Generator().manual_seed(0))
    assert (noisy == 7).sum(1).tolist() == [30] * 4
    again = scheduler.add_noise(ids, mask_ratio=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.add_noise(ids)
    with pytest.raises(ValueError, match="mask_ratio"):
        scheduler.add_noise(ids, mask_ratio=1.5)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        MageScheduler(mask_token_id=7).step(torch.randn(1, 4, 3), 0, torch.zeros(1, 4, dtype=torch.long))
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(torch.randn(1, 4, 3), 5, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="masking_schedule"):
        MageScheduler(mask_token_id=7, masking_schedule="exp")


def test_scheduler_config_round_trip(tmp_path):
    scheduler = MageScheduler(mask_token_id=1064, masking_schedule="linear", choice_temperature=6.0)
    scheduler.save_pretrained(tmp_path)
    loaded = MageScheduler.from_pretrained(tmp_path)
    assert loaded.config.masking_schedule == "linear" and loaded.config.choice_temperature == 6.0
    assert loaded.config.mask_token_id == 1064


def test_sampling_temperature_sharpens_draws():
    """The token draw follows softmax(logits / temperature): the empirical rate of drawing the most likely token
    matches its expected probability at both temperatures, and a low temperature raises it."""
    n = 4000
    logits = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(3))
    hits = {}
    for temperature in (1.0, 0.05):
        scheduler = MageScheduler(mask_token_id=9, temperature=temperature)
        scheduler.set_timesteps(1)
        out = scheduler.step(logits, 0, torch.full((1, n), 9), generator=torch.Generator().manual_seed(0))
        hit = (out.prev_sample == logits.argmax(-1)).float().mean().item()
        expected = torch.softmax(logits / temperature, -1).max(-1).values.mean().item()
        assert abs(hit - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3, (temperature, hit, expected)
        hits[temperature] = hit
    assert hits[0.05] > hits[1.0] + 0.2


# ---------------------------------------------------------------------------------------------------- generation


def test_generation_is_seeded_and_batch_independent(pipe):
    batch = pipe(num_images=4, num_inference_steps=STEPS, generator=gens(10, 11, 12, 13), output_type="latent").images
    assert batch.shape == (4, 16, 16)
    images = pipe(num_images=4, num_inference_steps=STEPS, generator=gens(10, 11, 12, 13), output_type="pt").images
    for i, seed in enumerate((10, 11, 12, 13)):
        single = pipe(num_images=1, num_inference_steps=STEPS, generator=gens(seed), output_type="latent").images
        assert torch.equal(single[0], batch[i])
        single = pipe(num_images=1, num_inference_steps=STEPS, generator=gens(seed), output_type="pt").images
        assert torch.equal(single[0], images[i])  # pixels too, not only the ids
    a = pipe(num_images=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5), output_type="pt").images
    b = pipe(num_images=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(5), output_type="pt").images
    c = pipe(num_images=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(6), output_type="pt").images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_output_types(pipe):
    kwargs = dict(num_images=2, num_inference_steps=STEPS)
    pil = pipe(**kwargs, generator=gens(1, 2)).images
    arr = pipe(**kwargs, generator=gens(1, 2), output_type="np").images
    pt = pipe(**kwargs, generator=gens(1, 2), output_type="pt").images
    ids = pipe(**kwargs, generator=gens(1, 2), output_type="latent").images
    assert len(pil) == 2 and all(isinstance(im, PIL.Image.Image) and im.size == (256, 256) for im in pil)
    assert arr.shape == (2, 256, 256, 3) and arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1
    assert pt.shape == (2, 3, 256, 256) and torch.allclose(pt.permute(0, 2, 3, 1), torch.from_numpy(arr))
    assert np.array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    assert ids.dtype == torch.long and ids.shape == (2, 16, 16)
    assert torch.allclose(pipe.decode(ids.flatten(1)), pt)
    tup = pipe(**kwargs, generator=gens(1, 2), output_type="latent", return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], ids)


def test_callback_sees_every_step_and_can_edit(pipe):
    calls = []

    def callback(pipeline, step, timestep, tensors):
        calls.append((step, int(timestep), int((tensors["token_ids"] == pipeline.model.config.mask_token_id).sum())))
        if step == 0:
            return {"token_ids": torch.zeros_like(tensors["token_ids"])}  # fix every token to id 0
        return {}

    ids = pipe(num_images=1, num_inference_steps=STEPS, generator=gens(0), output_type="latent", callback_on_step_end=callback).images
    assert [c[:2] for c in calls] == [(i, i) for i in range(STEPS)]
    assert calls[0][2] > 0 and calls[1][2] == 0
    assert bool((ids == 0).all())
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(num_images=1, num_inference_steps=STEPS, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])


def test_progress_bar_reports_steps(model, capsys):
    pipe = MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(model.config))
    pipe.set_progress_bar_config(disable=False)
    pipe(num_images=1, num_inference_steps=3, generator=gens(0), output_type="latent")
    assert "3/3" in capsys.readouterr().err


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="num_images"):
        pipe(num_images=0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(num_inference_steps=1, output_type="jpeg")
    with pytest.raises(ValueError, match="generators"):
        pipe(num_images=3, num_inference_steps=1, generator=gens(1, 2))
    with pytest.raises(ValueError, match="class-unconditional"):
        pipe(num_inference_steps=1, class_labels=3)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(num_inference_steps=1, guidance_scale=0.5)
    with pytest.raises(ValueError, match="mask_token_id"):
        MageGenerationPipeline(model=pipe.model, scheduler=MageScheduler(mask_token_id=3))
    for generator in (0, [0], [torch.Generator(), None]):
        with pytest.raises(TypeError, match="torch.Generator"):
            pipe(num_images=1 if generator == 0 else len(generator), num_inference_steps=1, generator=generator)
    with pytest.raises(ValueError, match="choice_temperature"):
        pipe(num_inference_steps=1, choice_temperature=-1.0)


def test_interrupting_returns_the_current_guess(pipe):
    """A callback that sets `_interrupt` (as in diffusers) ends the loop; the still-masked tokens take the last
    step's draw, so the output decodes."""
    calls = []

    def stop(pipeline, step, timestep, kwargs):
        calls.append(step)
        pipeline._interrupt = True
        return kwargs

    ids = pipe(num_inference_steps=STEPS, generator=gens(0), output_type="latent", callback_on_step_end=stop).images
    assert calls == [0]
    assert not bool((ids == pipe.model.config.mask_token_id).any())
    images = pipe(num_inference_steps=STEPS, generator=gens(0), output_type="np", callback_on_step_end=stop).images
    assert images.shape == (1, 256, 256, 3)
    # The next call starts afresh (the flag is reset) and runs every step: its image is not the first step's guess.
    full = pipe(num_inference_steps=STEPS, generator=gens(0), output_type="latent").images
    assert not pipe.interrupt and not torch.equal(ids, full)


def test_model_cpu_offload_moves_the_model_through_its_hook(model):
    """accelerate's offload hook fires on `forward`; the pipeline calls `masked_logits` and the tokenizer, so it must
    run the hook itself (on a GPU machine that is what moves the model there)."""
    pipe = MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(model.config))
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    try:
        hook = model._hf_hook
        calls = []
        original = hook.pre_forward
        hook.pre_forward = lambda module, *args, **kwargs: (calls.append(module), original(module, *args, **kwargs))[1]
        pipe(num_inference_steps=2, generator=gens(0), output_type="latent")
        assert calls and calls[0] is model
    finally:
        pipe.remove_all_hooks()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pipeline_loaded_in_half_precision_decodes_with_the_float32_tokenizer(pipe, tmp_path, dtype):
    """Loaded with `dtype=` (as pipelines/sample.py --dtype now does), the transformer is in half precision and the
    tokenizer keeps its float32 weights, so the same ids decode to the same pixels as in float32. (Cast after
    loading, the weights were rounded first: up to 2e-2 apart in bfloat16.)"""
    pipe.save_pretrained(tmp_path / "pipe")
    half = MageGenerationPipeline.from_pretrained(tmp_path / "pipe", dtype=dtype)
    assert next(half.model.decoder.parameters()).dtype == dtype and half.model.mage.vq_model.dtype == torch.float32
    ids = torch.randint(0, pipe.model.config.codebook_size, (2, pipe.model.config.num_image_tokens),
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(half.decode(ids), pipe.decode(ids))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_generation_upcasts_the_vq_decode(model, dtype):
    half = MageForMaskedImageModeling(model.config).eval()
    half.load_state_dict(model.state_dict())
    half.to(dtype)
    pipe = MageGenerationPipeline(model=half, scheduler=MageScheduler.from_model_config(half.config))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(num_images=1, num_inference_steps=2, generator=gens(0), output_type="pt").images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert half.mage.vq_model.dtype == dtype  # put back after the float32 decode
    # The decode ran in float32: it equals a float32 copy of the (rounded) VQ weights decoding the same ids.
    ids = pipe(num_images=1, num_inference_steps=2, generator=gens(0), output_type="latent").images
    vq32 = copy.deepcopy(half.mage.vq_model).float()
    with torch.no_grad():
        expected = vq32.decode(ids).float().clamp(0, 1)
    assert torch.equal(images, expected)


# ---------------------------------------------------------------------------------------------------- save / load


def test_save_and_load_local_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["model"] == ["mage_hf.modeling_mage", "MageForMaskedImageModeling"]
    assert index["scheduler"] == ["mage_hf.scheduling_mage", "MageScheduler"]
    # The tokenizer's weights are stored once, inside the model.
    weights = list((tmp_path / "pipe").rglob("*.safetensors"))
    assert [w.relative_to(tmp_path / "pipe").as_posix() for w in weights] == ["model/model.safetensors"]
    loaded = MageGenerationPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(num_images=2, num_inference_steps=STEPS, output_type="pt")
    assert torch.equal(loaded(**kwargs, generator=gens(4, 5)).images, pipe(**kwargs, generator=gens(4, 5)).images)
    # The inpainting pipeline loads the same folder.
    assert isinstance(MageInpaintPipeline.from_pretrained(tmp_path / "pipe"), MageInpaintPipeline)
    # transformers loads the model folder with its image processor, as it does a converted folder.
    from transformers import AutoImageProcessor, pipeline

    processor = AutoImageProcessor.from_pretrained(tmp_path / "pipe", subfolder="model")
    assert processor.crop_size == {"height": pipe.resolution, "width": pipe.resolution}
    extractor = pipeline("image-feature-extraction", model=str(tmp_path / "pipe" / "model"))
    features = extractor(photo_images(64)[0], return_tensors=True)
    assert features.shape == (1, pipe.model.config.num_image_tokens + 1, pipe.model.config.hidden_size)


def test_load_bare_model_folder(pipe, tmp_path):
    pipe.model.save_pretrained(tmp_path / "model")
    loaded = MageGenerationPipeline.from_pretrained(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.mask_token_id == pipe.model.config.mask_token_id
    kwargs = dict(num_images=1, num_inference_steps=STEPS, output_type="latent")
    assert torch.equal(loaded(**kwargs, generator=gens(9)).images, pipe(**kwargs, generator=gens(9)).images)
    with pytest.raises(ValueError, match="neither a pipeline"):
        MageGenerationPipeline.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="bogus"):  # not dropped silently
        MageGenerationPipeline.from_pretrained(tmp_path / "model", bogus=1)
    loaded = MageGenerationPipeline.from_pretrained(tmp_path / "model", dtype=None, torch_dtype=torch.bfloat16)
    assert loaded.model.dtype == torch.bfloat16
    # An encoder-only or classifier folder lacks the decoder and MLM head: refused, not filled with random weights.
    from mage_hf import MageForImageClassification, MageModel

    MageModel(pipe.model.config).save_pretrained(tmp_path / "encoder")
    MageForImageClassification(pipe.model.config).save_pretrained(tmp_path / "classifier")
    for name, architecture in (("encoder", "MageModel"), ("classifier", "MageForImageClassification")):
        with pytest.raises(ValueError, match=f"holds a {architecture} without .* weights generation needs"):
            MageGenerationPipeline.from_pretrained(tmp_path / name)
    # A mistyped folder is reported as one, not as a malformed Hub repo id.
    for name in (tmp_path / "no-such-folder", "./no-such-folder", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="No such folder"):
            MageGenerationPipeline.from_pretrained(name)


def test_load_by_repo_id_from_a_snapshot(pipe, tmp_path, monkeypatch):
    """A repo id resolves to a snapshot first (huggingface_hub.snapshot_download), then loads from that folder.
    diffusers' own repo-id path (DiffusionPipeline.download) refuses components from outside diffusers/transformers
    online; it is made to fail here to prove it is never taken."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--mage-hf--tiny-test" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    pipe.save_pretrained(snapshot)
    (cache / "models--mage-hf--tiny-test" / "refs").mkdir(parents=True)
    (cache / "models--mage-hf--tiny-test" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        DiffusionPipeline, "download", classmethod(lambda *a, **k: pytest.fail("diffusers' repo-id download was used"))
    )
    loaded = MageGenerationPipeline.from_pretrained("mage-hf/tiny-test", cache_dir=str(cache))
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(num_images=1, num_inference_steps=STEPS, output_type="pt")
    assert torch.equal(loaded(**kwargs, generator=gens(3)).images, pipe(**kwargs, generator=gens(3)).images)
    # A repo that is not in the cache fails with huggingface_hub's clear offline error.
    with pytest.raises(Exception, match="(?i)offline|cannot find|local"):
        MageGenerationPipeline.from_pretrained("mage-hf/not-there", cache_dir=str(cache))


# ---------------------------------------------------------------------------------------------------- inpainting


def test_token_mask_covers_every_overlapped_cell():
    mask = torch.zeros(1, 1, 256, 256)
    mask[0, 0, 0, 0] = 1  # one pixel: one cell
    mask[0, 0, 100:120, 40:50] = 1  # crosses cell boundaries: rows 6-7, columns 2-3
    cells = token_mask_from_pixels(mask, 16)[0]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[0, 0] = True
    expected[6:8, 2:4] = True
    assert torch.equal(cells, expected)


def test_inpainting_keeps_every_unmasked_token(inpaint, photos):
    mask = PIL.Image.new("L", (256, 256), 0)
    mask.paste(255, (64, 96, 160, 200))  # x0, y0, x1, y1
    known = inpaint.tokenize(torch.from_numpy(np.stack([np.asarray(p) for p in photos[:2]])).permute(0, 3, 1, 2) / 255.0)
    out = inpaint(photos[:2], mask_image=mask, num_inference_steps=STEPS, generator=gens(0, 1), output_type="latent")
    token_mask = out.token_mask.flatten(1)
    assert int(token_mask[0].sum()) == 6 * 7  # columns 4..9, rows 6..12
    assert torch.equal(out.images.flatten(1)[~token_mask], known[~token_mask])
    assert not torch.equal(out.images.flatten(1)[token_mask], known[token_mask])  # the hole was regenerated


def test_paste_back_restores_unmasked_pixels(inpaint, photos):
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[30:90, 150:230] = 255
    original = np.asarray(photos[0]).astype(np.float32) / 255.0
    out = inpaint(photos[0], mask_image=mask, paste_back=True, num_inference_steps=STEPS, generator=gens(0), output_type="np")
    keep = mask == 0
    assert np.abs(out.images[0][keep] - original[keep]).max() < 1e-6
    plain = inpaint(photos[0], mask_image=mask, num_inference_steps=STEPS, generator=gens(0), output_type="np")
    assert np.abs(plain.images[0][keep] - original[keep]).max() > 1e-3  # without it, the VQGAN's reconstruction
    assert np.array_equal(plain.images[0][~keep], out.images[0][~keep])


def test_mask_formats_and_resizing(inpaint, photos):
    small = photos[0].resize((128, 128))
    mask = PIL.Image.new("1", (128, 128), 0)
    mask.paste(1, (0, 0, 8, 8))  # the top-left 8x8 pixels of a 128 image = one 16x16 cell at 256
    out = inpaint(small, mask_image=mask, num_inference_steps=1, generator=gens(0), output_type="latent")
    assert int(out.token_mask.sum()) == 1 and bool(out.token_mask[0, 0, 0])
    rgb_mask = mask.convert("RGB")
    out2 = inpaint(small, mask_image=rgb_mask, num_inference_steps=1, generator=gens(0), output_type="latent")
    assert torch.equal(out.images, out2.images)
    tensor_mask = torch.zeros(128, 128, dtype=torch.bool)
    tensor_mask[:8, :8] = True
    out3 = inpaint(small, mask_image=tensor_mask, num_inference_steps=1, generator=gens(0), output_type="latent")
    assert torch.equal(out.images, out3.images)


def test_inpainting_errors(inpaint, photos):
    full = PIL.Image.new("L", (256, 256), 255)
    with pytest.raises(ValueError, match="empty"):
        inpaint(photos[0], mask_image=PIL.Image.new("L", (256, 256), 0))
    with pytest.raises(ValueError, match="size of the image"):
        inpaint(photos[0], mask_image=PIL.Image.new("L", (128, 128), 255))
    with pytest.raises(ValueError, match="square"):
        inpaint(photos[0].crop((0, 0, 256, 200)), mask_image=PIL.Image.new("L", (256, 200), 255))
    with pytest.raises(ValueError, match="mask_image to inpaint"):
        inpaint(photos[0])
    with pytest.raises(ValueError, match="mask_image to inpaint"):
        inpaint(photos[0], mask_image=full, strength=0.5)
    with pytest.raises(ValueError, match="masks for"):
        inpaint(photos[:2], mask_image=torch.ones(3, 256, 256))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inpaint(photos[0], mask_image=torch.full((256, 256), 3.0))
    with pytest.raises(ValueError, match="strength"):
        inpaint(photos[0], strength=1.5)
    with pytest.raises(ValueError, match="same size"):
        inpaint(photos[:2], mask_image=[full, PIL.Image.new("L", (128, 128), 255)])


def test_mask_arrays_in_every_common_layout(inpaint, photos):
    """uint8 masks as 0/255 or 0/1 (numpy or torch), colour-last arrays as `np.asarray(Image.open(mask))` gives:
    all mark the same cells as the PIL mask."""
    mask = PIL.Image.new("L", (256, 256), 0)
    mask.paste(255, (16, 32, 48, 64))
    expected = inpaint(photos[0], mask_image=mask, num_inference_steps=1, generator=gens(0), output_type="latent")
    grey = np.asarray(mask)  # (H, W) uint8 0/255
    variants = {
        "numpy 0/255": grey,
        "numpy 0/1": (grey > 0).astype(np.uint8),
        "torch uint8 0/255": torch.from_numpy(grey.copy()),
        "torch uint8 0/1": torch.from_numpy((grey > 0).astype(np.uint8)),
        "numpy (H, W, 3)": np.asarray(mask.convert("RGB")),
        "numpy (H, W, 1)": grey[..., None],
        "numpy (1, H, W, 3)": np.asarray(mask.convert("RGB"))[None],
    }
    for name, variant in variants.items():
        out = inpaint(photos[0], mask_image=variant, num_inference_steps=1, generator=gens(0), output_type="latent")
        assert torch.equal(out.token_mask, expected.token_mask), name
        assert torch.equal(out.images, expected.images), name


def test_variations_remask_a_fraction(inpaint, photos):
    out = inpaint(photos[0], strength=0.25, num_inference_steps=STEPS, generator=gens(0), output_type="latent")
    assert int(out.token_mask.sum()) == math.ceil(0.25 * 256)
    known = inpaint.tokenize(torch.from_numpy(np.array(photos[0])).permute(2, 0, 1)[None] / 255.0)
    unchanged = out.images.flatten(1) == known
    assert bool(unchanged[~out.token_mask.flatten(1)].all())


@pytest.mark.parametrize("direction,shape", [("right", (256, 320)), ("left", (256, 320)), ("down", (320, 256)), ("up", (320, 256))])
def test_outpainting_grows_the_canvas_and_keeps_the_image(inpaint, photos, direction, shape):
    out = inpaint.outpaint(photos[1], direction=direction, amount=0.25, num_inference_steps=STEPS, generator=gens(0), output_type="np")
    canvas = out.images[0]
    assert canvas.shape[:2] == shape
    original = np.asarray(photos[1]).astype(np.float32) / 255.0
    region = {
        "right": canvas[:, :256], "left": canvas[:, 64:], "down": canvas[:256], "up": canvas[64:],
    }[direction]
    assert np.abs(region - original).max() < 1e-6
    assert int(out.token_mask.sum()) == 16 * 4  # 64 new pixels = 4 token columns (or rows)


def test_outpainting_window_repeats_the_edge_into_the_new_area():
    """The new area starts as the nearest edge pixels repeated (not a flat colour: see make_outpaint_inputs)."""
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    window, mask = make_outpaint_inputs(image, "right", 0.25)  # 8 new columns
    assert torch.equal(window[..., :24], image[..., 8:]) and bool((mask[..., 24:] == 1).all())
    assert torch.equal(window[..., 24:], image[..., -1:].expand(-1, -1, -1, 8))
    window, mask = make_outpaint_inputs(image, "up", 0.25)
    assert torch.equal(window[..., 8:, :], image[..., :24, :])
    assert torch.equal(window[..., :8, :], image[..., :1, :].expand(-1, -1, 8, -1))
    window, mask = make_outpaint_inputs(image, "uncrop", 0.25)  # 24 px in the centre, 4 px border
    inner = window[..., 4:28, 4:28]
    assert torch.equal(window[..., :4, 4:28], inner[..., :1, :].expand(-1, -1, 4, -1))
    assert torch.equal(window[..., 0, 0], inner[..., 0, 0]) and int((mask == 0).sum()) == 2 * 24 * 24


def test_uncrop_keeps_the_shrunk_image(inpaint, photos):
    pixels = torch.from_numpy(np.asarray(photos[2]).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    window, mask = make_outpaint_inputs(pixels, "uncrop", 0.25)
    out = inpaint.outpaint(photos[2], direction="uncrop", amount=0.25, num_inference_steps=STEPS, generator=gens(0), output_type="pt")
    assert out.images.shape == (1, 3, 256, 256)
    keep = mask[0, 0] == 0
    assert int(keep.sum()) == 192 * 192
    assert (out.images[0][:, keep] - window[0][:, keep]).abs().max() < 1e-6
    with pytest.raises(ValueError, match="direction"):
        inpaint.outpaint(photos[2], direction="sideways")
    with pytest.raises(ValueError, match="amount"):
        inpaint.outpaint(photos[2], direction="left", amount=1.0)


# ---------------------------------------------------------------------------------------------------- class-conditional


@pytest.fixture(scope="module")
def conditional_pipe():
    torch.manual_seed(1)
    model = MageForMaskedImageModeling(tiny_config(num_classes=10)).eval()
    pipe = MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(model.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_class_labels_condition_generation(conditional_pipe):
    pipe = conditional_pipe
    kwargs = dict(num_images=2, num_inference_steps=STEPS, output_type="latent")
    a = pipe(**kwargs, generator=gens(0, 1), class_labels=[3, 3]).images
    b = pipe(**kwargs, generator=gens(0, 1), class_labels=3).images  # one label for the batch
    c = pipe(**kwargs, generator=gens(0, 1), class_labels=[7, 7]).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="class_labels"):
        pipe(**kwargs, class_labels=[10, 0])
    with pytest.raises(ValueError, match="class labels for"):
        pipe(**kwargs, class_labels=[1, 2, 3])
    with pytest.raises(ValueError, match="needs class_labels"):
        pipe(**kwargs, guidance_scale=3.0)
    for labels in (torch.tensor([2.7]), 2.5, True, [1, 2.0]):  # not truncated to a class id
        with pytest.raises(TypeError, match="integer class ids"):
            pipe(**kwargs, class_labels=labels)


def test_class_names_map_to_ids_through_the_config(tmp_path):
    """With `id2label` in the config (as train_mage.py saves a ClassLabel's names), `class_labels` takes names, also
    mixed with ids, and they survive a save/load round trip; without names, or with an unknown one, the error says
    what to pass."""
    torch.manual_seed(1)
    names = [f"class {c}" for c in "ABCDEFGHIJ"]
    config = tiny_config(num_classes=10, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = MageForMaskedImageModeling(config).eval()
    MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(config)).save_pretrained(tmp_path)
    pipe = MageGenerationPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.labels == {name: i for i, name in enumerate(names)}
    assert pipe.get_label_ids(["class D", "class A"]) == [3, 0] and pipe.get_label_ids("class J") == [9]
    kwargs = dict(num_images=2, num_inference_steps=STEPS, output_type="latent")
    by_id = pipe(**kwargs, generator=gens(0, 1), class_labels=[3, 7]).images
    assert torch.equal(pipe(**kwargs, generator=gens(0, 1), class_labels=["class D", "class H"]).images, by_id)
    assert torch.equal(pipe(**kwargs, generator=gens(0, 1), class_labels=["class D", 7]).images, by_id)
    with pytest.raises(ValueError, match="Unknown class name.*'class Z'.*class A, class B"):
        pipe(**kwargs, class_labels="class Z")


def test_class_names_without_names_in_the_config(conditional_pipe):
    assert conditional_pipe.labels == {}  # transformers' LABEL_0/LABEL_1 placeholder is not taken for names
    with pytest.raises(ValueError, match="names no classes.*integers \\(0 to 9\\)"):
        conditional_pipe(num_images=1, num_inference_steps=STEPS, class_labels="cat")


def test_classifier_free_guidance_combines_conditional_and_unconditional_logits(conditional_pipe):
    pipe = conditional_pipe
    ids = torch.full((2, 256), pipe.model.config.mask_token_id)
    ids[:, :100] = 5
    labels = torch.tensor([2, 8])
    with torch.no_grad():
        cond = pipe.model(input_ids=ids, class_labels=labels).logits
        uncond = pipe.model(input_ids=ids, class_labels=torch.tensor([-1, -1])).logits
        plain = pipe.model(input_ids=ids).logits
        guided = pipe.predict_logits(ids, labels, guidance_scale=3.0)
        unguided = pipe.predict_logits(ids, labels, guidance_scale=1.0)
    assert torch.allclose(uncond, plain, atol=1e-6)  # label -1 is the fake label of unconditional models
    # The pipeline computes logits only at the masked positions (the sampler reads no others).
    masked = ids == pipe.model.config.mask_token_id
    assert torch.allclose(guided[masked], (uncond + 3.0 * (cond - uncond))[masked], atol=1e-5)
    assert torch.allclose(unguided[masked], cond[masked], atol=1e-6)
    assert not guided[~masked].any() and not unguided[~masked].any()
    out = pipe(num_images=2, num_inference_steps=STEPS, generator=gens(0, 1), class_labels=[2, 8], guidance_scale=3.0, output_type="pt")
    assert out.images.shape == (2, 3, 256, 256) and torch.isfinite(out.images).all()
