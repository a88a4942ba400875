# Copyright 2026 The mage-hf authors. MIT licence.
"""`mage-hf push` (mage_hf.publishing): folder checks, the model card, the sample grid, the staging folder, the
upload calls (against a fake `HfApi`: no test touches the network), the Space, and conversion provenance.

The card's metadata is checked locally (it parses back, round-trips through `ModelCardData`, its model-index parses
into `EvalResult`s). `ModelCard.validate()` is not called: it posts the card to the Hub's validation endpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import GOLDEN
from huggingface_hub import HfApi, ModelCard, ModelCardData, SpaceCard, constants
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from PIL import Image
from test_modeling import tiny_config

from mage_hf import (
    MageForImageClassification,
    MageForMaskedImageModeling,
    MageGenerationPipeline,
    MageImageProcessor,
    MageModel,
    MageScheduler,
    MageVQConfig,
    MageVQModel,
)
from mage_hf.cli import main
from mage_hf.publishing import build_model_card, inspect_folder, training_folder_info
from mage_hf.training_utils import check_hub_access, write_model_card

SIZE = 64  # 64 px images, five VQGAN levels: a 4x4 token grid
REPO = "org/tiny-mage"


def tiny_vq_config() -> MageVQConfig:
    return MageVQConfig(base_channels=32, channel_multiplier=[1, 1, 1, 1, 1], num_res_blocks=1, num_embeddings=16,
                        embed_dim=8, resolution=SIZE)


def save_processor(folder: Path) -> None:
    crop = {"height": SIZE, "width": SIZE}
    MageImageProcessor(size={"shortest_edge": SIZE}, crop_size=crop).save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny folders of every kind: a pipeline, bare model folders (masked image modeling, class-conditional,
    encoder, classifier with eval_results.json, tokenizer)."""
    root = tmp_path_factory.mktemp("publishing")
    torch.manual_seed(0)
    config = tiny_config(vq_config=tiny_vq_config())
    model = MageForMaskedImageModeling(config).eval()
    MageGenerationPipeline(model=model, scheduler=MageScheduler.from_model_config(config)).save_pretrained(
        root / "pipeline"
    )
    model.save_pretrained(root / "mim")
    save_processor(root / "mim")
    MageForMaskedImageModeling(tiny_config(vq_config=tiny_vq_config(), num_classes=3)).save_pretrained(root / "cond")
    MageModel(config).save_pretrained(root / "encoder")
    save_processor(root / "encoder")
    classifier_config = tiny_config(vq_config=tiny_vq_config(), num_labels=3, use_mean_pooling=True)
    classifier = MageForImageClassification(classifier_config)
    classifier.save_pretrained(root / "classifier")
    save_processor(root / "classifier")
    (root / "classifier" / "eval_results.json").write_text(
        json.dumps({"mode": "linear_probe", "top1": 41.5, "num_validation_images": 200, "step": 30})
    )
    MageVQModel(tiny_vq_config()).save_pretrained(root / "vq")
    return root


def copy_folder(folders: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(folders / name, target)
    return target


def push(*args) -> int:
    return main(["push", *map(str, args)])


def load_card(staging: Path) -> ModelCard:
    return ModelCard.load(staging / "README.md")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def fake_hub(monkeypatch) -> list[tuple[str, dict]]:
    """Replace the HfApi methods `publish` uses; return the list the calls are recorded in."""
    calls = []

    def record(name, result=None):
        def method(self, *args, **kwargs):
            if name == "upload_folder":  # what is in the folder at upload time
                kwargs["files"] = sorted(p.relative_to(kwargs["folder_path"]).as_posix()
                                         for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file())
            calls.append((name, {"args": args, **kwargs}))
            return result(args, kwargs) if callable(result) else result
        return method

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", record("whoami", {"name": "me"}))
    monkeypatch.setattr(HfApi, "create_repo", record(
        "create_repo", lambda a, k: f"https://huggingface.co/{'spaces/' if k.get('repo_type') == 'space' else ''}{a[0]}"
    ))
    monkeypatch.setattr(HfApi, "create_branch", record("create_branch"))
    monkeypatch.setattr(HfApi, "add_space_variable", record("add_space_variable", {}))
    monkeypatch.setattr(HfApi, "upload_folder", record("upload_folder", lambda a, k: SimpleNamespace(
        commit_url=f"https://huggingface.co/{k['repo_id']}/commit/abc",
        pr_url=f"https://huggingface.co/{k['repo_id']}/discussions/1" if k.get("create_pr") else None,
    )))
    return calls


# ------------------------------------------------------------------------------------------------- dry run, card


def test_dry_run_pipeline_folder(folders, tmp_path, capsys):
    """The staging folder: the files minus checkpoints/logs/caches, a card that parses with the right metadata and
    snippets, a sample grid; it loads and generates exactly like the source folder."""
    source = copy_folder(folders, "pipeline", tmp_path)
    (source / "checkpoint-4").mkdir()
    (source / "checkpoint-4" / "optimizer.bin").write_bytes(b"pickle")  # never uploaded, so not refused
    (source / "logs").mkdir()
    (source / "logs" / "events.out").write_text("x")
    (source / "metrics.jsonl").write_text('{"step": 1, "loss": 6.5}\n{"step": 2, "loss": 5.25}\n')
    (source / "training_args.json").write_text(json.dumps({
        "dataset_name": "someone/emoji-dataset", "pretrained_model": "someone/mage-base", "learning_rate": 1e-3,
        "train_batch_size": 8, "seed": 3, "hub_token": "hf_secret_value", "output_dir": "/home/me/run",
        "precompute_tokens": True,
    }))
    # What train_mage.py records of its base: a model trained from scratch by mage-hf (so these weights are MIT).
    (source / "base_provenance.json").write_text(json.dumps(
        {"base_model": "someone/mage-base", "official_weights": False, "conversion": None}
    ))

    assert push("--folder", source, "--repo-id", REPO, "--dry-run", "--steps", 2) == 0
    out = capsys.readouterr().out
    staging = tmp_path / "pipeline-hub"  # the default: <folder>-hub beside the folder
    assert f"Staging folder: {staging}" in out and "Dry run: nothing uploaded" in out and REPO in out
    assert "model/model.safetensors" in out and "samples.png" in out

    files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    assert files == sorted([".mage-hf-staging", "README.md", "base_provenance.json", "model/config.json",
                            "model/model.safetensors", "model/preprocessor_config.json",
                            "model_index.json", "samples.png", "scheduler/scheduler_config.json",
                            "training_args.json"])
    staged_args = json.loads((staging / "training_args.json").read_text())
    assert "hub_token" not in staged_args and staged_args["precompute_tokens"] is True  # only the secret is dropped

    card = load_card(staging)
    data = card.data
    assert data.license == "mit" and data.library_name == "mage-hf"
    assert data.pipeline_tag == "unconditional-image-generation"
    assert {"mage", "mage-hf", "masked-image-modeling", "transformers", "diffusers", "image-generation",
            "inpainting"} <= set(data.tags)
    assert data.datasets == ["someone/emoji-dataset"] and data.base_model == "someone/mage-base"
    assert "hf_secret_value" not in card.content
    blocks = python_blocks(card.text)
    assert any(f'AutoModel.from_pretrained("{REPO}", subfolder="model")' in b for b in blocks)
    assert any(f'MageGenerationPipeline.from_pretrained("{REPO}")' in b and "manual_seed(0)" in b for b in blocks)
    assert any(f'MageInpaintPipeline.from_pretrained("{REPO}")' in b and "outpaint(" in b for b in blocks)
    assert f"mage-hf generate --model {REPO}" in card.text
    assert "![samples](samples.png)" in card.text and "Final training loss: 5.2500" in card.text
    assert "@inproceedings{li2023mage" in card.text

    grid = Image.open(staging / "samples.png")
    assert grid.size == (4 * SIZE, 2 * SIZE)  # 8 samples, 4 per row

    staged = MageGenerationPipeline.from_pretrained(staging)
    original = MageGenerationPipeline.from_pretrained(source)
    kwargs = {"num_images": 2, "num_inference_steps": 3, "output_type": "latent"}

    def gens():
        return [torch.Generator().manual_seed(s) for s in (5, 6)]

    assert torch.equal(staged(**kwargs, generator=gens()).images, original(**kwargs, generator=gens()).images)

    # A second run replaces the staging folder it made.
    assert push("--folder", source, "--repo-id", REPO, "--dry-run", "--samples", 3, "--steps", 2) == 0
    assert Image.open(staging / "samples.png").size == (3 * SIZE, SIZE)


def test_card_metadata_is_valid_locally(folders, tmp_path):
    """The metadata round-trips through ModelCardData and its model-index parses back into the EvalResults.
    (`ModelCard.validate()` needs the network: it posts to the Hub. Not called.)"""
    source = copy_folder(folders, "pipeline", tmp_path)
    (source / "fid.json").write_text(json.dumps({
        "frechet_inception_distance": 11.1234567, "inception_score_mean": 74.2, "inception_score_std": 1.5,
        "samples": {"folder": "/data/samples", "num_images": 50000},
        "reference": {"folder": "/data/imagenet-val", "num_images": 50000}, "official_inception_weights": True,
    }))
    card = build_model_card(inspect_folder(source), REPO)
    as_dict = card.data.to_dict()
    assert ModelCardData(**as_dict).to_dict() == as_dict  # (ModelCardData's == compares no fields: use to_dict)
    card.save(tmp_path / "README.md")
    reloaded = ModelCard.load(tmp_path / "README.md")
    assert reloaded.data.to_dict() == as_dict
    results = {r.metric_type: r for r in reloaded.data.eval_results}
    assert results["fid"].metric_value == pytest.approx(11.1235) and results["fid"].task_type == (
        "unconditional-image-generation")
    assert results["inception_score"].metric_value == pytest.approx(74.2)
    name, parsed = model_index_to_eval_results(eval_results_to_model_index("tiny-mage", reloaded.data.eval_results))
    assert name == "tiny-mage" and [r.metric_value for r in parsed] == [r.metric_value for r in card.data.eval_results]
    assert "FID: **11.12**" in card.text and "biased upwards" not in card.text


def test_model_folders_of_each_kind(folders, tmp_path, capsys):
    """Encoder: feature extraction, no samples; classifier: image classification with its top-1 in the
    model-index; tokenizer: image-to-image; class-conditional model folder: samples with class labels."""
    expected = {"encoder": "image-feature-extraction", "classifier": "image-classification", "vq": "image-to-image",
                "cond": "unconditional-image-generation"}
    for name, tag in expected.items():
        staging = tmp_path / f"{name}-staging"
        assert push("--folder", folders / name, "--repo-id", REPO, "--dry-run", "--output", staging,
                    "--samples", 2, "--steps", 2) == 0, capsys.readouterr().err
        card = load_card(staging)
        assert card.data.pipeline_tag == tag and card.data.license == "mit"
        assert (staging / "samples.png").is_file() == (name == "cond")
        assert ("diffusers" in card.data.tags) == (name == "cond")
        assert ("MageGenerationPipeline" in card.text) == (name == "cond")
    classifier_card = load_card(tmp_path / "classifier-staging")
    [result] = classifier_card.data.eval_results
    assert (result.task_type, result.metric_type, result.metric_value) == ("image-classification", "accuracy", 41.5)
    assert "41.50%" in classifier_card.text and f'pipeline("image-classification", model="{REPO}")' in (
        classifier_card.text)
    assert f"mage-hf features --model {REPO}" in load_card(tmp_path / "encoder-staging").text
    cond = load_card(tmp_path / "cond-staging")
    assert "class-conditional" in cond.data.tags and "class_labels=0" in cond.text


def test_evaluation_notes_and_class_names_reach_the_card(folders, tmp_path, capsys):
    """A folder's `evaluation.md` (written by an evaluation script) goes into the pushed card's Evaluation section,
    after the numbers from eval_results.json; named classes are listed and used in the snippet; an oversized file is
    refused."""
    source = copy_folder(folders, "classifier", tmp_path)
    notes = "| metric | value |\n| --- | --- |\n| probe top-1 | 41.5% |\n\n### Data\n\nHeld-out digits."
    (source / "evaluation.md").write_text(notes + "\n")
    assert push("--folder", source, "--repo-id", REPO, "--dry-run", "--output", tmp_path / "staged") == 0
    text = load_card(tmp_path / "staged").text
    evaluation = text[text.index("## Evaluation"):]
    assert evaluation.index("Top-1 accuracy (linear probe): **41.50%**") < evaluation.index(notes)
    assert (tmp_path / "staged" / "evaluation.md").is_file()

    cond = tmp_path / "named"
    names = ["circle", "square", "triangle"]
    MageForMaskedImageModeling(tiny_config(vq_config=tiny_vq_config(), num_classes=3, id2label=dict(enumerate(names)),
                                           label2id={n: i for i, n in enumerate(names)})).save_pretrained(cond)
    assert push("--folder", cond, "--repo-id", REPO, "--dry-run", "--output", tmp_path / "named-staged",
                "--samples", 0) == 0
    text = load_card(tmp_path / "named-staged").text
    assert "Its classes (`class_labels=`, by id or name): 0 circle, 1 square, 2 triangle." in text
    assert 'class_labels="circle"' in text

    (source / "evaluation.md").write_text("x" * (64 * 1024 + 1))
    assert push("--folder", source, "--repo-id", REPO, "--dry-run", "--output", tmp_path / "too-big") != 0
    assert "evaluation.md is 65537 characters" in capsys.readouterr().err


@pytest.mark.parametrize("processor", [True, False], ids=["with-processor", "without-processor"])
@pytest.mark.parametrize("name", ["pipeline", "encoder", "classifier", "vq"])
def test_usage_snippets_run(folders, tmp_path, monkeypatch, name, processor):
    """Every Python snippet of the card runs as written, with the repo id pointing at the local folder, also for a
    folder saved without its preprocessor_config.json (which push accepts); so does the `features` command."""
    folder = copy_folder(folders, name, tmp_path)
    if not processor:
        for config in folder.rglob("preprocessor_config.json"):
            config.unlink()
    card = build_model_card(inspect_folder(folder, load=False), REPO)
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (SIZE + 16, SIZE + 16), (120, 60, 30)).save("photo.png")
    blocks = python_blocks(card.text)
    assert blocks
    for block in blocks:
        exec(compile(block.replace(REPO, str(folder)), "README.md", "exec"), {})  # noqa: S102
    if name == "encoder":
        assert f"mage-hf features --model {REPO}" in card.text
        assert main(["features", "--model", str(folder), "photo.png", "photo.png"]) == 0


# ------------------------------------------------------------------------------------------------------ refusals


def _pickled(folder: Path) -> None:
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def _no_safetensors(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _truncated(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted download: the header is whole, data is not


@pytest.mark.parametrize(("damage", "message"), [
    (_pickled, "pickle-format weights (pytorch_model.bin)"),
    (_no_safetensors, "no *.safetensors weights"),
    (_truncated, "would not load"),
    (lambda folder: shutil.rmtree(folder), "does not exist"),
    (lambda folder: (folder / "config.json").unlink(), "neither a diffusers MAGE pipeline folder"),
])
def test_refusals(folders, tmp_path, capsys, damage, message):
    source = copy_folder(folders, "mim", tmp_path)
    damage(source)
    assert push("--folder", source, "--repo-id", REPO, "--dry-run", "--samples", 0) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress lines: one line of error
    assert last.startswith("error: ") and message in last, last
    assert not (tmp_path / "mim-hub").exists()


def test_damaged_notes_and_metrics(folders, tmp_path, capsys):
    source = copy_folder(folders, "mim", tmp_path)
    # A run killed mid-write leaves a truncated last line: the losses before it still give the final loss.
    (source / "metrics.jsonl").write_text('{"step": 1, "loss": 6.5}\n{"step": 2, "loss": 5.25}\n{"step": 3, "lo')
    assert inspect_folder(source, load=False).final_loss == 5.25
    (source / "evaluation.md").write_text("Notes", encoding="utf-16")
    assert push("--folder", source, "--repo-id", REPO, "--dry-run", "--samples", 0) == 2
    assert "evaluation.md is not UTF-8 text" in capsys.readouterr().err


def test_pickles_in_a_pipeline_component_are_refused(folders, tmp_path, capsys):
    source = copy_folder(folders, "pipeline", tmp_path)
    (source / "model" / "diffusion_pytorch_model.pt").write_bytes(b"x")
    assert push("--folder", source, "--repo-id", REPO, "--dry-run") == 2
    err = capsys.readouterr().err
    assert "model/diffusion_pytorch_model.pt" in err and "save_pretrained" in err


def test_bad_arguments(folders, tmp_path, capsys):
    for args, message in (
        (["--repo-id", "no-namespace"], "ORG/NAME"),
        (["--repo-id", "a/b/c"], "not a valid repo id"),
        (["--repo-id", REPO, "--steps", "0"], "--steps >= 1"),
        # Refused before the staging folder is replaced (generation used to fail on it after that).
        (["--repo-id", REPO, "--seed", str(2**64 - 1)], "--seed must be between 0 and"),
        (["--repo-id", REPO, "--seed", "-1"], "--seed must be between 0 and"),
        (["--repo-id", REPO, "--model", "org/x"], "--model only applies with --space"),
        (["--repo-id", REPO, "--output", str(folders / "mim" / "inside")], "must be outside"),
    ):
        assert push("--folder", folders / "mim", "--dry-run", *args) == 2
        assert message in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious.txt").write_text("keep me")
    assert push("--folder", folders / "mim", "--repo-id", REPO, "--dry-run", "--output", occupied) == 2
    assert "was not made by `mage-hf push`" in capsys.readouterr().err
    assert (occupied / "precious.txt").read_text() == "keep me"


# -------------------------------------------------------------------------------------------------- real pushes


def test_offline_push_fails_fast(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("create_repo called offline"))
    source = copy_folder(folders, "pipeline", tmp_path)
    start = time.perf_counter()
    assert push("--folder", source, "--repo-id", REPO) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "offline" in err and "--dry-run" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "pipeline-hub").exists()  # nothing staged, no samples made


def test_unreachable_hub_fails_fast(folders, tmp_path, capsys, monkeypatch):
    def unreachable(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", unreachable)
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("create_repo called after a failed check"))
    source = copy_folder(folders, "pipeline", tmp_path)
    assert push("--folder", source, "--repo-id", REPO) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Hub" in err and "huggingface.co" in err and "--dry-run" in err and "hf auth login" in err
    assert not (tmp_path / "pipeline-hub").exists()


def test_training_hub_check_keeps_its_messages(monkeypatch):
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("create_repo called after a failed check"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="--push_to_hub was given but HF_HUB_OFFLINE is set"):
        check_hub_access("me/mage")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: (_ for _ in ()).throw(ConnectionError("no route")))
    with pytest.raises(RuntimeError, match=r"--push_to_hub: cannot reach the Hugging Face Hub.*no route"):
        check_hub_access("me/mage")
    with pytest.raises(ValueError, match="--hub_model_id"):
        check_hub_access(None)


def test_push_against_a_fake_hub(folders, tmp_path, capsys, monkeypatch):
    calls = fake_hub(monkeypatch)
    staging = tmp_path / "staging"
    assert push("--folder", folders / "mim", "--repo-id", REPO, "--output", staging, "--private", "--revision", "dev",
                "--create-pr", "--samples", 2, "--steps", 2, "--token", "hf_x") == 0
    out = capsys.readouterr().out
    assert [name for name, _ in calls] == ["whoami", "create_repo", "create_branch", "upload_folder"]
    kwargs = dict(calls)
    assert kwargs["create_repo"]["args"] == (REPO,)
    assert kwargs["create_repo"]["private"] is True and kwargs["create_repo"]["repo_type"] == "model"
    assert kwargs["create_repo"]["exist_ok"] is True and "space_sdk" not in kwargs["create_repo"]
    assert kwargs["create_branch"]["args"] == (REPO,) and kwargs["create_branch"]["branch"] == "dev"
    upload = kwargs["upload_folder"]
    assert upload["repo_id"] == REPO and Path(upload["folder_path"]) == staging and upload["repo_type"] == "model"
    assert upload["revision"] == "dev" and upload["create_pr"] is True
    assert ".mage-hf-staging" in upload["ignore_patterns"]
    assert {"README.md", "samples.png", "config.json", "model.safetensors"} <= set(upload["files"])
    assert f"URL: https://huggingface.co/{REPO}" in out and "discussions/1" in out

    # Defaults: public, main, a commit (no branch to create).
    calls.clear()
    assert push("--folder", folders / "encoder", "--repo-id", REPO, "--output", tmp_path / "s2") == 0
    kwargs = dict(calls)
    assert "create_branch" not in kwargs and kwargs["create_repo"]["private"] is False
    assert kwargs["upload_folder"]["revision"] is None and kwargs["upload_folder"]["create_pr"] is False


def test_failed_upload_keeps_the_staging_folder(folders, tmp_path, capsys, monkeypatch):
    fake_hub(monkeypatch)

    def forbidden(self, *args, **kwargs):
        raise PermissionError("403 Forbidden: you cannot write to org")

    monkeypatch.setattr(HfApi, "upload_folder", forbidden)
    assert push("--folder", folders / "encoder", "--repo-id", REPO, "--output", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert "upload to org/tiny-mage failed" in err and "403 Forbidden" in err and str(tmp_path / "s") in err
    assert (tmp_path / "s" / "README.md").is_file()


# -------------------------------------------------------------------------------------------------------- Space


@pytest.fixture
def space_folder(tmp_path):
    """A minimal Space folder like the repository's space/."""
    folder = tmp_path / "space"
    folder.mkdir()
    (folder / "app.py").write_text("from mage_hf.gradio_app import main\n\nif __name__ == '__main__':\n    main()\n")
    (folder / "requirements.txt").write_text("torch\ntransformers\ndiffusers\n")
    (folder / "README.md").write_text(
        "---\ntitle: MAGE\nemoji: 🎭\nsdk: gradio\nsdk_version: 6.0.0\napp_file: app.py\nlicense: mit\n"
        "models: []\n---\n\n# MAGE demo\n",
        encoding="utf-8",
    )
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"x")
    return folder


def test_space_dry_run(space_folder, tmp_path, capsys):
    staging = tmp_path / "space-staging"
    assert push("--space", "--folder", space_folder, "--repo-id", "org/mage-demo", "--model", "org/x", "--dry-run",
                "--output", staging) == 0
    out = capsys.readouterr().out
    assert "space repo org/mage-demo" in out and "MAGE_MODEL=org/x" in out
    assert (staging / "app.py").is_file() and (staging / "requirements.txt").is_file()
    assert (staging / "mage_hf" / "__init__.py").is_file() and (staging / "mage_hf" / "publishing.py").is_file()
    assert not list(staging.rglob("__pycache__")) and not list(staging.rglob("*.egg-info"))
    card = SpaceCard.load(staging / "README.md")
    assert card.data.sdk == "gradio" and card.data.models == ["org/x"] and card.data.emoji == "🎭"
    lines = (staging / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[1:4] == ["title: MAGE", "emoji: 🎭", "sdk: gradio"] and "# MAGE demo" in lines  # order and body kept
    assert SpaceCard.load(space_folder / "README.md").data.models == []  # the source is untouched


def test_space_push_against_a_fake_hub(space_folder, tmp_path, capsys, monkeypatch):
    calls = fake_hub(monkeypatch)
    assert push("--space", "--folder", space_folder, "--repo-id", "org/mage-demo", "--model", "org/x",
                "--output", tmp_path / "s") == 0
    kwargs = dict(calls)
    assert kwargs["create_repo"]["repo_type"] == "space" and kwargs["create_repo"]["space_sdk"] == "gradio"
    assert kwargs["add_space_variable"]["args"] == ("org/mage-demo", "MAGE_MODEL", "org/x")
    assert kwargs["upload_folder"]["repo_type"] == "space" and "mage_hf/__init__.py" in kwargs["upload_folder"]["files"]
    assert "https://huggingface.co/spaces/org/mage-demo" in capsys.readouterr().out
    # The variable restarts the running Space: it is set after the new app is uploaded, never before.
    assert [name for name, _ in calls].index("add_space_variable") > [name for name, _ in calls].index("upload_folder")
    # As a pull request, the running Space's variable is left alone.
    calls.clear()
    assert push("--space", "--folder", space_folder, "--repo-id", "org/mage-demo", "--model", "org/x", "--create-pr",
                "--output", tmp_path / "s") == 0
    assert "add_space_variable" not in dict(calls) and dict(calls)["upload_folder"]["create_pr"] is True
    captured = capsys.readouterr()
    assert "MAGE_MODEL is not set" in captured.err and "Set the Space variable" not in captured.out


def test_space_refusals(space_folder, tmp_path, capsys):
    args = ["--space", "--repo-id", "org/mage-demo", "--dry-run", "--output", tmp_path / "s"]
    assert push(*args, "--folder", space_folder, "--model", str(tmp_path)) == 2
    assert "is not a Hub repo id" in capsys.readouterr().err
    (space_folder / "app.py").unlink()
    assert push(*args, "--folder", space_folder) == 2
    assert "has no app.py" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- provenance and training


def test_conversion_record_and_card(converted, tmp_path, capsys):
    record = json.loads((converted["pretrain"] / "conversion.json").read_text())
    golden = GOLDEN / "mage_pretrain.pth"
    sha = hashlib.sha256(golden.read_bytes()).hexdigest()
    assert record["source"] == "conversion" and record["checkpoint"] == "mage_pretrain.pth"
    assert record["sha256"] == sha and record["kind"] == "pretrain" and record["max_abs_diff"] == 0.0
    assert record["mapped_tensors"] > 0 and record["mage_hf_version"]
    assert json.loads((converted["vqgan"] / "conversion.json").read_text())["kind"] == "vqgan"

    staging = tmp_path / "staging"
    assert push("--folder", converted["pretrain"], "--repo-id", REPO, "--dry-run", "--samples", 0,
                "--output", staging) == 0
    card = load_card(staging)
    assert card.data.license == "other" and card.data.license_name == "mage-weights"
    assert card.data.license_link == "https://github.com/LTH14/mage"
    assert sha in card.text and "mage_pretrain.pth" in card.text and "MAGE authors'" in card.text
    assert "MIT" in card.text and (staging / "conversion.json").is_file()
    # An explicit --license wins.
    assert push("--folder", converted["finetune"], "--repo-id", REPO, "--dry-run", "--license", "apache-2.0",
                "--output", tmp_path / "s2") == 0
    assert load_card(tmp_path / "s2").data.license == "apache-2.0"


def test_write_model_card_without_loading(tmp_path):
    """training_utils.write_model_card builds the same kind of card from the training arguments alone (no weights
    needed); a run continued from a converted folder inherits its licence."""
    out = tmp_path / "run"
    out.mkdir()
    args = {"dataset_name": "someone/emoji", "learning_rate": 0.001, "train_batch_size": 8, "seed": 0,
            "class_column": None, "pretrained_model": None, "hub_token": "hf_secret"}
    path = write_model_card(str(out), "me/mage-emoji", args, final_loss=1.23456)
    assert path == str(out / "README.md")
    card = ModelCard.load(path)
    assert card.data.license == "mit" and card.data.library_name == "mage-hf"
    assert card.data.datasets == ["someone/emoji"] and card.data.pipeline_tag == "unconditional-image-generation"
    assert "| learning_rate | 0.001 |" in card.text and "Final training loss: 1.2346" in card.text
    # --max_train_steps overrides --num_train_epochs, whose default would otherwise read as the length of the run.
    for extra, epochs_shown in (({"num_train_epochs": 3.0}, True), ({"num_train_epochs": 1.0, "max_train_steps": 50},
                                                                     False)):
        text = ModelCard.load(write_model_card(str(out), None, {**args, **extra}, None)).text
        assert ("| num_train_epochs |" in text) == epochs_shown and ("| max_train_steps | 50 |" in text) != epochs_shown
    assert 'from_pretrained("me/mage-emoji")' in card.text and "hf_secret" not in card.text

    local = tmp_path / "local-data"
    local.mkdir()
    base = tmp_path / "converted"
    base.mkdir()
    (base / "conversion.json").write_text(json.dumps({"source": "conversion", "checkpoint": "mage-vitb-1600.pth",
                                                      "sha256": "ab" * 32, "kind": "pretrain"}))
    path = write_model_card(str(out), None, {"dataset_name": str(local), "pretrained_model": str(base)}, None)
    card = ModelCard.load(path)
    assert card.data.get("datasets") is None and card.data.get("base_model") is None  # local paths are not Hub ids
    assert card.data.license == "other" and "ab" * 32 in card.text
    assert str(out) in card.text  # no repo id: the snippets load the folder
    info = training_folder_info(out, {"dataset_name": str(local)})
    assert info.class_name == "MageForMaskedImageModeling" and not info.loaded


def test_licence_follows_the_base_model_wherever_push_runs(converted, tmp_path, capsys, monkeypatch):
    """A run continued from a converted folder records where its weights come from (base_provenance.json), so its
    card says the MAGE authors' terms apply also when `mage-hf push` runs elsewhere, and so does a run continued from
    that run. Before, the base was looked up through the path as typed, relative to the current directory, and a
    push from anywhere else called the weights MIT."""
    from mage_hf.training_utils import record_base_model

    monkeypatch.chdir(converted["pretrain"].parent)
    first, second = tmp_path / "first", tmp_path / "second"
    record_base_model(str(first), "pretrain")  # as typed on the command line, relative
    write_model_card(str(first), None, {"pretrained_model": "pretrain"}, None)
    record_base_model(str(second), str(first))
    shutil.copytree(converted["pretrain"], first, dirs_exist_ok=True, ignore=shutil.ignore_patterns("conversion.json"))
    (first / "training_args.json").write_text(json.dumps({"pretrained_model": "pretrain"}))
    shutil.copytree(first, second, dirs_exist_ok=True, ignore=shutil.ignore_patterns("base_provenance.json"))
    (second / "training_args.json").write_text(json.dumps({"pretrained_model": str(first)}))
    monkeypatch.chdir(tmp_path)
    for folder in (first, second):
        assert push("--folder", folder, "--repo-id", REPO, "--dry-run", "--output", tmp_path / f"{folder.name}-s",
                    "--samples", 0) == 0
        card = load_card(tmp_path / f"{folder.name}-s")
        assert card.data.license == "other" and card.data.license_name == "mage-weights", folder
        assert "derive from the MAGE authors'" in card.text

    # A base that cannot be looked at (a Hub repo, offline and not cached): no licence is assumed.
    unknown = copy_folder(tmp_path, "first", tmp_path / "u")
    (unknown / "base_provenance.json").unlink()
    (unknown / "training_args.json").write_text(json.dumps({"pretrained_model": "someone/unseen-base"}))
    assert push("--folder", unknown, "--repo-id", REPO, "--dry-run", "--output", tmp_path / "u-s", "--samples", 0) == 2
    err = capsys.readouterr().err
    assert "trained from someone/unseen-base, and mage-hf cannot tell" in err and "pass --license" in err
    assert not (tmp_path / "u-s").exists()  # refused before staging anything
    assert push("--folder", unknown, "--repo-id", REPO, "--dry-run", "--output", tmp_path / "u-s", "--samples", 0,
                "--license", "apache-2.0") == 0
    assert load_card(tmp_path / "u-s").data.license == "apache-2.0"
    # The training scripts write no card then, rather than one with a guessed licence.
    assert write_model_card(str(unknown), None, {"pretrained_model": "someone/unseen-base"}, None) is None


def test_licence_ids_and_own_readme(folders, tmp_path, capsys):
    encoder = copy_folder(folders, "encoder", tmp_path)
    for licence, message in (("MIT licence", "not a Hub licence identifier"),
                             ("other", "--license other is for weights that derive from the MAGE authors'")):
        assert push("--folder", encoder, "--repo-id", REPO, "--dry-run", "--license", licence) == 2
        assert message in capsys.readouterr().err

    (encoder / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# My encoder\n\nHand-written notes.\n")
    assert push("--folder", encoder, "--repo-id", REPO, "--dry-run", "--output", tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert "is your own README" in err and "pass --license apache-2.0 to keep it" in err and "--replace-readme" in err
    assert not (tmp_path / "s").exists()
    assert push("--folder", encoder, "--repo-id", REPO, "--dry-run", "--output", tmp_path / "s", "--replace-readme",
                "--license", "apache-2.0") == 0
    assert load_card(tmp_path / "s").data.license == "apache-2.0"
    assert "Hand-written notes" in (encoder / "README.md").read_text()  # the folder's copy is untouched
    # A card mage-hf wrote (tagged mage-hf) is replaced without asking.
    shutil.copy(tmp_path / "s" / "README.md", encoder / "README.md")
    assert push("--folder", encoder, "--repo-id", REPO, "--dry-run", "--output", tmp_path / "s2") == 0
