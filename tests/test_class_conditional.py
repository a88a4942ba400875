# Copyright 2026 The mage-hf authors. MIT licence.
"""Class-conditional MAGE (class slots of the vocabulary) and MAGE-C's contrastive head, on the model side."""

from __future__ import annotations

import pytest
import torch
from test_modeling import tiny_config

from mage_hf import MageConfig, MageForImageClassification, MageForMaskedImageModeling, MageModel


def test_class_token_ids_keep_every_class_distinct_from_unconditional():
    config = tiny_config(num_classes=999)
    K = config.codebook_size
    labels = torch.arange(-1, 999)
    ids = config.class_token_ids(labels)
    assert ids.shape == labels.shape and ids.dtype == torch.long
    assert int(ids[0]) == config.fake_class_label == K + 76  # -1 is the fake label
    class_ids = ids[1:]
    assert len(set(class_ids.tolist())) == 999  # one id per class
    assert config.fake_class_label not in class_ids.tolist()  # and none is the unconditional one
    assert bool(((class_ids >= K) & (class_ids < K + 1000)).all())  # inside the class slots, never the mask id
    # Slot c below the fake slot, c + 1 from it on.
    assert config.class_token_ids(torch.tensor([0, 75, 76, 998])).tolist() == [K, K + 75, K + 77, K + 999]


def test_class_token_ids_reject_bad_labels():
    config = tiny_config(num_classes=10)
    with pytest.raises(ValueError, match=r"in \[0, 9\]; got 10"):
        config.class_token_ids(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="got -2"):
        config.class_token_ids(torch.tensor([-2]))
    with pytest.raises(TypeError, match="integer"):
        config.class_token_ids(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="unconditional \\(num_classes=0\\)"):
        tiny_config().class_token_ids(torch.tensor([0]))
    assert tiny_config().class_token_ids(torch.tensor([-1])).tolist() == [tiny_config().fake_class_label]
    with pytest.raises(ValueError, match="num_classes=1000"):
        tiny_config(num_classes=1000)


def test_no_labels_is_exactly_the_unconditional_sequence():
    torch.manual_seed(0)
    model = MageModel(tiny_config(num_classes=5)).eval()
    ids = torch.randint(0, 16, (3, 256))
    seq = model.build_sequence(ids)
    assert seq[:, 0].tolist() == [model.config.fake_class_label] * 3 and torch.equal(seq[:, 1:], ids)
    assert torch.equal(model.build_sequence(ids, torch.tensor([-1, -1, -1])), seq)
    assert model.build_sequence(ids, torch.tensor([0, 4, -1]))[:, 0].tolist() == [16, 16 + 4, 16 + 76]
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        model.build_sequence(ids, torch.tensor([0, 1]))


def test_class_labels_condition_the_mim_model_and_none_means_unconditional():
    torch.manual_seed(0)
    model = MageForMaskedImageModeling(tiny_config(num_classes=10)).eval()
    ids = torch.randint(0, 16, (2, 256))
    ids[:, ::3] = model.config.mask_token_id
    base = model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids, class_labels=torch.tensor([-1, -1])).logits, base)
    cond = model(input_ids=ids, class_labels=torch.tensor([3, -1])).logits
    assert not torch.allclose(cond[0], base[0])  # row 0 now sees class 3
    assert torch.equal(cond[1], base[1])  # row 1 stays unconditional; rows do not interact
    # Through the training path (drawn masks) as well.
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    out_a = model(input_ids=ids.clamp(max=15), generator=gen(), class_labels=torch.tensor([1, 2]))
    out_b = model(input_ids=ids.clamp(max=15), generator=gen(), class_labels=torch.tensor([2, 1]))
    assert torch.equal(out_a.token_mask, out_b.token_mask) and not torch.allclose(out_a.logits, out_b.logits)


def test_classifier_ignores_class_labels():
    torch.manual_seed(0)
    model = MageForImageClassification(tiny_config(num_labels=3, num_classes=4)).eval()
    ids = torch.randint(0, 16, (2, 256))
    assert torch.equal(model(input_ids=ids, class_labels=torch.tensor([0, 1])).logits, model(input_ids=ids).logits)


def test_contrastive_head_is_optional_and_saved(tmp_path):
    plain = MageForMaskedImageModeling(tiny_config())
    assert plain.contrastive_head is None and not any("contrastive" in k for k in plain.state_dict())
    ids = torch.randint(0, 16, (2, 256))
    assert plain(input_ids=ids, generator=torch.Generator().manual_seed(0)).contrastive_embeddings is None

    torch.manual_seed(0)
    model = MageForMaskedImageModeling(tiny_config(contrastive_projection_dim=24)).eval()
    out = model(input_ids=ids, generator=torch.Generator().manual_seed(0))
    assert out.contrastive_embeddings.shape == (2, 24)
    # It is the head applied to the mean of the encoder's image positions.
    expected = model.contrastive_head.projection(
        torch.relu(model.contrastive_head.dense(out.encoder_last_hidden_state[:, 1:].mean(1)))
    )
    torch.testing.assert_close(out.contrastive_embeddings, expected)
    model.save_pretrained(tmp_path)
    loaded = MageForMaskedImageModeling.from_pretrained(tmp_path).eval()
    assert loaded.config.contrastive_projection_dim == 24
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    again = loaded(input_ids=ids, generator=torch.Generator().manual_seed(0)).contrastive_embeddings
    assert torch.equal(again, out.contrastive_embeddings)


def test_unconditional_checkpoint_becomes_conditional(converted):
    """A converted (unconditional) pre-training folder loads as a class-conditional model: the class slots are
    already in its vocabulary, so nothing is missing or newly initialised."""
    plain = MageForMaskedImageModeling.from_pretrained(converted["pretrain"]).eval()
    model, info = MageForMaskedImageModeling.from_pretrained(
        converted["pretrain"], num_classes=10, output_loading_info=True
    )
    model.eval()
    assert model.config.num_classes == 10 and plain.config.num_classes == 0
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, model.config.codebook_size, (2, model.config.num_image_tokens))
    ids[:, ::2] = model.config.mask_token_id
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)  # unconditional = unchanged
    cond = model(input_ids=ids, class_labels=torch.tensor([0, 9])).logits
    assert not torch.allclose(cond, plain(input_ids=ids).logits)
    with pytest.raises(ValueError, match="num_classes=10"):
        model(input_ids=ids, class_labels=torch.tensor([0, 10]))


def test_released_defaults_unchanged():
    config = MageConfig()
    assert config.num_classes == 0 and not config.contrastive_projection_dim
