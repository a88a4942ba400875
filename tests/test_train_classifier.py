# Copyright 2026 The mage-hf authors. MIT licence.
"""Tests of `training/train_classifier.py` (linear probe and fine-tuning) and `mage_hf.classifier_training`, on
scikit-learn's handwritten digits."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mage_hf import MageConfig, MageForImageClassification, MageForMaskedImageModeling, MageVQConfig
from mage_hf.classifier_training import (
    LARS,
    LinearProbeHead,
    fold_batchnorm_into_linear,
    layer_decay_param_groups,
    mixup_cutmix,
    smooth_one_hot,
    soft_target_cross_entropy,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_classifier
from launching import CPU_RANKS_ENV, gloo_launch_command
from training_data import digit_images, write_datasets_folder, write_imagefolder

RES = 16


# Each script's `main` builds an `Accelerator`, whose state is a process-wide singleton (see conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_mage_config(**kwargs) -> MageConfig:
    vq = MageVQConfig(
        base_channels=16,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        num_embeddings=16,
        embed_dim=8,
        norm_num_groups=8,
        resolution=RES,
    )
    defaults = dict(
        vq_config=vq,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )
    defaults.update(kwargs)
    return MageConfig(**defaults)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    images, labels = digit_images(RES, per_class=12)
    root = tmp_path_factory.mktemp("digits")
    return {
        "datasets": write_datasets_folder(root / "saved", images, labels),
        "imagefolder": write_imagefolder(root / "folder", images, labels),
    }


@pytest.fixture(scope="module")
def pretrain_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mage-pretrain")
    MageForMaskedImageModeling(tiny_mage_config()).save_pretrained(folder)
    return folder


def run(model: Path, data: Path, output_dir: Path, *extra: str, data_flag: str = "--dataset_name") -> dict:
    argv = [
        "--model_name_or_path",
        str(model),
        data_flag,
        str(data),
        "--output_dir",
        str(output_dir),
        "--report_to",
        "none",
        "--train_batch_size",
        "16",
        "--eval_batch_size",
        "32",
        *extra,
    ]
    return train_classifier.main(train_classifier.parse_args(argv))


# ------------------------------------------------------------------------------------------------ library pieces


def test_folded_batchnorm_head_gives_the_same_logits():
    torch.manual_seed(0)
    head = LinearProbeHead(12, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head.linear.weight.normal_()
        head.linear.bias.normal_()
    head.train()
    for _ in range(5):  # running statistics away from (0, 1)
        head(torch.randn(32, 12) * 3.0 + 2.0)
    head.eval()
    features = torch.randn(16, 12) * 3.0 + 2.0
    folded = head.folded()
    assert isinstance(folded, nn.Linear)
    torch.testing.assert_close(folded(features), head(features), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(head.linear(features), head(features))  # the BatchNorm does change the logits

    affine = nn.BatchNorm1d(12, eps=1e-3)
    with torch.no_grad():
        affine.weight.uniform_(0.5, 2.0)
        affine.bias.normal_()
        affine.running_mean.normal_()
        affine.running_var.uniform_(0.5, 3.0)
    affine.eval()
    torch.testing.assert_close(
        fold_batchnorm_into_linear(affine, head.linear)(features), head.linear(affine(features)), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="running statistics"):
        fold_batchnorm_into_linear(nn.BatchNorm1d(12, track_running_stats=False), head.linear)


def test_probe_head_init():
    head = LinearProbeHead(64, 10, generator=torch.Generator().manual_seed(0))
    assert not head.norm.affine and head.norm.eps == 1e-6
    assert head.linear.bias.abs().sum() == 0 and head.linear.weight.abs().max() <= 0.02
    assert 0.005 < head.linear.weight.std() < 0.012


def test_lars_step_matches_its_definition():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3))
    bias = nn.Parameter(torch.randn(4))
    grads = (torch.randn(4, 3), torch.randn(4))
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    opt = LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    for _ in range(2):
        weight.grad, bias.grad = grads[0].clone(), grads[1].clone()
        opt.step()
    # By hand: weight decay and the trust ratio for the matrix only; heavy-ball momentum for both.
    w, b, mu_w, mu_b = w0, b0, torch.zeros(4, 3), torch.zeros(4)
    for _ in range(2):
        update = grads[0] + 0.1 * w
        update = update * (0.01 * w.norm() / update.norm())
        mu_w = 0.9 * mu_w + update
        w = w - 0.5 * mu_w
        mu_b = 0.9 * mu_b + grads[1]
        b = b - 0.5 * mu_b
    torch.testing.assert_close(weight.detach(), w)
    torch.testing.assert_close(bias.detach(), b)


def test_lars_reach_bounds_how_far_the_head_can_move():
    """`lars_reach` is the bound behind train_classifier.py's warning. With a constant gradient (momentum builds up
    fully, the worst case) LARS's weight moves by nearly, but never more than, `exp(reach) - 1` times its norm."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(9, 192) * 0.01)
    grad = torch.randn(9, 192)
    w0 = weight.detach().clone()
    lr, steps = 0.0125, 330  # the emoji recipe's first probe: batch 32 at MAGE's blr 0.1
    opt = LARS([weight], lr=lr, momentum=0.9)
    for _ in range(steps):
        weight.grad = grad.clone()
        opt.step()
    reach = train_classifier.lars_reach(lr, steps, 0.9, 1e-3)
    moved = ((weight.detach() - w0).norm() / w0.norm()).item()
    assert reach == pytest.approx(0.04125)
    assert 0.5 * reach < moved <= torch.tensor(reach).exp().item() - 1.0


def test_layer_decay_groups():
    model = MageForImageClassification(tiny_mage_config(use_mean_pooling=True, num_labels=3))
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale_of = {name: g["lr_scale"] for g in groups for name in g["names"]}
    decay_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    # Two blocks: embeddings at depth 0 (0.5^3), block i at i + 1, the rest (pooler norm, head) at 3 (scale 1).
    assert scale_of["mage.embeddings.word_embeddings.weight"] == 0.125
    assert scale_of["mage.encoder.layers.0.attn.qkv.weight"] == 0.25
    assert scale_of["mage.encoder.layers.1.mlp.fc2.weight"] == 0.5
    assert scale_of["classifier.weight"] == 1.0 and scale_of["mage.pooler.layernorm.weight"] == 1.0
    assert decay_of["classifier.weight"] == 0.05 and decay_of["classifier.bias"] == 0.0
    assert decay_of["mage.encoder.layers.0.norm1.weight"] == 0.0
    assert not any(name.startswith("mage.vq_model") for name in scale_of)  # the frozen tokenizer is left out
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(scale_of) == trainable


def test_mixup_and_cutmix():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, 16, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = mixup_cutmix(
        pixels, labels, 5, torch.Generator().manual_seed(1), mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1
    )
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    base = smooth_one_hot(labels, 5, 0.1)
    # Recover lam from the targets; the images must be blended with it.
    lam = float((targets[0, 0] - base[3, 0]) / (base[0, 0] - base[3, 0]))
    assert 0 < lam < 1
    torch.testing.assert_close(mixed, lam * pixels + (1 - lam) * pixels.flip(0))
    torch.testing.assert_close(targets, lam * base + (1 - lam) * base.flip(0))

    mixed, targets = mixup_cutmix(
        pixels, labels, 5, torch.Generator().manual_seed(2), mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0
    )
    from_other = (mixed != pixels).any(dim=1)  # (B, H, W): pixels pasted from the flipped batch
    assert torch.equal(mixed[0][:, from_other[0]], pixels[3][:, from_other[0]])
    area = from_other[0].float().mean().item()
    assert targets[0, 3].item() == pytest.approx(area, abs=1e-6) and targets[0, 0].item() == pytest.approx(
        1 - area, abs=1e-6
    )

    again = mixup_cutmix(
        pixels, labels, 5, torch.Generator().manual_seed(2), mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0
    )
    assert torch.equal(again[0], mixed)  # the generator decides everything
    untouched, plain = mixup_cutmix(pixels, labels, 5, torch.Generator().manual_seed(0), prob=0.0, label_smoothing=0.1)
    assert torch.equal(untouched, pixels) and torch.equal(plain, base)
    logits = torch.randn(4, 5)
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, base), F.cross_entropy(logits, labels, label_smoothing=0.1)
    )
    with pytest.raises(ValueError, match="alpha"):
        mixup_cutmix(pixels, labels, 5, g, mixup_alpha=0.0, cutmix_alpha=0.0)


# ------------------------------------------------------------------------------------------------ the script


def _pipeline_accuracy(folder: Path, images, labels) -> float:
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(folder))
    predictions = classify(images, top_k=1)
    id2label = MageForImageClassification.from_pretrained(folder).config.id2label
    names = [id2label[label] for label in labels]
    return 100.0 * sum(p[0]["label"] == n for p, n in zip(predictions, names)) / len(labels)


def test_linear_probe_end_to_end(pretrain_folder, digits, tmp_path, caplog):
    import datasets

    out = tmp_path / "probe"
    caplog.set_level("WARNING", logger="train_classifier")
    results = run(
        pretrain_folder,
        digits["datasets"],
        out,
        "--mode",
        "linear_probe",
        "--num_train_epochs",
        "3",
        "--validation_split",
        "0.25",
        "--base_learning_rate",
        "2.0",
    )
    assert results["mode"] == "linear_probe" and results["num_validation_images"] == 30
    # lr 2.0 * 16 / 256 over 12 steps is far too little for LARS to move the head: the script says so.
    assert any("can change the head's weights by at most" in r.getMessage() for r in caplog.records)
    model = MageForImageClassification.from_pretrained(out)
    assert model.config.use_mean_pooling and model.config.num_labels == 10
    assert model.config.id2label == {i: str(i) for i in range(10)}  # the ClassLabel names
    assert json.loads((out / "eval_results.json").read_text())["top1"] == results["top1"]

    # The reported top-1 is what the saved folder scores through transformers' pipeline on the same split.
    saved = datasets.load_from_disk(str(digits["datasets"]))
    val = saved.train_test_split(test_size=0.25, seed=0, stratify_by_column="label")["test"]
    assert _pipeline_accuracy(out, list(val["image"]), list(val["label"])) == pytest.approx(results["top1"])

    # The frozen encoder came through unchanged.
    source = MageForMaskedImageModeling.from_pretrained(pretrain_folder).state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("mage.") and key in source:
            assert torch.equal(value, source[key]), key


def test_finetune_end_to_end_with_mixup_and_resume(pretrain_folder, digits, tmp_path):
    """Fine-tune from an imagefolder with mixup/cutmix, layer decay and dropout; a run interrupted at step 4 and
    resumed from `latest` ends with exactly the weights of an uninterrupted run (so every random draw, dropout's
    included, was restored); the result works with the pipeline."""
    common = [
        "--mode",
        "finetune",
        "--dropout",
        "0.1",
        "--mixup",
        "0.8",
        "--cutmix",
        "1.0",
        "--layer_decay",
        "0.75",
        "--learning_rate",
        "1e-3",
        "--validation_split",
        "0.25",
        "--warmup_epochs",
        "0.5",
        "--num_train_epochs",
        "2",
    ]
    straight = run(
        pretrain_folder,
        digits["imagefolder"],
        tmp_path / "straight",
        *common,
        "--max_train_steps",
        "8",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "3",
        data_flag="--train_data_dir",
    )
    assert sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*")) == [
        f"checkpoint-{s}" for s in (4, 6, 8)
    ]
    # An interruption after step 4: only that checkpoint exists in the new run's folder.
    shutil.copytree(tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    resumed = run(
        pretrain_folder,
        digits["imagefolder"],
        tmp_path / "resumed",
        *common,
        "--max_train_steps",
        "8",
        "--resume_from_checkpoint",
        "latest",
        data_flag="--train_data_dir",
    )
    assert straight["step"] == resumed["step"] == 8
    a = MageForImageClassification.from_pretrained(tmp_path / "straight").state_dict()
    b = MageForImageClassification.from_pretrained(tmp_path / "resumed").state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Fine-tuning did change the encoder (not just the head); the tokenizer stayed frozen.
    source = MageForMaskedImageModeling.from_pretrained(pretrain_folder).state_dict()
    assert not torch.equal(a["mage.encoder.layers.0.attn.qkv.weight"], source["mage.encoder.layers.0.attn.qkv.weight"])
    assert all(torch.equal(a[k], source[k]) for k in a if k.startswith("mage.vq_model."))
    # imagefolder class names are the folder names.
    config = MageForImageClassification.from_pretrained(tmp_path / "straight").config
    assert sorted(config.id2label.values()) == sorted(f"class_{i}" for i in range(10))
    images, _ = digit_images(RES, per_class=1)
    from transformers import pipeline

    predictions = pipeline("image-classification", model=str(tmp_path / "straight"))(images)
    assert len(predictions) == 10 and all(p[0]["label"].startswith("class_") for p in predictions)


def test_finetune_from_a_classifier_folder_and_named_split(digits, tmp_path, pretrain_folder):
    """A classifier folder (here a probe's output, 10 classes) fine-tunes with a new 10-class head, evaluated on a
    named split of a DatasetDict."""
    import datasets

    saved = datasets.load_from_disk(str(digits["datasets"]))
    split = saved.train_test_split(test_size=0.2, seed=1, stratify_by_column="label")
    dd = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    dd.save_to_disk(str(tmp_path / "dd"))
    probe = tmp_path / "probe"
    run(pretrain_folder, tmp_path / "dd", probe, "--max_train_steps", "2", "--validation_split", "validation")
    results = run(
        probe,
        tmp_path / "dd",
        tmp_path / "ft",
        "--mode",
        "finetune",
        "--max_train_steps",
        "2",
        "--validation_split",
        "validation",
        "--pooling",
        "cls",
    )
    assert results["num_validation_images"] == len(split["test"])
    assert not MageForImageClassification.from_pretrained(tmp_path / "ft").config.use_mean_pooling


def test_classifier_bad_input(pretrain_folder, digits, tmp_path):
    with pytest.raises(SystemExit):
        train_classifier.parse_args(
            ["--model_name_or_path", "x", "--output_dir", "y", "--dataset_name", "d", "--mixup", "0.8"]
        )  # mixup is for fine-tuning only
    with pytest.raises(ValueError, match="validation_split"):
        run(pretrain_folder, digits["datasets"], tmp_path / "a", "--validation_split", "1.5")
    with pytest.raises(ValueError, match="not a column"):
        run(pretrain_folder, digits["datasets"], tmp_path / "b", "--label_column", "nope")


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.slow
def test_probe_on_a_trained_mage_beats_a_random_encoder(tmp_path):
    """The whole chain on the digits: train_vqgan.py (a 4x4-token tokenizer at 16 px), train_mage.py (a small MAGE,
    600 steps), then train_classifier.py's linear probe on that encoder and on a randomly initialised encoder of the
    same shape with the same tokenizer. The probe on MAGE's features must win by a clear margin.

    Measured on this 2-core machine: 80.6% against 61.7%, and in a later run 78.9% against 60.8% top-1 on the 360
    held-out digits (chance: 10%)."""
    import datasets
    import train_mage
    import train_vqgan

    images, labels = digit_images(RES)
    full = datasets.Dataset.from_dict(
        {"image": images, "label": labels},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
        ),
    )
    split = full.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    data = tmp_path / "digits"
    # The tokenizer and MAGE only ever see the training split; the probe is scored on the held-out one.
    datasets.DatasetDict({"train": split["train"], "validation": split["test"]}).save_to_disk(str(data))

    vq = tmp_path / "vq"
    train_vqgan.main(
        train_vqgan.parse_args(
            [
                "--dataset_name",
                str(data),
                "--output_dir",
                str(vq),
                "--resolution",
                str(RES),
                "--channel_multiplier",
                "1",
                "1",
                "1",
                "--base_channels",
                "16",
                "--norm_num_groups",
                "8",
                "--num_res_blocks",
                "1",
                "--num_embeddings",
                "64",
                "--embed_dim",
                "8",
                "--num_validation_images",
                "32",
                "--train_batch_size",
                "32",
                "--max_train_steps",
                "300",
                "--random_crop_scale",
                "1",
                "1",
                "--no_hflip",
                "--learning_rate",
                "1e-3",
                "--dead_code_steps",
                "20",
                "--checkpointing_steps",
                "100000",
                "--image_logging_steps",
                "100000",
                "--report_to",
                "none",
            ]
        )
    )
    _reset_accelerate()

    config = tmp_path / "mage.json"
    config.write_text(
        json.dumps(
            dict(
                hidden_size=64,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=256,
                decoder_hidden_size=64,
                decoder_num_hidden_layers=2,
                decoder_num_attention_heads=4,
                decoder_intermediate_size=256,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        )
    )
    trained = tmp_path / "mage"
    train_mage.main(
        train_mage.parse_args(
            [
                "--dataset_name",
                str(data),
                "--config",
                str(config),
                "--vq_model",
                str(vq),
                "--output_dir",
                str(trained),
                "--precompute_tokens",
                "--precompute_views",
                "1",
                "--min_crop_scale",
                "1.0",
                "--no_hflip",
                "--train_batch_size",
                "128",
                "--max_train_steps",
                "600",
                "--learning_rate",
                "1.5e-3",
                "--checkpointing_steps",
                "100000",
                "--validation_steps",
                "0",
                "--report_to",
                "none",
            ]
        )
    )
    _reset_accelerate()

    # The baseline: same config and tokenizer, encoder left at its random initialisation.
    torch.manual_seed(123)
    mage = MageForMaskedImageModeling.from_pretrained(trained)
    baseline = MageForMaskedImageModeling(mage.config)
    baseline.mage.vq_model.load_state_dict(mage.mage.vq_model.state_dict())
    baseline.save_pretrained(tmp_path / "random")

    probe = [
        "--validation_split",
        "validation",
        "--random_crop_scale",
        "1",
        "1",
        "--no_hflip",
        "--train_batch_size",
        "128",
        "--learning_rate",
        "100",
        "--num_train_epochs",
        "15",
        "--checkpointing_steps",
        "100000",
    ]
    top1 = {}
    for name, folder in (("trained", trained), ("random", tmp_path / "random")):
        top1[name] = run(folder, data, tmp_path / f"probe-{name}", *probe)["top1"]
        _reset_accelerate()
    print(
        f"linear probe top-1 on held-out digits: trained MAGE {top1['trained']:.1f}%, random encoder "
        f"{top1['random']:.1f}%, margin {top1['trained'] - top1['random']:.1f} points"
    )
    assert top1["trained"] >= top1["random"] + 10.0, top1


def test_fp16_on_the_cpu_is_refused(pretrain_folder, digits, tmp_path):
    """Accelerate neither autocasts nor scales with fp16 on the CPU: the run would be float32 under an fp16 label."""
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        run(pretrain_folder, digits["datasets"], tmp_path / "fp16", "--mixed_precision", "fp16",
            "--max_train_steps", "1")


@pytest.mark.slow
def test_two_process_linear_probe_folds_the_same_head_on_every_rank(pretrain_folder, digits, tmp_path):
    """Under `accelerate launch --num_processes 2` (gloo on the CPU), DDP hands rank 0's BatchNorm statistics to both
    ranks before each step and each then updates them with its own batch; the script averages them before folding,
    and stops with an error if the ranks' classifiers differ (each evaluates its share with its own copy)."""
    import os
    import subprocess

    out = tmp_path / "probe2"
    cmd = gloo_launch_command(train_classifier.__file__, [
        "--model_name_or_path", pretrain_folder, "--dataset_name", digits["datasets"], "--output_dir", out,
        "--report_to", "none", "--mode", "linear_probe", "--train_batch_size", 8, "--max_train_steps", 4,
        "--validation_split", 0.25,
    ])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **CPU_RANKS_ENV}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks hold different classifiers" not in result.stderr
    assert json.loads((out / "eval_results.json").read_text())["step"] == 4
