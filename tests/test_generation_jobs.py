# Copyright 2026 The mage-hf authors. MIT licence.
"""The generation jobs in `pipelines/`: multi-process, resumable sampling (`sample.py`) and FID/IS evaluation
(`evaluate_fid.py`).

Sampling runs a tiny random MAGE (32x32 images, 8x8 tokens) for real: in this process, in two processes under
`accelerate launch`, and killed with SIGKILL half-way and resumed. FID runs torch-fidelity end to end with a randomly
initialised InceptionV3 saved in the layout torch-fidelity loads (there are no real Inception weights here): the
numbers are meaningless, the plumbing is real. Those tests need torch-fidelity and torchvision, which do not work
with this project's CPU torch, so they carry the `eval` marker and run in `.venv-eval` (`make test-eval`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mage_hf import MageForMaskedImageModeling, MageGenerationPipeline, MageScheduler, MageVQConfig
from test_modeling import tiny_config
from launching import CPU_RANKS_ENV, gloo_launch_command
from training_data import photo_images

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 8
STEPS = 4


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"mage_hf_pipelines_{name}", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample = load_script("sample")
evaluate_fid = load_script("evaluate_fid")


@pytest.fixture
def fresh_accelerate_state():
    """`main` builds an `Accelerator`, whose state is a process-wide singleton: reset it so that this module's runs
    and other tests' accelerators do not see each other's settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def subprocess_env() -> dict:
    # One thread per process: two processes share this machine's two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sample_args(model: Path, output_dir: Path, batch_size: int, **overrides) -> list[str]:
    args = {"model": model, "num_images": NUM_IMAGES, "output_dir": output_dir, "batch_size": batch_size,
            "num_inference_steps": STEPS, "seed": 0, **overrides}
    return [token for key, value in args.items() for token in (f"--{key}", str(value))]


def run_sample_here(model: Path, output_dir: Path, batch_size: int, **overrides) -> dict:
    return sample.main(sample.parse_args(sample_args(model, output_dir, batch_size, **overrides)))


def png_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A pipeline folder (model_index.json, model/, scheduler/) holding a tiny random MAGE at 32x32 pixels."""
    torch.manual_seed(0)
    vq = MageVQConfig(base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=1, num_embeddings=16, embed_dim=8,
                      resolution=32)
    model = MageForMaskedImageModeling(tiny_config(vq_config=vq)).eval()
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(model.config)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference_run(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The uninterrupted single-process run (batch size 3) every other run is compared with."""
    from accelerate.state import AcceleratorState

    folder = tmp_path_factory.mktemp("samples") / "reference"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        counts = run_sample_here(tiny_pipeline_dir, folder, batch_size=3)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert counts == {"written": NUM_IMAGES, "skipped": 0}
    return folder


# ------------------------------------------------------------------------------------------------------------ sampling


def test_single_process_sampling_writes_every_image_and_its_settings(
    reference_run, tiny_pipeline_dir, fresh_accelerate_state
):
    names = sorted(p.name for p in reference_run.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(NUM_IMAGES)]
    pixels = []
    for name in names:
        with Image.open(reference_run / name) as image:
            assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
            pixels.append(np.asarray(image))
    # Each index has its own seed: no two images are the same.
    assert len({p.tobytes() for p in pixels}) == NUM_IMAGES
    settings = json.loads((reference_run / sample.SETTINGS_FILE).read_text())
    assert (settings["num_images"], settings["seed"], settings["num_inference_steps"]) == (NUM_IMAGES, 0, STEPS)
    assert settings["choice_temperature"] == 4.5  # the scheduler's default, recorded explicitly
    assert not list(reference_run.glob(f".*{sample.TEMP_SUFFIX}"))

    # Image i is the pipeline's output for keyed_generator(seed, i), in a batch of its own.
    from mage_hf.training_utils import keyed_generator

    pipe = MageGenerationPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    alone = pipe(num_images=1, num_inference_steps=STEPS, generator=[keyed_generator(0, 5)]).images[0]
    np.testing.assert_array_equal(np.asarray(alone), pixels[5])

    # A finished folder: running again writes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in reference_run.glob("*.png")}
    assert run_sample_here(tiny_pipeline_dir, reference_run, batch_size=5) == {"written": 0, "skipped": NUM_IMAGES}
    assert {p.name: p.stat().st_mtime_ns for p in reference_run.glob("*.png")} == before


def test_two_processes_write_the_same_files(reference_run, tiny_pipeline_dir, tmp_path):
    output_dir = tmp_path / "two-processes"
    args = sample_args(tiny_pipeline_dir, output_dir, batch_size=2)
    command = gloo_launch_command(REPO / "pipelines" / "sample.py", args)
    result = subprocess.run(command, env={**subprocess_env(), **CPU_RANKS_ENV}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with 2 process(es)" in result.stderr, result.stderr[-3000:]
    assert png_digests(output_dir) == png_digests(reference_run)
    assert (output_dir / sample.SETTINGS_FILE).read_text() == (reference_run / sample.SETTINGS_FILE).read_text()


def test_killed_run_resumes_without_redoing_images(reference_run, tiny_pipeline_dir, tmp_path, fresh_accelerate_state):
    output_dir = tmp_path / "killed"
    log = tmp_path / "killed.log"
    script = str(REPO / "pipelines" / "sample.py")
    command = [sys.executable, script, *sample_args(tiny_pipeline_dir, output_dir, batch_size=1)]
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, env=subprocess_env(), stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        try:
            # Kill it once two images are on disk; six more were still to come, one at a time.
            while process.poll() is None and time.monotonic() < deadline:
                if output_dir.is_dir() and len(list(output_dir.glob("*.png"))) >= 2:
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        finally:
            if process.poll() is None and time.monotonic() >= deadline:
                process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, f"the run was not killed mid-way:\n{log.read_text()[-3000:]}"

    written = {p.name: p.stat() for p in output_dir.glob("*.png")}
    assert 2 <= len(written) < NUM_IMAGES
    for name in written:  # whatever was on disk at the kill is a complete PNG
        with Image.open(output_dir / name) as image:
            image.load()
    # What a kill in the middle of a write leaves behind: a temporary file holding part of a PNG.
    missing = sorted(set(png_digests(reference_run)) - set(written))
    stale = output_dir / f".{missing[0]}.12345{sample.TEMP_SUFFIX}"
    stale.write_bytes((reference_run / missing[0]).read_bytes()[:100])

    counts = run_sample_here(tiny_pipeline_dir, output_dir, batch_size=3)
    assert counts == {"written": NUM_IMAGES - len(written), "skipped": len(written)}
    for name, stat in written.items():  # not rewritten: same file, same modification time
        now = (output_dir / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    assert not stale.exists() and not list(output_dir.glob(f".*{sample.TEMP_SUFFIX}"))
    assert png_digests(output_dir) == png_digests(reference_run)


def test_resuming_with_other_settings_is_refused(reference_run, tiny_pipeline_dir, tmp_path, fresh_accelerate_state):
    before = png_digests(reference_run)
    with pytest.raises(SystemExit, match=r"different settings(.|\n)*seed: folder has 0, this run has 1"):
        run_sample_here(tiny_pipeline_dir, reference_run, batch_size=3, seed=1)
    with pytest.raises(SystemExit, match=r"num_inference_steps: folder has 4, this run has 5"):
        run_sample_here(tiny_pipeline_dir, reference_run, batch_size=3, num_inference_steps=5)
    with pytest.raises(SystemExit, match=r"choice_temperature: folder has 4.5, this run has 6.0"):
        run_sample_here(tiny_pipeline_dir, reference_run, batch_size=3, choice_temperature=6.0)
    # Other weights under the same settings: the checksum differs.
    other_model = MageGenerationPipeline.from_pretrained(tiny_pipeline_dir)
    with torch.no_grad():
        other_model.model.mage.embeddings.word_embeddings.weight[0, 0] += 1.0
    other_model.save_pretrained(tmp_path / "other-model")
    with pytest.raises(SystemExit, match=r"model_checksum"):
        run_sample_here(tmp_path / "other-model", reference_run, batch_size=3)
    assert png_digests(reference_run) == before

    # Arguments the model rejects fail before anything is written.
    with pytest.raises(ValueError, match="class-unconditional"):
        run_sample_here(tiny_pipeline_dir, tmp_path / "conditional", batch_size=3, class_label=3)
    assert not (tmp_path / "conditional").exists()

    # A folder of PNGs that this script did not make.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    Image.new("RGB", (32, 32)).save(foreign / "000000.png")
    with pytest.raises(SystemExit, match=r"no sampling_settings.json"):
        run_sample_here(tiny_pipeline_dir, foreign, batch_size=3)


# ------------------------------------------------------------------------------------------------------ FID: checks


def write_pngs(folder: Path, images, ext: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, image in enumerate(images):
        image.save(folder / f"{n:03d}{ext}")
    return folder


@pytest.fixture(scope="module")
def photo_folders(tmp_path_factory) -> tuple[Path, Path]:
    """Two folders of different real photos (scikit-image's), 4 each, 64x64 PNG (few: Inception is slow on a CPU)."""
    photos = photo_images(64)
    root = tmp_path_factory.mktemp("photos")
    return write_pngs(root / "a", photos[:4]), write_pngs(root / "b", photos[8:12])


def fid_args(samples: Path, reference: Path, weights: Path | str, *extra: str):
    return evaluate_fid.parse_args(
        ["--samples", str(samples), "--reference", str(reference), "--inception_weights", str(weights),
         "--isc_splits", "2", "--device", "cpu", "--quiet", *extra]
    )


def test_missing_inception_weights_give_a_clear_error(photo_folders, tmp_path, monkeypatch):
    a, b = photo_folders
    with pytest.raises(SystemExit) as error:
        evaluate_fid.main(fid_args(a, b, tmp_path / "nowhere.pth"))
    message = str(error.value)
    assert "nowhere.pth" in message and evaluate_fid.INCEPTION_WEIGHTS_FILE in message
    assert "github.com/toshas/torch-fidelity/releases" in message
    # Without the flag, the environment variable, then torch hub's folder are looked in.
    monkeypatch.setenv(evaluate_fid.WEIGHTS_ENV_VAR, str(tmp_path / "from-env.pth"))
    with pytest.raises(SystemExit, match="from-env.pth"):
        evaluate_fid.find_inception_weights(None)
    (tmp_path / "from-env.pth").write_bytes(b"not a state dict")
    assert evaluate_fid.find_inception_weights(None) == tmp_path / "from-env.pth"
    with pytest.raises(SystemExit, match="Could not read"):
        evaluate_fid.check_inception_weights(tmp_path / "from-env.pth")
    monkeypatch.delenv(evaluate_fid.WEIGHTS_ENV_VAR)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(SystemExit, match=str(tmp_path / "hub" / "checkpoints" / evaluate_fid.INCEPTION_WEIGHTS_FILE)):
        evaluate_fid.find_inception_weights(None)
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "wrong.pth")
    with pytest.raises(SystemExit, match=r"not torch-fidelity's InceptionV3"):
        evaluate_fid.check_inception_weights(tmp_path / "wrong.pth")


def test_folders_are_checked_before_evaluating(photo_folders, tmp_path):
    a, _ = photo_folders
    photos = photo_images(64)
    assert evaluate_fid.summarize_folder(str(a), "samples", recursive=False) == {
        "folder": str(a), "num_images": 4, "width": 64, "height": 64, "modes": {"RGB": 4}}
    jpegs = write_pngs(tmp_path / "jpeg", photos[:4], ext=".jpg")
    with pytest.raises(SystemExit, match=r"4 lossy images(.|\n)*13.74"):
        evaluate_fid.summarize_folder(str(jpegs), "reference", recursive=False)
    mixed = write_pngs(tmp_path / "mixed", photos[:3] + [photos[3].resize((32, 32))])
    with pytest.raises(SystemExit, match=r"mixes image sizes \(64x64: 3, 32x32: 1\)"):
        evaluate_fid.summarize_folder(str(mixed), "samples", recursive=False)
    nested = write_pngs(tmp_path / "nested" / "class_0", photos[:3]).parent
    with pytest.raises(SystemExit, match=r"no PNG images \(pass --recursive"):
        evaluate_fid.summarize_folder(str(nested), "reference", recursive=False)
    assert evaluate_fid.summarize_folder(str(nested), "reference", recursive=True)["num_images"] == 3

    small = write_pngs(tmp_path / "small", [p.resize((32, 32)) for p in photos[:4]])
    weights = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, weights)
    with pytest.raises(SystemExit, match=r"samples are 32x32 but the reference images are 64x64"):
        evaluate_fid.main(fid_args(small, a, weights))
    with pytest.raises(SystemExit, match=r"at least --isc_splits \(10\) samples, got 4"):
        evaluate_fid.main(fid_args(a, a, weights, "--isc_splits", "10"))


# ------------------------------------------------------------------------------------------- FID: torch-fidelity runs


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised torch-fidelity InceptionV3, saved as the state dict its loader reads.

    torch-fidelity's constructor always loads weights (from the URL when no path is given); the download and the load
    are replaced by no-ops for construction only. Convolutions get He initialisation so that the features keep their
    scale through the ~90 layers (PyTorch's default shrinks them to ~1e-7, where every FID is ~0), and the classifier
    is scaled so that its softmax is not flat (IS > 1)."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *args, **kwargs: {}), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None):
        torch.manual_seed(0)
        extractor = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    for module in extractor.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.nn.init.normal_(extractor.fc.weight, std=8.0 / 2048**0.5)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(extractor.state_dict(), path)
    return path


def reference_fid(folder1: Path, folder2: Path, weights: Path) -> float:
    """FID computed without the script or torch-fidelity's metric code: the extractor loaded from `weights`, our own
    image loading, and an exact formula for few samples. With centred features `A = (X1 - mu1) / sqrt(n1 - 1)` and
    `B` likewise, `sigma1 = A^T A` and `sigma2 = B^T B`, and the non-zero eigenvalues of `sigma1 @ sigma2` are the
    squared singular values of `A @ B^T` (n1 x n2), so `trace(sqrtm(sigma1 @ sigma2))` is the nuclear norm of
    `A @ B^T`."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    )
    means, centred = [], []
    for folder in (folder1, folder2):
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])
        with torch.no_grad():
            (features,) = extractor(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())  # (N, 2048)
        features = features.double().numpy()
        means.append(features.mean(0))
        centred.append((features - features.mean(0)) / np.sqrt(len(features) - 1))  # (N, 2048)
    (mu1, mu2), (a, b) = means, centred
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(((mu1 - mu2) ** 2).sum() + (a**2).sum() + (b**2).sum() - 2 * trace_sqrt)


@pytest.mark.eval
def test_fid_and_is_end_to_end_with_local_weights(photo_folders, random_inception_weights, tmp_path, capsys):
    from threadpoolctl import threadpool_limits

    a, b = photo_folders
    # torch-fidelity's FID takes the eigenvalues of a 2048x2048 matrix; on this shared 2-core machine a multithreaded
    # BLAS spends most of that time spinning (measured: 48 s with the default threads, 4.4 s with one).
    with threadpool_limits(limits=1, user_api="blas"):
        aa = evaluate_fid.main(fid_args(a, a, random_inception_weights))
        ab = evaluate_fid.main(fid_args(a, b, random_inception_weights, "--output_json", str(tmp_path / "ab.json")))
        ba = evaluate_fid.main(fid_args(b, a, random_inception_weights))
    fid = "frechet_inception_distance"
    printed = capsys.readouterr().out
    print(f"FID(a,a)={aa[fid]:.3g} FID(a,b)={ab[fid]:.6g} FID(b,a)={ba[fid]:.6g}")

    # torch-fidelity takes the trace of sqrt(sigma1 @ sigma2) from its eigenvalues. With 4 samples in 2048 dimensions
    # ~2044 of them are zero up to rounding (~1e-16 * lambda_max^2), and their square roots add up to at most
    # ~2044 * 1.5e-8 * lambda_max ~ 3e-5 * lambda_max: that is the noise floor of these numbers, well below 1e-4 of
    # FID(a, b). Passing the wrong folder or weights would be off by O(1).
    assert ab[fid] > 1.0  # different photos are far apart, even in random features
    assert abs(aa[fid]) < 1e-4 * ab[fid]  # a folder against itself
    assert ba[fid] == pytest.approx(ab[fid], rel=1e-4)
    # The script's number is the Frechet distance of the features the given weights produce for these files.
    assert ab[fid] == pytest.approx(reference_fid(a, b, random_inception_weights), rel=1e-4)
    # IS is computed on the samples (input1): the same for (a, a) and (a, b), different for b.
    assert ab["inception_score_mean"] == aa["inception_score_mean"] > 1.0
    assert ba["inception_score_mean"] != ab["inception_score_mean"]

    assert ab["official_inception_weights"] is False and "not the official" in printed
    assert "64x64" in printed and "only 4 images" in printed
    assert json.loads((tmp_path / "ab.json").read_text())[fid] == ab[fid]


@pytest.mark.eval
def test_readme_reference_preparation_matches_the_original(tmp_path, monkeypatch):
    """pipelines/README.md's PIL snippet gives the pixels of the original's `prepare_imgnet_val.py` (torchvision's
    `Resize(256)` then `CenterCrop(256)`), on photos of several aspect ratios."""
    import re

    from torchvision import transforms

    readme = (REPO / "pipelines" / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    photos = photo_images()[:4]  # full size: 512x512, 451x300, 600x400, 640x427
    photos += [photo.transpose(Image.Transpose.ROTATE_90) for photo in photos[1:3]]  # and two portrait ones
    source = tmp_path / "imagenet" / "val" / "n01440764"
    source.mkdir(parents=True)
    for n, photo in enumerate(photos):
        photo.save(source / f"ILSVRC2012_val_{n:08d}.JPEG", quality=90)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "pipelines/README.md", "exec"), {})

    original = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(256)])
    for n, path in enumerate(sorted(source.glob("*.JPEG"))):
        expected = np.asarray(original(Image.open(path).convert("RGB")))
        with Image.open(tmp_path / "imagenet-val-256" / f"{n:05d}.png") as written:
            assert written.format == "PNG"
            np.testing.assert_array_equal(np.asarray(written), expected, err_msg=path.name)
    sizes = [photo.size for photo in photos]
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)  # landscape and portrait crops were checked
