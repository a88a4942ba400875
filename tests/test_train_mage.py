# Copyright 2026 The mage-hf authors. MIT licence.
"""training/train_mage.py and its helpers in mage_hf.training_utils, on a tiny model and small real datasets.

The end-to-end tests run the script in subprocesses (one process, and two processes over gloo), so that a run can
be killed with SIGKILL and resumed, and ranks are real processes."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from launching import CPU_RANKS_ENV, gloo_launch_command
from training_data import digit_images, photo_images, write_datasets_folder, write_imagefolder

from mage_hf import MageConfig, MageForMaskedImageModeling, MageImageProcessor, MageVQConfig, MageVQModel
from mage_hf.training_utils import (
    RandomResizedCropFlip,
    ResumableState,
    ShardedBatchSampler,
    center_crop_resize,
    cosine_lr_with_warmup,
    info_nce_loss,
    keyed_generator,
    load_image_dataset,
    param_groups_weight_decay,
    prune_checkpoints,
    resolve_checkpoint,
    to_rgb,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_mage.py"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, decoder_hidden_size=32,
            decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny tokenizer at 32 px (4x down-sampling: an 8x8 grid), tiny model configs, and the digits (labelled)
    and photos (unlabelled) as datasets folder and imagefolder."""
    root = tmp_path_factory.mktemp("train_mage")
    torch.manual_seed(0)
    vq = MageVQModel(MageVQConfig(base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=1, num_embeddings=32,
                                  embed_dim=16, resolution=32))
    vq.save_pretrained(root / "vq")
    (root / "tiny.json").write_text(json.dumps(TINY))
    # No dropout: runs that should agree then differ only by float rounding.
    (root / "tiny_nodrop.json").write_text(json.dumps({**TINY, "hidden_dropout_prob": 0.0,
                                                       "attention_probs_dropout_prob": 0.0}))
    images, labels = digit_images(32, per_class=6)
    write_datasets_folder(root / "digits", images, labels)
    write_imagefolder(root / "digits_folder", images, labels)
    write_imagefolder(root / "photos", photo_images(48))
    return root


def run_script(args, processes: int = 1, env: dict | None = None, wait: bool = True, timeout: float = 600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}  # 1 thread: 2 cores, 2 ranks
    if processes == 1:
        cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    else:
        env.update(CPU_RANKS_ENV)
        cmd = gloo_launch_command(SCRIPT, args, processes)
    # A session of its own, so that the launcher and every rank it starts can be killed together: a timed-out or
    # failed test must not leave gloo ranks behind.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if not wait else subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    if not wait:
        return proc
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- helpers (in-process)


def test_random_resized_crop_flip_is_a_function_of_its_generator():
    image = photo_images()[0]  # 512x512 astronaut
    transform = RandomResizedCropFlip(32)
    a = transform(image, torch.Generator().manual_seed(3))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, transform(image, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, transform(image, torch.Generator().manual_seed(4)))
    # The boxes follow RandomResizedCrop: area fraction in scale, aspect ratio in ratio, inside the image.
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, w, h = transform.crop_box(640, 480, g)
        assert 0 <= left and left + w <= 640 and 0 <= top and top + h <= 480
        assert 0.2 * 0.97 <= w * h / (640 * 480) <= 1.0 and 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    # Whole-image crops of a square image: the image itself, or its mirror about half of the time.
    square = photo_images(32)[1]
    plain = center_crop_resize(square, 32)
    whole = RandomResizedCropFlip(32, scale=(1, 1), ratio=(1, 1))
    views = [whole(square, g) for _ in range(300)]
    flipped = sum(torch.equal(v, plain.flip(-1)) for v in views)
    assert all(torch.equal(v, plain) or torch.equal(v, plain.flip(-1)) for v in views) and 110 < flipped < 190
    assert torch.equal(RandomResizedCropFlip(32, scale=(1, 1), ratio=(1, 1), hflip=False)(square, g), plain)


def test_center_crop_resize_matches_the_image_processor():
    image = photo_images()[1].resize((90, 60))  # landscape, non-square
    processor = MageImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = processor(image, return_tensors="pt").pixel_values[0]
    assert torch.allclose(center_crop_resize(image, 32), expected, atol=1 / 255 + 1e-6)


def test_to_rgb_composites_transparency():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = to_rgb(rgba, background=(10, 20, 30))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (10, 20, 30) and out.getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_load_image_dataset_layouts_and_errors(work):
    saved, image_col, class_col = load_image_dataset(dataset_name=str(work / "digits"))
    assert (image_col, class_col, len(saved)) == ("image", "label", 60)
    folder, image_col, class_col = load_image_dataset(train_data_dir=str(work / "digits_folder"), max_samples=7,
                                                      cache_dir=str(work / "hf_cache"))
    assert (image_col, class_col, len(folder)) == ("image", "label", 7)
    assert folder.features["label"].num_classes == 10
    photos, _, class_col = load_image_dataset(train_data_dir=str(work / "photos"), cache_dir=str(work / "hf_cache"))
    assert class_col is None and len(photos) == 16  # one folder: no labels
    stream, _, _ = load_image_dataset(dataset_name=str(work / "digits"), streaming=True, max_samples=5)
    assert len(list(stream)) == 5
    with pytest.raises(ValueError, match=r"--image_column='pixels' is not a column.*\['image', 'label'\]"):
        load_image_dataset(dataset_name=str(work / "digits"), image_column="pixels")
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_image_dataset(train_data_dir=str(work / "missing"))


def test_param_groups_skip_biases_and_norms_like_the_original():
    model = MageForMaskedImageModeling(MageConfig(vq_config=MageVQConfig(
        base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=1, num_embeddings=32, embed_dim=16,
        resolution=32), **TINY))
    decay, no_decay = param_groups_weight_decay(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "mage.embeddings.word_embeddings.weight" in decayed and "decoder.embed.weight" in decayed
    # MAGE (timm's add_weight_decay without a skip list) decays its learned position embeddings too.
    assert {"mage.embeddings.position_embeddings.weight", "decoder.position_embeddings"} <= decayed
    assert {"mlm_head.bias", "mage.embeddings.layer_norm.weight", "decoder.embed.bias"} <= skipped
    assert not any(n.startswith("mage.vq_model") for n in decayed | skipped)  # the frozen tokenizer is left out
    assert len(decayed) + len(skipped) == sum(p.requires_grad for p in model.parameters())
    decay, no_decay = param_groups_weight_decay(model, 0.05, skip_names=("position_embeddings",))
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"mage.embeddings.position_embeddings.weight", "decoder.position_embeddings"} <= skipped


def test_cosine_lr_with_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_lr_with_warmup(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(15):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    assert lrs[9] == pytest.approx(0.2 + 1.8 * 0.5)  # half-way through the cosine
    assert lrs[14] == pytest.approx(0.2) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


# A stand-in for training steps: each allocates, writes and frees 80 MB in blocks of 40 MB, above the largest size
# (32 MiB) that glibc ever serves from its heap by default.
_STEPS_SCRIPT = """
import resource, sys, torch
applied = False
if sys.argv[1] == "keep":
    from mage_hf.training_utils import keep_freed_memory
    applied = keep_freed_memory()
def step():
    blocks = [torch.ones(10 * 1024 * 1024) for _ in range(2)]
    return sum(float(b[-1]) for b in blocks)
for _ in range(4):  # the heap reaches its steady layout within a few steps (2-3 here)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_lets_later_steps_reuse_the_pages_of_earlier_ones():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _STEPS_SCRIPT, mode], capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        return applied == "True", int(count)

    pages = 6 * 80 * 1024 * 1024 // 4096  # written by the six timed steps
    applied, default = faults("default")
    assert not applied and default > pages // 2  # glibc maps each block afresh and unmaps it when freed
    applied, kept = faults("keep")
    assert applied and kept < pages // 10  # the pages of the earlier steps are reused (0 faults seen)


def test_sharded_batch_sampler_shards_and_resumes():
    one = ShardedBatchSampler(50, 8, seed=1, total=20)
    ranks = [ShardedBatchSampler(50, 4, num_processes=2, process_index=r, seed=1, total=20) for r in range(2)]
    assert one.batches_per_epoch == 6  # 50 // 8, the incomplete batch dropped
    for k, (full, a, b) in enumerate(zip(one, *ranks)):
        assert not set(a) & set(b) and sorted(a + b) == sorted(full)  # disjoint shards of the same global batch
        assert all(epoch == k // 6 for epoch, _ in full)
    epoch0 = [i for batch in list(ShardedBatchSampler(50, 8, seed=1, total=6)) for _, i in batch]
    assert len(set(epoch0)) == 48  # no repeats within an epoch
    assert list(ShardedBatchSampler(50, 8, seed=1, start=13, total=20)) == list(one)[13:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatchSampler(5, 4, num_processes=2)


def test_info_nce_loss_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    loss = info_nce_loss(z1, z2, temperature=0.2, gather=False)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    terms = []
    for i in range(10):
        positive = (i + 5) % 10
        scores = torch.stack([z[i] @ z[j] / 0.2 for j in range(10) if j != i])
        terms.append(-(z[i] @ z[positive] / 0.2 - torch.logsumexp(scores, 0)))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    # Matching views give a lower loss than unrelated ones.
    assert info_nce_loss(z1, z1 + 0.01 * z2, gather=False) < loss


def test_resumable_state_and_checkpoint_folders(tmp_path):
    gen = torch.Generator().manual_seed(5)
    state = ResumableState({"g": gen})
    state.global_step = 7
    saved = state.state_dict()
    expected = torch.rand(3, generator=gen)
    other = ResumableState({"g": torch.Generator().manual_seed(9)})
    other.load_state_dict(saved)
    assert other.global_step == 7 and torch.equal(torch.rand(3, generator=other.generators["g"]), expected)
    with pytest.raises(ValueError, match="same number of processes"):
        ResumableState({"g": torch.Generator()}, num_processes=2).load_state_dict(saved)
    for step in (2, 10, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-12.tmp").mkdir()  # an interrupted save is never picked up
    assert resolve_checkpoint("latest", str(tmp_path)).endswith("checkpoint-10")
    assert prune_checkpoints(str(tmp_path), 2) == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-4")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-12.tmp", "checkpoint-6"]
    assert resolve_checkpoint("latest", str(tmp_path / "empty")) is None
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(str(tmp_path / "nope"), str(tmp_path))


def test_bad_arguments_are_refused(work, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from train_mage import parse_args
    finally:
        sys.path.remove(str(SCRIPT.parent))
    base = ["--dataset_name", str(work / "digits"), "--output_dir", "x"]
    for extra, message in (
        ([], "exactly one of --pretrained_model"),
        (["--model_size", "tiny"], "needs its tokenizer"),
        (["--model_size", "tiny", "--vq_model", "v", "--streaming"], "--streaming needs --max_train_steps"),
        (["--model_size", "tiny", "--vq_model", "v", "--precompute_tokens", "--precompute_views", "1",
          "--contrastive_weight", "0.1"], "--precompute_views must be >= 2"),
        # Values that would run to the end doing nothing, or fail deep inside the loop.
        (["--model_size", "tiny", "--vq_model", "v", "--gradient_accumulation_steps", "0"],
         "--gradient_accumulation_steps must be >= 1"),
        (["--model_size", "tiny", "--vq_model", "v", "--train_batch_size", "0"], "--train_batch_size must be >= 1"),
        (["--model_size", "tiny", "--vq_model", "v", "--checkpointing_steps", "0"], "--checkpointing_steps must be"),
        (["--model_size", "tiny", "--vq_model", "v", "--num_validation_images", "0"], "--num_validation_images must"),
        (["--model_size", "tiny", "--vq_model", "v", "--contrastive_weight", "-1"],
         "--contrastive_weight must be >= 0"),
        (["--model_size", "tiny", "--vq_model", "v", "--precompute_tokens", "--precompute_views", "0"],
         "--precompute_views must be >= 1"),
        (["--model_size", "tiny", "--vq_model", "v", "--learning_rate", "0"], "--learning_rate must be > 0"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            parse_args(base + extra)
        assert message in capsys.readouterr().err, extra


# ------------------------------------------------------------------------------------- the script, end to end


def test_resume_after_sigkill_is_exact_and_the_folder_loads(work, tmp_path):
    """One fixed batch of 8 digits for 24 steps (so the loss must go down), checkpoints every 4 steps, kept 2.
    A second run is killed with SIGKILL after its checkpoint at step 8 and resumed with `latest`: it must end with
    bit-identical weights and the same loss at every step."""
    args = ["--dataset_name", work / "digits", "--config", work / "tiny.json", "--vq_model", work / "vq",
            "--max_train_samples", 8, "--train_batch_size", 8, "--min_crop_scale", 1.0, "--no_hflip",
            "--max_train_steps", 24, "--learning_rate", 3e-2, "--lr_warmup_steps", 3, "--checkpointing_steps", 4,
            "--checkpoints_total_limit", 2, "--validation_steps", 12, "--seed", 3]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_script([*args, "--output_dir", full, "--report_to", "tensorboard"])

    proc = run_script([*args, "--output_dir", killed, "--report_to", "none"], wait=False)
    deadline = time.time() + 300
    try:
        while not (killed / "checkpoint-8").is_dir():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "no checkpoint-8 after 300 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # SIGKILL, as a crash would; also on a failed wait
        proc.wait()
    assert not (killed / "model.safetensors").exists()  # it really died mid-run
    run_script([*args, "--output_dir", killed, "--report_to", "none", "--resume_from_checkpoint", "latest"])

    a, b = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(full)] == [m["loss"] for m in metrics(killed)]

    # Checkpoints pruned to the limit; the last one holds the final weights.
    kept = sorted(p.name for p in full.iterdir() if p.name.startswith("checkpoint"))
    assert kept == ["checkpoint-20", "checkpoint-24"]
    last = load_file(str(full / "checkpoint-24" / "model.safetensors"))
    assert all(torch.equal(last[k], a[k]) for k in a)

    # The loss went down on the fixed batch (measured: 3.46 -> ~3.04; chance is ln 32 = 3.47). The random tokenizer's
    # codebook starts uniform in +-1/32, so the digits' tokens spread over most of the 32 codes; lr 1e-2, enough
    # while the codebook wrongly started N(0, 1) and the tokens took a few codes, gets only to ~3.2 in 24 steps.
    losses = [m["loss"] for m in metrics(full)]
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3, losses
    logged = metrics(full)[-1]
    for key in ("lr", "mask_ratio", "masked_token_accuracy", "images_per_second"):
        assert key in logged
    assert list((full / "logs").rglob("events.out.tfevents*"))
    assert (full / "validation" / "reconstruction-0000012.png").is_file()

    # The folder loads and fills masked tokens (better than chance on its training images).
    model = MageForMaskedImageModeling.from_pretrained(full).eval()
    processor = MageImageProcessor.from_pretrained(full)
    from datasets import load_from_disk

    images = [row["image"] for row in load_from_disk(str(work / "digits")).select(range(8))]
    pixels = processor(images, return_tensors="pt").pixel_values
    assert pixels.shape == (8, 3, 32, 32)
    ids = model.mage.tokenize(pixels)
    masked = ids.clone()
    masked[:, ::2] = model.config.mask_token_id
    with torch.no_grad():
        predicted = model(input_ids=masked).logits.argmax(-1)
    accuracy = (predicted == ids)[:, ::2].float().mean().item()
    assert accuracy > 2 / 32, accuracy
    pipeline = pytest.importorskip("mage_hf.pipeline_mage")
    pipe = pipeline.MageGenerationPipeline.from_pretrained(str(full))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(num_images=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (2, 3, 32, 32)
    assert (full / "validation" / "samples-0000012.png").is_file()


def test_two_processes_match_one_process_mage_c_class_conditional_precomputed(work, tmp_path):
    """MAGE-C (negatives gathered across ranks) + class-conditional + precomputed tokens, with one process and
    with two gloo processes at the same global batch. Masks, views and label dropout are keyed by the position
    in the global data stream, not by rank, and dropout is off, so the two runs compute the same thing: they may
    differ only by float rounding (DDP averages two half-batch gradients instead of taking one batch mean).
    The script itself asserts after every step that both ranks hold bit-identical weights (--debug_check_sync)."""
    args = ["--dataset_name", work / "digits", "--config", work / "tiny_nodrop.json", "--vq_model", work / "vq",
            "--max_train_steps", 6, "--learning_rate", 1e-3, "--lr_warmup_steps", 1, "--checkpointing_steps", 6,
            "--validation_steps", 0, "--report_to", "none", "--debug_check_sync", "--class_column", "label",
            "--class_dropout_prob", 0.3, "--contrastive_weight", 0.5, "--contrastive_projection_dim", 16,
            "--precompute_tokens", "--precompute_views", 3]
    run_script([*args, "--train_batch_size", 8, "--output_dir", tmp_path / "one"])
    run_script([*args, "--train_batch_size", 4, "--output_dir", tmp_path / "two"], processes=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        assert len(b["indices"]) == 8 and sorted(a["indices"]) == sorted(b["indices"])  # same global batches
        assert a["contrastive_loss"] > 0
        # float32 rounding: observed differences up to 1e-6 on losses of ~3-5.
        assert abs(a["loss"] - b["loss"]) < 2e-5 and abs(a["contrastive_loss"] - b["contrastive_loss"]) < 2e-5
    # Ranks trained on disjoint halves: the first four indices are rank 0's, as the sampler assigns them.
    sampler0 = ShardedBatchSampler(60, 4, 2, 0, seed=0, total=6)
    assert [sorted(m["indices"][:4]) for m in two] == [sorted(i for _, i in b) for b in sampler0]

    model = MageForMaskedImageModeling.from_pretrained(tmp_path / "two")
    assert model.config.num_classes == 10 and model.config.contrastive_projection_dim == 16
    assert model.contrastive_head is not None
    # The ClassLabel's names are saved with the model (the digits' names are "0".."9").
    assert model.config.id2label == {i: str(i) for i in range(10)} and model.config.label2id["7"] == 7

    # The cached tokens are the tokenizer's ids (channels-last, as the training scripts run it) of the augmented views
    # the script describes.
    import datasets

    cache = list((tmp_path / "one" / "token_cache").glob("*.arrow"))
    assert len(cache) == 1
    tokens = datasets.Dataset.from_file(str(cache[0])).with_format("torch")
    assert len(tokens) == 60 and tokens[0]["mage_tokens"].shape == (3, 64)  # 3 views of an 8x8 grid
    raw = datasets.load_from_disk(str(work / "digits"))
    transform = RandomResizedCropFlip(32)
    for index in (0, 17, 59):
        for view in range(3):
            pixels = transform(raw[index]["image"], keyed_generator(0, 2, index, view))
            expected = model.mage.tokenize(pixels[None], channels_last=True)[0]
            assert torch.equal(tokens[index]["mage_tokens"][view].long(), expected)
    assert not torch.equal(tokens[0]["mage_tokens"][0], tokens[0]["mage_tokens"][1])  # the views differ


def test_push_to_hub_offline_fails_before_anything_else(work, tmp_path):
    """The Hub check comes first: with a dataset path that does not exist, the error is still the Hub one."""
    out = tmp_path / "out"
    start = time.time()
    proc = run_script(["--train_data_dir", tmp_path / "no_such_dataset", "--model_size", "tiny",
                       "--vq_model", work / "vq", "--output_dir", out, "--push_to_hub", "--hub_model_id", "me/mage"],
                      wait=False)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "--push_to_hub was given but HF_HUB_OFFLINE is set" in stderr, stderr[-2000:]
    assert "no_such_dataset" not in stderr and not out.exists()
    assert time.time() - start < 120


@pytest.mark.slow
def test_finetune_converted_unconditional_checkpoint_into_class_conditional(converted, work, tmp_path):
    """The converted golden (unconditional, 256 px) checkpoint, fine-tuned with labels: num_classes comes from the
    dataset's ClassLabel and the class slots already exist, so nothing is newly initialised."""
    out = tmp_path / "cond"
    run_script(["--pretrained_model", converted["pretrain"], "--dataset_name", work / "digits", "--class_column",
                "label", "--max_train_steps", 2, "--train_batch_size", 2, "--checkpointing_steps", 2,
                "--validation_steps", 2, "--num_validation_images", 2, "--report_to", "none", "--output_dir", out])
    model, info = MageForMaskedImageModeling.from_pretrained(out, output_loading_info=True)
    assert model.config.num_classes == 10 and not info["missing_keys"]
    before = MageForMaskedImageModeling.from_pretrained(converted["pretrain"])
    rows = model.config.class_token_ids(torch.arange(10))
    old, new = before.mage.embeddings.word_embeddings.weight, model.mage.embeddings.word_embeddings.weight
    assert not torch.equal(old[rows], new[rows])  # the class slots were trained
    assert torch.equal(model.mage.vq_model.quantize.embedding.weight, before.mage.vq_model.quantize.embedding.weight)
    assert all(math.isfinite(m["loss"]) for m in metrics(out))


@pytest.mark.slow
def test_streaming_imagefolder_with_accumulation_resumes_exactly(work, tmp_path):
    """Streaming an imagefolder, two processes, gradient accumulation 2: resuming from a checkpoint copy ends with
    the same weights as the uninterrupted run."""
    import shutil

    args = ["--train_data_dir", work / "photos", "--streaming", "--shuffle_buffer_size", 8, "--config",
            work / "tiny.json", "--vq_model", work / "vq", "--max_train_steps", 5, "--train_batch_size", 2,
            "--gradient_accumulation_steps", 2, "--checkpointing_steps", 2, "--validation_steps", 0,
            "--report_to", "none", "--debug_check_sync"]
    run_script([*args, "--output_dir", tmp_path / "full"], processes=2)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run_script([*args, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", "latest"], processes=2)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(tmp_path / "full")][2:] == [m["loss"] for m in metrics(tmp_path / "resumed")]
