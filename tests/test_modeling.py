"""MAGE models on a tiny configuration: training forward, determinism, round trips, Auto classes, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedImageModeling,
)

from mage_hf import (
    MageConfig,
    MageForImageClassification,
    MageForMaskedImageModeling,
    MageImageProcessor,
    MageModel,
    MageVQConfig,
    MageVQModel,
)
from mage_hf.modeling_mage import random_token_masks, sample_mask_ratio


def tiny_config(**kwargs) -> MageConfig:
    vq = MageVQConfig(base_channels=32, channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1, num_embeddings=16, embed_dim=8)
    defaults = dict(
        vq_config=vq, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=2, decoder_intermediate_size=64,
    )
    defaults.update(kwargs)
    return MageConfig(**defaults)


def config_fields(config) -> dict:
    """The config as saved, less what loading itself records (where it came from, the dtype it was loaded in)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "dtype")}
    if "vq_config" in fields:
        fields["vq_config"] = {k: v for k, v in fields["vq_config"].items() if k not in ("_name_or_path", "dtype")}
    return fields


@pytest.fixture
def images():
    return torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))


def test_config_derived_ids():
    config = tiny_config()
    assert config.vocab_size == 16 + 1000 + 1
    assert config.fake_class_label == 16 + 76
    assert config.mask_token_id == config.vocab_size - 1
    assert config.num_image_tokens == 256 and config.max_position_embeddings == 257
    released = MageConfig()
    assert (released.vocab_size, released.fake_class_label, released.mask_token_id) == (2025, 1100, 2024)


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="drop_ratio"):
        tiny_config(drop_ratio=0.6)
    with pytest.raises(ValueError, match="not divisible"):
        tiny_config(decoder_num_attention_heads=5)
    with pytest.raises(ValueError, match="multiple of norm_num_groups"):
        MageVQConfig(base_channels=48)


def test_training_forward_draws_masks_like_mage(images):
    model = MageForMaskedImageModeling(tiny_config()).train()
    out = model(pixel_values=images, generator=torch.Generator().manual_seed(1))
    L = 256
    assert 0.5 <= out.mask_ratio <= 1.0
    num_masked = math.ceil(L * out.mask_ratio)
    assert out.token_mask.sum(1).tolist() == [num_masked] * 2
    assert out.token_drop_mask.sum(1).tolist() == [128] * 2  # ceil(256 * 0.5) never enter the encoder
    assert not (out.token_drop_mask & ~out.token_mask).any()
    assert out.encoder_last_hidden_state.shape == (2, 1 + L - 128, 32)
    assert out.logits.shape == (2, L, 16)
    assert torch.isfinite(out.loss)

    again = model.eval()(pixel_values=images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.token_mask, again.token_mask) and out.mask_ratio == again.mask_ratio


def test_explicit_noise_and_ratio_decide_the_masks(images):
    model = MageForMaskedImageModeling(tiny_config()).eval()
    noise = torch.rand(2, 256, generator=torch.Generator().manual_seed(3))
    out = model(pixel_values=images, noise=noise, mask_ratio=0.7)
    expected_mask, expected_drop = random_token_masks(noise, math.ceil(256 * 0.7), 128)
    assert torch.equal(out.token_mask, expected_mask) and torch.equal(out.token_drop_mask, expected_drop)
    # The masked positions are the lowest-noise ones.
    for row in range(2):
        assert noise[row][out.token_mask[row]].max() < noise[row][~out.token_mask[row]].min()
    again = model(pixel_values=images, noise=noise, mask_ratio=0.7)
    assert torch.equal(out.logits, again.logits) and torch.equal(out.loss, again.loss)


def test_mask_ratio_follows_the_truncated_normal():
    scipy_stats = pytest.importorskip("scipy.stats")
    config = MageConfig()
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_mask_ratio(config, g) for _ in range(20000)], dtype=torch.float64)
    a, b = (0.5 - 0.55) / 0.25, (1.0 - 0.55) / 0.25
    dist = scipy_stats.truncnorm(a, b, loc=0.55, scale=0.25)
    assert draws.min() >= 0.5 and draws.max() <= 1.0
    assert abs(float(draws.mean()) - dist.mean()) < 4 * dist.std() / math.sqrt(len(draws))
    assert abs(float(draws.std()) - dist.std()) < 0.01
    assert abs(float(draws.median()) - dist.median()) < 0.01


def test_loss_trains_the_model_not_the_tokenizer_nor_through_the_mlm_weights(images):
    model = MageForMaskedImageModeling(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    out = model(pixel_values=images, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is None for p in model.mage.vq_model.parameters())
    grad = model.mage.embeddings.word_embeddings.weight.grad
    used = torch.unique(torch.cat([out.labels.masked_fill(out.token_mask, model.config.mask_token_id).flatten(),
                                   torch.tensor([model.config.fake_class_label])]))
    unused = torch.ones(model.config.vocab_size, dtype=torch.bool)
    unused[used] = False
    # Rows of ids that never entered the encoder get no gradient: the MLM layer uses a detached copy.
    assert grad[unused].abs().max() == 0
    assert grad[used].abs().sum() > 0
    assert model.mlm_head.bias.grad is not None and model.decoder.position_embeddings.grad is not None


def test_inference_forward_scores_masked_ids(images):
    model = MageForMaskedImageModeling(tiny_config()).eval()
    ids = model.mage.tokenize(images)
    masked = ids.clone()
    masked[:, :100] = model.config.mask_token_id
    out = model(input_ids=masked)
    assert out.loss is None and out.mask_ratio is None and out.token_drop_mask is None
    assert out.token_mask[:, :100].all() and not out.token_mask[:, 100:].any()
    explicit = model(input_ids=ids, token_mask=out.token_mask)
    assert torch.allclose(out.logits, explicit.logits, atol=1e-6)
    assert explicit.loss is not None  # labels are known from the unmasked ids


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masked_logits_equal_forward_at_masked_positions(attn):
    """`masked_logits` (the sampler's cheaper call) gives `forward`'s logits wherever an id is masked, zeros
    elsewhere: rows from nothing to everything masked, class labels, and identical rows computed once."""
    torch.manual_seed(0)
    model = MageForMaskedImageModeling(tiny_config(num_classes=10, attn_implementation=attn)).eval()
    config = model.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.codebook_size, (5, 256), generator=g)
    fraction = torch.tensor([0.0, 0.02, 0.5, 0.97, 1.0]).unsqueeze(1)
    masked = torch.rand(5, 256, generator=g) < fraction
    masked[1, 0] = True  # at least one masked token in the 2% row
    ids = ids.masked_fill(masked, config.mask_token_id)
    labels = torch.tensor([3, -1, 0, 9, -1])
    for class_labels in (None, labels):
        with torch.no_grad():
            expected = model(input_ids=ids, class_labels=class_labels).logits
        logits = model.masked_logits(ids, class_labels=class_labels)
        assert logits.shape == expected.shape
        assert (logits - expected)[masked].abs().max() < 1e-5
        assert not logits[~masked].any()
    # Identical rows (the first step of unconditional sampling) are computed once and give each row the same logits.
    all_masked = torch.full((3, 256), config.mask_token_id)
    logits = model.masked_logits(all_masked)
    with torch.no_grad():
        expected = model(input_ids=all_masked).logits
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    assert (logits - expected).abs().max() < 1e-5
    # Rows that differ only in their class label are not merged.
    logits = model.masked_logits(all_masked, class_labels=torch.tensor([1, 1, 2]))
    assert torch.equal(logits[0], logits[1]) and not torch.allclose(logits[0], logits[2])
    with pytest.raises(ValueError, match="input_ids must be codebook ids"):
        model.masked_logits(torch.full((1, 256), config.vocab_size))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_masked_logits_only_training_gives_the_same_loss_and_gradients(checkpointing):
    """`masked_logits_only=True` (what train_mage.py uses) skips the unmasked rows of the last decoder block and the
    head: same logits at masked positions, zeros elsewhere, and the loss and every gradient of the full computation
    (dropped tokens, class labels, gradient checkpointing). Dropout is off so that both draw nothing."""
    torch.manual_seed(0)
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_classes=10)
    model = MageForMaskedImageModeling(config).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    ids = torch.randint(0, config.codebook_size, (3, 256), generator=torch.Generator().manual_seed(1))
    results = []
    for only in (False, True):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, class_labels=torch.tensor([1, -1, 7]), mask_ratio=0.7,
                    generator=torch.Generator().manual_seed(2), masked_logits_only=only)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, full_grads), (only, only_grads) = results
    assert torch.equal(full.token_mask, only.token_mask) and torch.equal(full.token_drop_mask, only.token_drop_mask)
    mask = only.token_mask
    assert mask.float().mean() > 0.6 and only.token_drop_mask.any()
    assert (full.logits - only.logits)[mask].abs().max() < 1e-5
    assert not only.logits[~mask].any()
    assert torch.allclose(full.loss, only.loss, rtol=1e-6, atol=0)
    assert full_grads.keys() == only_grads.keys()
    assert "mlm_head.dense.weight" in only_grads and "decoder.transformer.layers.1.mlp.fc2.weight" in only_grads
    for name, grad in full_grads.items():
        assert torch.allclose(grad, only_grads[name], rtol=1e-5, atol=1e-7), name
    # Nothing masked: a zero loss that still belongs to the graph, as without the option.
    out = model(input_ids=ids, token_mask=torch.zeros_like(mask), masked_logits_only=True)
    assert out.loss.item() == 0.0 and out.loss.requires_grad and not out.logits.any()


def test_overfits_a_fixed_batch(images):
    """With a fixed image and mask the model can memorise the masked ids: the loss must fall well below the ~ln(16)
    of a uniform guess. (Learning is slowish: the MLM scores against the detached, small-norm token embeddings, and
    the random tokenizer, with its codebook initialised as taming's, spreads the targets over all 16 codes.)"""
    torch.manual_seed(0)
    model = MageForMaskedImageModeling(tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    ids = model.mage.tokenize(images[:1])
    noise = torch.rand(1, 256, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(150):
        loss = model(input_ids=ids, noise=noise, mask_ratio=0.6).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.95 * math.log(16)
    assert min(losses[-5:]) < 0.5 * losses[0], losses


def test_gradient_checkpointing_gives_the_same_gradients(images):
    """With dropout on: the recomputed forward pass must draw the same masks (the RNG state is restored for it)."""
    config = tiny_config()
    assert config.hidden_dropout_prob > 0 and config.attention_probs_dropout_prob > 0
    plain = MageForMaskedImageModeling(config).train()
    checkpointed = MageForMaskedImageModeling(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    layers = [*checkpointed.mage.encoder.layers, *checkpointed.decoder.transformer.layers]
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in plain.modules())
    for model in (plain, checkpointed):
        torch.manual_seed(123)  # the dropout masks
        model(pixel_values=images, noise=torch.linspace(0, 1, 512).view(2, 256), mask_ratio=0.6).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("use_mean_pooling", [False, True])
def test_pooled_output(images, use_mean_pooling):
    model = MageModel(tiny_config(use_mean_pooling=use_mean_pooling)).eval()
    out = model(pixel_values=images, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 257, 32)
    if use_mean_pooling:  # fc_norm of the mean over image positions of the last block (no final norm)
        expected = model.pooler.layernorm(out.hidden_states[-1][:, 1:].mean(1))
        assert isinstance(model.layernorm, torch.nn.Identity)
    else:  # the normed class position
        expected = out.last_hidden_state[:, 0]
    assert torch.allclose(out.pooler_output, expected)


def test_sdpa_and_eager_agree_and_attentions_are_returned(images):
    config = tiny_config()
    sdpa = MageForMaskedImageModeling(config).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    eager_config = tiny_config()
    eager_config._attn_implementation = "eager"
    eager = MageForMaskedImageModeling(eager_config).eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = sdpa.mage.tokenize(images)
    mask = torch.rand(2, 256) < 0.5
    a, b = sdpa(input_ids=ids, token_mask=mask), eager(input_ids=ids, token_mask=mask, output_attentions=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert len(b.encoder_attentions) == 2 and b.encoder_attentions[0].shape == (2, 2, 257, 257)
    assert torch.allclose(b.encoder_attentions[0].sum(-1), torch.ones(2, 2, 257))
    c = sdpa(input_ids=ids, token_mask=mask, output_attentions=True)  # falls back to eager for the maps
    assert torch.allclose(c.encoder_attentions[1], b.encoder_attentions[1], atol=1e-6)


def test_tuple_outputs(images):
    model = MageForMaskedImageModeling(tiny_config()).eval()
    ids = model.mage.tokenize(images)
    out = model(input_ids=ids, token_mask=torch.ones_like(ids, dtype=torch.bool), return_dict=False)
    assert isinstance(out, tuple) and out[0].ndim == 0 and out[1].shape == (2, 256, 16)  # (loss, logits, ...)
    encoder = MageModel(tiny_config()).eval()
    assert isinstance(encoder(input_ids=ids, return_dict=False), tuple)


@pytest.mark.parametrize("cls", [MageModel, MageForMaskedImageModeling, MageForImageClassification])
def test_save_and_load_round_trip_is_exact(tmp_path, images, cls):
    model = cls(tiny_config(num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = cls.from_pretrained(tmp_path).eval()
    for m in (model, loaded):  # the tokenizer stays frozen, the rest trains
        assert {n for n, p in m.named_parameters() if not p.requires_grad} == {n for n, _ in m.named_parameters() if ".vq_model." in n or n.startswith("vq_model.")}
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert config_fields(loaded.config) == config_fields(model.config)
    # The masked-token model draws masks from `generator`: the same seed must give the same numbers.
    first = model(pixel_values=images, generator=torch.Generator().manual_seed(0), return_dict=False)
    second = loaded(pixel_values=images, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert all(torch.equal(x, y) for x, y in zip(first, second) if isinstance(x, torch.Tensor))


def test_vq_round_trip_and_errors(tmp_path, images):
    vq = MageVQModel(tiny_config().vq_config).eval()
    vq.save_pretrained(tmp_path)
    loaded = MageVQModel.from_pretrained(tmp_path).eval()
    ids = vq.encode(images).token_ids
    assert ids.shape == (2, 16, 16) and torch.equal(ids, loaded.encode(images).token_ids)
    assert torch.equal(vq.decode(ids), loaded.decode(ids))
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 15\]"):
        vq.decode(torch.full((1, 16, 16), 16))
    with pytest.raises(ValueError, match="token_ids must have shape"):
        vq.decode(ids.flatten(1))
    with pytest.raises(TypeError, match="integer"):
        vq.decode(ids.float())
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        vq.encode(images[:, :1])
    with pytest.raises(ValueError, match="multiples of 16 pixels"):
        vq.encode(images[:, :, :250, :250])
    with pytest.raises(TypeError, match="MageImageProcessor"):
        vq.encode(images.numpy())


def test_bad_ids_and_inputs_are_refused(images):
    model = MageForMaskedImageModeling(tiny_config()).eval()
    ids = model.mage.tokenize(images)
    too_big = ids.clone()
    too_big[1, 7] = 16  # one past the codebook
    with pytest.raises(ValueError, match=r"codebook ids in \[0, 15\] or the mask id 1016; got 1 out-of-range values such as 16"):
        model(input_ids=too_big)
    negative = ids.clone()
    negative[0, 0] = -1
    with pytest.raises(ValueError, match="such as -1"):
        model.mage(input_ids=negative)
    with pytest.raises(ValueError, match="codebook ids"):
        model.mage(input_ids=torch.full_like(ids, model.config.fake_class_label))
    with pytest.raises(ValueError, match=r"shape \(batch, 256\)"):
        model.mage(input_ids=ids[:, :100])
    with pytest.raises(TypeError, match="integer"):
        model.mage(input_ids=ids.float())
    with pytest.raises(ValueError, match="exactly one"):
        model.mage(pixel_values=images, input_ids=ids)
    # Other image sizes tokenize (the VQGAN is convolutional) but do not fit the 16x16 position table: at 224 the
    # 14x14 grid would have been paired with the table's first 196 rows, with no error.
    for size in (224, 240, 288):
        with pytest.raises(ValueError, match=rf"takes 256x256 images .* got {size}x{size}.*size=256, crop_size=256"):
            model.mage(pixel_values=images[:, :, :size, :size] if size < 256 else torch.rand(1, 3, size, size))
    with pytest.raises(ValueError, match="got 256x240"):
        MageForImageClassification(tiny_config(use_mean_pooling=True, num_labels=2))(pixel_values=images[..., :240])
    with pytest.raises(ValueError, match="labels|codebook ids"):
        model(input_ids=ids, token_mask=ids > 5, labels=ids.masked_fill(ids > 5, model.config.mask_token_id))
    with pytest.raises(ValueError, match="drop only masked tokens"):
        model(input_ids=ids, token_mask=ids > 100, token_drop_mask=torch.ones_like(ids, dtype=torch.bool))
    with pytest.raises(ValueError, match="same number of tokens"):
        drop = torch.zeros_like(ids, dtype=torch.bool)
        drop[0, :3] = True
        model(input_ids=ids, token_mask=torch.ones_like(drop), token_drop_mask=drop)
    with pytest.raises(ValueError, match="noise must have shape"):
        model(input_ids=ids, noise=torch.rand(2, 10))
    with pytest.raises(ValueError, match="use_mean_pooling=False"):
        MageForMaskedImageModeling(tiny_config(use_mean_pooling=True))


# ---------------------------------------------------------------------------------------------- Auto* and folders


@pytest.fixture
def folders(tmp_path):
    """A pre-training-style folder and a classifier folder, each with its processor config, like `mage-hf convert`."""
    mim = MageForMaskedImageModeling(tiny_config()).eval()
    mim.save_pretrained(tmp_path / "mim")
    clf = MageForImageClassification(tiny_config(use_mean_pooling=True, id2label={0: "cat", 1: "dog", 2: "emu"})).eval()
    clf.save_pretrained(tmp_path / "clf")
    for name in ("mim", "clf"):
        MageImageProcessor().save_pretrained(tmp_path / name)
    return tmp_path


def test_auto_classes(folders, images):
    assert type(AutoConfig.from_pretrained(folders / "mim")) is MageConfig
    encoder = AutoModel.from_pretrained(folders / "mim")  # the decoder and MLM head are left out
    assert type(encoder) is MageModel
    mim = AutoModelForMaskedImageModeling.from_pretrained(folders / "mim")
    assert type(mim) is MageForMaskedImageModeling
    assert torch.equal(encoder.embeddings.word_embeddings.weight, mim.mage.embeddings.word_embeddings.weight)
    clf = AutoModelForImageClassification.from_pretrained(folders / "clf")
    assert type(clf) is MageForImageClassification and clf.config.id2label[2] == "emu"
    assert type(AutoImageProcessor.from_pretrained(folders / "mim")) is MageImageProcessor
    with torch.no_grad():
        assert torch.allclose(encoder(pixel_values=images).last_hidden_state,
                              mim.mage(pixel_values=images).last_hidden_state)


def test_offline_loading_in_a_fresh_process(folders):
    code = (
        "import mage_hf, transformers, torch;"
        f"m = transformers.AutoModelForImageClassification.from_pretrained(r'{folders / 'clf'}');"
        "print(type(m).__name__, m.config.id2label[1])"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(folders / "empty-cache"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["MageForImageClassification", "dog"]


def test_transformers_pipelines(folders):
    from PIL import Image
    from transformers import pipeline

    photo = Image.fromarray((torch.rand(300, 200, 3) * 255).byte().numpy())
    extractor = pipeline("image-feature-extraction", model=str(folders / "mim"))
    features = torch.tensor(extractor(photo, return_tensors=False))
    assert features.shape == (1, 257, 32)
    pooled = extractor(photo, return_tensors=True, pool=True)
    assert pooled.shape == (1, 32)
    model = MageModel.from_pretrained(folders / "mim").eval()
    inputs = MageImageProcessor()(photo, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(pooled, model(**inputs).pooler_output, atol=1e-6)

    classifier = pipeline("image-classification", model=str(folders / "clf"))
    result = classifier(photo, top_k=3)
    assert {r["label"] for r in result} == {"cat", "dog", "emu"}
    assert abs(sum(r["score"] for r in result) - 1) < 1e-5


def test_any_image_goes_through_processor_and_model():
    """Grayscale, RGBA, palette and odd-sized images are made RGB 256x256 by the processor and then encoded."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    rgb = Image.fromarray((torch.rand(301, 97, 3, generator=rng) * 255).byte().numpy())
    images = [rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), rgb, rgb.resize((1000, 17))]
    model = MageModel(tiny_config()).eval()
    inputs = MageImageProcessor()(images, return_tensors="pt")
    assert inputs.pixel_values.shape == (5, 3, 256, 256)
    assert 0 <= inputs.pixel_values.min() and inputs.pixel_values.max() <= 1
    with torch.no_grad():
        out = model(**inputs)
    assert out.last_hidden_state.shape == (5, 257, 32) and torch.isfinite(out.last_hidden_state).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(images, dtype):
    model = MageForMaskedImageModeling(tiny_config()).eval()
    ids = model.mage.tokenize(images)
    mask = torch.rand(2, 256, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        reference = model(input_ids=ids, token_mask=mask)
        half = model.to(dtype)(input_ids=ids, token_mask=mask)
    assert half.logits.dtype == dtype and half.loss.dtype == torch.float32
    assert (half.logits.float() - reference.logits).abs().max() < 0.1
    assert abs(half.loss.item() - reference.loss.item()) < 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loading_in_half_precision_keeps_the_tokenizer_in_float32(images, tmp_path, dtype):
    """`from_pretrained(dtype=...)` casts the transformer only: the tokenizer keeps its float32 weights exactly
    (cast and upcast later, a float16 codebook was off by ~1e-3 and the decode by up to 2e-2), and a half-precision
    model takes half-precision pixels."""
    model = MageForMaskedImageModeling(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    for cls, vq_of, transformer_of in (
        (MageForMaskedImageModeling, lambda m: m.mage.vq_model, lambda m: m.decoder),
        (MageModel, lambda m: m.vq_model, lambda m: m.encoder),
    ):
        half = cls.from_pretrained(tmp_path, dtype=dtype).eval()
        assert next(transformer_of(half).parameters()).dtype == dtype
        vq = vq_of(half)
        assert all(p.dtype == torch.float32 for p in vq.parameters())
        reference = model.mage.vq_model.state_dict()
        assert all(torch.equal(value, reference[name]) for name, value in vq.state_dict().items())
        with torch.no_grad():
            ids = (half.mage if cls is MageForMaskedImageModeling else half).tokenize(images.to(dtype))
        assert torch.equal(ids, model.mage.tokenize(images.to(dtype).float()))


def test_the_frozen_tokenizer_ignores_autocast(images):
    """Under a mixed-precision region (train_classifier.py calls the model on pixels inside `accelerator.autocast()`)
    the tokenizer gives the ids it gives outside one: before, its convolutions and nearest-code search ran in
    bfloat16 and most ids of this model changed."""
    model = MageForMaskedImageModeling(tiny_config()).eval()
    with torch.no_grad():
        reference = model.mage.tokenize(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model.mage.tokenize(images), reference)
            decoded = model.mage.vq_model.decode(reference.view(2, 16, 16))
        assert decoded.dtype == torch.float32
        assert torch.equal(decoded, model.mage.vq_model.decode(reference.view(2, 16, 16)))
        # The nearest-code search alone, on half-precision latents, is done in float32 too.
        latents = model.mage.vq_model.encode(images).latents
        half = latents.to(torch.bfloat16)
        assert torch.equal(model.mage.vq_model.quantize(half), model.mage.vq_model.quantize(half.float()))


def test_codebook_is_initialised_as_documented():
    """taming's uniform +-1/K, in the tokenizer alone and inside MAGE (transformers initialises module by module)."""
    torch.manual_seed(0)
    for codebook in (
        MageVQModel(tiny_config().vq_config).quantize.embedding.weight.detach(),
        MageModel(tiny_config()).vq_model.quantize.embedding.weight.detach(),
    ):
        bound = 1.0 / codebook.shape[0]
        assert float(codebook.abs().max()) <= bound and float(codebook.abs().max()) > 0.8 * bound
    # MAGE's own token embeddings keep N(0, 0.02).
    words = MageModel(tiny_config()).embeddings.word_embeddings.weight.detach()
    assert abs(float(words.std()) - 0.02) < 0.002


def test_forward_hooks_see_the_values_modules_returned(images):
    """Inference writes some sums and activations in place; never into an output a forward hook may have kept."""
    model = MageForMaskedImageModeling(tiny_config()).eval()
    ids = model.mage.tokenize(images)
    layer = model.mage.encoder.layers[0]
    vq_block = model.mage.vq_model.decoder.up[1].block[0]
    modules = {"attn": layer.attn, "proj": layer.attn.proj, "mlp": layer.mlp, "fc1": layer.mlp.fc1,
               "fc2": layer.mlp.fc2, "norm": model.mage.embeddings.layer_norm, "vq_block": vq_block,
               "vq_conv": vq_block.conv1}
    seen = {}

    def recorder(name):
        def hook(module, args, output):
            value = output[0] if isinstance(output, tuple) else output
            seen[name] = (args, value, value.clone())
        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    with torch.no_grad():
        model(input_ids=ids, token_mask=torch.rand(2, 256, generator=torch.Generator().manual_seed(1)) < 0.5)
        model.mage.vq_model.decode(ids.view(2, 16, 16))
    for handle in handles:
        handle.remove()
    for name, (_, value, copy) in seen.items():
        assert torch.equal(value, copy), f"{name}'s output was overwritten after its hook ran"
    with torch.no_grad():  # and what they saw is what the module computes
        args, value, _ = seen["fc1"]
        assert torch.equal(layer.mlp.fc1(*args), value)


def test_autocast_keeps_attention_scores_in_float32_and_skips_the_float32_kernels(images):
    config = tiny_config()
    config._attn_implementation = "eager"
    model = MageForMaskedImageModeling(config).eval()
    ids = model.mage.tokenize(images)
    ids[:, ::3] = config.mask_token_id
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, output_attentions=True)
        masked = model.masked_logits(ids)
    assert all(a.dtype == torch.float32 for a in out.encoder_attentions)  # the original disables autocast there
    # Under autocast the packed float32 kernels step aside, so both paths compute in the autocast dtype.
    assert out.logits.dtype == masked.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_dtype_of_ids(images, dtype):
    model = MageForMaskedImageModeling(tiny_config()).eval()
    ids = model.mage.tokenize(images)
    noise = torch.rand(2, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, noise=noise, mask_ratio=0.6)
        got = model(input_ids=ids.to(dtype), noise=noise, mask_ratio=0.6)
        assert torch.equal(got.logits, expected.logits) and torch.equal(got.loss, expected.loss)
        features = model.mage(input_ids=ids.to(dtype)).last_hidden_state
        assert torch.equal(features, model.mage(input_ids=ids).last_hidden_state)
    with pytest.raises(ValueError, match="codebook ids"):
        model(input_ids=torch.full((1, 256), 200, dtype=torch.uint8))  # 200 is no id of a 16-code model


def test_bad_token_mask_shape_and_unknown_arguments_are_refused(images):
    model = MageForMaskedImageModeling(tiny_config()).eval()
    ids = model.mage.tokenize(images)
    for shape in [(2, 1), (256,), (1, 256)]:
        with pytest.raises(ValueError, match="token_mask must have shape"):
            model(input_ids=ids, token_mask=torch.ones(shape, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_mask"):
        model.mage(input_ids=ids, token_mask=torch.ones_like(ids, dtype=torch.bool))
    with pytest.raises(TypeError, match="labelz"):
        model(input_ids=ids, labelz=ids)
    classifier = MageForImageClassification(tiny_config(num_labels=3)).eval()
    with pytest.raises(TypeError, match="lables"):
        classifier(input_ids=ids, lables=torch.tensor([0, 1]))
    # What generic callers pass to every MAGE model is still accepted.
    model.mage(input_ids=ids, generator=torch.Generator())
    classifier(input_ids=ids, class_labels=torch.tensor([0, 1]))
