# Copyright 2026 The mage-hf authors. MIT licence.
"""Publishing to the Hugging Face Hub: `mage-hf push`.

A MAGE folder (a diffusers pipeline folder, or a transformers model folder written by `save_pretrained`,
`mage-hf convert` or the training scripts) is checked (safetensors only, and it must load with `from_pretrained`),
copied into a staging folder with a model card (`README.md`: Hub metadata, usage for transformers, diffusers and the
command line, provenance, evaluation numbers, citation, licence) and a grid of samples (`samples.png`), checked again,
and uploaded with `huggingface_hub.HfApi`. `--space` publishes the Gradio demo Space instead, with a copy of the
`mage_hf` package beside its `app.py`.

The card is built from what the folder records about itself: `training_args.json` (training/train_mage.py),
`eval_results.json` (training/train_classifier.py), `fid.json` (pipelines/evaluate_fid.py --output_json),
`conversion.json` (`mage-hf convert`) and `evaluation.md` (Markdown an evaluation script wrote, e.g. the emoji
recipe's; it goes into the card's Evaluation section as it is). The card builder works without loading the weights, so the training script
writes its card through it too ([`training_folder_info`], used by `training_utils.write_model_card`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import PIL.Image
    from huggingface_hub import HfApi, ModelCard

__all__ = [
    "DEFAULT_EXCLUDES",
    "MODEL_CLASSES",
    "FolderInfo",
    "HubAccessError",
    "PublishError",
    "PublishResult",
    "build_model_card",
    "format_report",
    "generate_sample_grid",
    "inspect_folder",
    "publish",
    "require_hub_access",
    "training_folder_info",
]

# The architectures a MAGE transformers folder may name in its config.json.
MODEL_CLASSES = ("MageForMaskedImageModeling", "MageModel", "MageForImageClassification", "MageVQModel")
PIPELINE_CLASSES = ("MageGenerationPipeline", "MageInpaintPipeline")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# Never uploaded: training checkpoints and logs, caches, per-step metrics, validation pictures, bytecode.
DEFAULT_EXCLUDES = (
    "checkpoint-*", "logs", "token_cache", "validation", "__pycache__", "*.egg-info", ".git", ".cache", "*.jsonl",
    "*.pyc",
)
PROVENANCE_FILES = ("training_args.json", "eval_results.json", "fid.json", "conversion.json", "evaluation.md")
EVALUATION_NOTES = "evaluation.md"
MAX_EVALUATION_NOTES = 64 * 1024  # characters: a report, not a dump
STAGING_MARKER = ".mage-hf-staging"  # marks a folder this module made, so that a rerun may replace it
SAMPLES_FILE = "samples.png"

PIPELINE_TAGS = {
    "MageForMaskedImageModeling": "unconditional-image-generation",
    "MageModel": "image-feature-extraction",
    "MageForImageClassification": "image-classification",
    "MageVQModel": "image-to-image",
}
MAGE_CODE_URL = "https://github.com/LTH14/mage"
MAGE_PAPER_URL = "https://arxiv.org/abs/2211.09117"
MAGE_AUTHORS = "Tianhong Li, Huiwen Chang, Shlok Kumar Mishra, Han Zhang, Dina Katabi and Dilip Krishnan"
CITATION = """@inproceedings{li2023mage,
  title={MAGE: MAsked Generative Encoder to Unify Representation Learning and Image Synthesis},
  author={Li, Tianhong and Chang, Huiwen and Mishra, Shlok Kumar and Zhang, Han and Katabi, Dina and Krishnan, Dilip},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2023}
}"""
# Training settings shown in the card, in this order (training/train_mage.py's argument names).
TRAINING_TABLE_KEYS = (
    "dataset_name", "train_data_dir", "class_column", "pretrained_model", "model_size", "resolution",
    "train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_train_steps", "learning_rate", "blr",
    "lr_warmup_steps", "weight_decay", "max_grad_norm", "mixed_precision", "contrastive_weight", "class_dropout_prob",
    "precompute_tokens", "seed",
)
# training_args.json keys that name the model a run continued from (train_mage: --pretrained_model).
BASE_MODEL_KEYS = ("pretrained_model", "pretrained_model_name_or_path", "model_name_or_path", "vq_model_name_or_path")
BASE_PROVENANCE_FILE = "base_provenance.json"
LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")  # the Hub's licence identifiers: apache-2.0, mit, cc-by-4.0, ...
# Argument names that hold credentials (`hub_token`, `token`, `api_key`, ...), not ones like `precompute_tokens`.
SECRET_KEY = re.compile(r"(?:^|_)(?:token|secret|password|api_key)$", re.IGNORECASE)


class PublishError(ValueError):
    """The folder cannot be published as it is; the message says what is wrong and what to do."""


class HubAccessError(ConnectionError):
    """The Hub cannot be used (offline mode, no network, no or a bad token). `offline` is True for offline mode."""

    def __init__(self, message: str, offline: bool = False):
        super().__init__(message)
        self.offline = offline


# ---------------------------------------------------------------------------------------------------------------
# Inspecting a folder
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FolderInfo:
    """What a MAGE folder is, as far as publishing it goes.

    Attributes:
        path: the folder.
        kind: `"pipeline"` (diffusers: `model_index.json`, `model/`, `scheduler/`) or `"model"` (transformers).
        class_name: the pipeline class (`MageGenerationPipeline`...) or the model's architecture (`MageModel`...).
        config: a summary of the model's configuration (widths, depths, resolution, token grid, codebook, classes).
        files: the files that would be uploaded, relative POSIX path -> size in bytes (exclusions applied).
        training_args / eval_results / fid / conversion: the provenance files' contents, when present.
        base_conversion: `conversion.json` of the local folder the model was trained from, when there is one (its
            weights then derive from the converted checkpoint's).
        final_loss: the last training loss, when known.
        evaluation_notes: the Markdown of `evaluation.md`, when present.
        loaded: whether `from_pretrained` was run on the folder and succeeded.
    """

    path: Path
    kind: str
    class_name: str
    config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    training_args: dict | None = None
    eval_results: dict | None = None
    fid: dict | None = None
    conversion: dict | None = None
    base_conversion: dict | None = None
    base_provenance: dict | None = None
    final_loss: float | None = None
    evaluation_notes: str | None = None
    loaded: bool = False

    @property
    def model_class(self) -> str:
        """The transformers class of the model (a pipeline's `model` component is a `MageForMaskedImageModeling`)."""
        return "MageForMaskedImageModeling" if self.kind == "pipeline" else self.class_name

    @property
    def can_generate(self) -> bool:
        """Whether `MageGenerationPipeline` can load the folder (a pipeline, or a masked-image-modeling model)."""
        return self.model_class == "MageForMaskedImageModeling"

    @property
    def pipeline_tag(self) -> str:
        """The Hub's task for this kind of folder."""
        return PIPELINE_TAGS[self.model_class]

    @property
    def model_subfolder(self) -> str | None:
        """Where transformers finds the model inside the folder: `"model"` for a pipeline, else the folder itself."""
        return "model" if self.kind == "pipeline" else None

    @property
    def from_official_weights(self) -> bool:
        """True when the weights are (or derive from) a converted original MAGE checkpoint."""
        return self.conversion is not None or self.base_conversion is not None

    @property
    def unknown_base(self) -> str | None:
        """The model this one was trained from when where its weights come from cannot be told (so the card cannot
        choose a licence for them), else None."""
        if self.from_official_weights or self.base_provenance is None:
            return None
        known = self.base_provenance.get("official_weights") is not None
        return None if known else str(self.base_provenance.get("base_model"))


def _excluded(name: str, patterns=DEFAULT_EXCLUDES) -> bool:
    return name == STAGING_MARKER or any(fnmatch(name, pattern) for pattern in patterns)


def _list_files(folder: Path) -> dict[str, int]:
    """Files under `folder` minus the exclusions, relative POSIX path -> size, sorted."""
    found = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _excluded(d))
        for name in sorted(names):
            if not _excluded(name):
                path = Path(root) / name
                found[path.relative_to(folder).as_posix()] = path.stat().st_size
    return found


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PublishError(f"{path} is not readable JSON ({error}); fix or delete it.") from None
    if not isinstance(data, dict):
        raise PublishError(f"{path} should hold a JSON object, not {type(data).__name__}; fix or delete it.")
    return data


def _config_summary(model_dir: Path, class_name: str) -> dict[str, Any]:
    """The key numbers of a model's config.json (read with the config classes, so that defaults apply)."""
    from .configuration_mage import MageConfig, MageVQConfig

    try:
        if class_name == "MageVQModel":
            vq = MageVQConfig.from_pretrained(model_dir)
            return {"codebook_size": vq.num_embeddings, "codebook_dim": vq.embed_dim, "resolution": vq.resolution,
                    "grid_size": vq.grid_size}
        config = MageConfig.from_pretrained(model_dir)
    except Exception as error:  # a config that does not parse is reported, not raised from deep in transformers
        raise PublishError(f"{model_dir / 'config.json'} is not a valid MAGE config ({_one_line(error)}).") from error
    summary = {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "codebook_size": config.codebook_size,
        "resolution": config.vq_config.resolution,
        "grid_size": config.vq_config.grid_size,
        "num_classes": int(config.num_classes),
    }
    if config.num_classes and sorted(config.id2label) == list(range(config.num_classes)):
        summary["class_names"] = [config.id2label[i] for i in range(config.num_classes)]  # named classes
    if class_name == "MageForMaskedImageModeling":
        summary["decoder_hidden_size"] = config.decoder_hidden_size
        summary["decoder_num_hidden_layers"] = config.decoder_num_hidden_layers
        if config.contrastive_projection_dim:
            summary["contrastive_projection_dim"] = int(config.contrastive_projection_dim)
    if class_name == "MageForImageClassification":
        summary["num_labels"] = config.num_labels
    return summary


def _read_base_provenance(info: FolderInfo) -> None:
    """`base_provenance.json` (written by the training scripts), else the base folder through its recorded path."""
    path = info.path / BASE_PROVENANCE_FILE
    if path.is_file():
        info.base_provenance = _read_json(path)
        conversion = info.base_provenance.get("conversion")
        official = info.base_provenance.get("official_weights") is True
        info.base_conversion = (conversion if isinstance(conversion, dict) else {}) if official else None
    elif _base_model_value(info.training_args or {}) is not None:
        # Folders written before that file: the recorded path is relative to where training ran, so it may not
        # resolve from here; then the base is unknown rather than assumed to be mage-hf's own.
        info.base_provenance = base_provenance(_base_model_value(info.training_args))
        info.base_conversion = info.base_provenance["conversion"] if info.base_provenance["official_weights"] else None


def _read_provenance(info: FolderInfo) -> None:
    """Fill the provenance fields of `info` from the files in its folder."""
    folder = info.path
    for name, attr in (("training_args.json", "training_args"), ("eval_results.json", "eval_results"),
                       ("fid.json", "fid"), ("conversion.json", "conversion")):
        if (folder / name).is_file():
            setattr(info, attr, _read_json(folder / name))
    _read_base_provenance(info)
    notes = folder / EVALUATION_NOTES
    if notes.is_file():
        try:
            text = notes.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as error:
            raise PublishError(
                f"{notes} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8."
            ) from None
        if len(text) > MAX_EVALUATION_NOTES:
            raise PublishError(f"{notes} is {len(text)} characters; the card takes at most {MAX_EVALUATION_NOTES}.")
        info.evaluation_notes = text or None
    metrics = folder / "metrics.jsonl"
    if info.final_loss is None and metrics.is_file():  # train_mage.py's per-step log: the last loss it recorded
        losses = []
        try:
            lines = metrics.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        for line in lines:
            try:  # line by line: a run killed mid-write leaves a truncated last line, which must not hide the rest
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)):
                losses.append(float(record["loss"]))
        info.final_loss = losses[-1] if losses else None


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def inspect_folder(folder: str | os.PathLike, load: bool = True) -> FolderInfo:
    """Check that `folder` can be published and describe it.

    It must be a diffusers MAGE pipeline folder (`model_index.json`, `model/`, `scheduler/`) or a transformers MAGE
    folder (`config.json` naming one of [`MODEL_CLASSES`]), hold its weights as `*.safetensors` and no pickle-format
    weights (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`, `*.pkl`; training checkpoints and the other [`DEFAULT_EXCLUDES`]
    are not looked at, since they are never uploaded), and, when `load` is True, load with `from_pretrained` with no
    weight left missing. Raises [`PublishError`] saying what is wrong and what to do.
    """
    path = Path(folder)
    if not path.exists():
        raise PublishError(f"{folder} does not exist. Pass the folder written by save_pretrained, `mage-hf convert` or "
                           "a training script.")
    if not path.is_dir():
        raise PublishError(f"{folder} is a file, not a folder. Pass the folder written by save_pretrained, "
                           "`mage-hf convert` or a training script.")
    files = _list_files(path)
    pickles = [name for name in files if any(fnmatch(Path(name).name, p) for p in PICKLE_PATTERNS)]
    if pickles:
        raise PublishError(
            f"{folder} holds pickle-format weights ({', '.join(pickles[:5])}{', ...' if len(pickles) > 5 else ''}); "
            "only safetensors are published. Re-save the model with save_pretrained (safetensors is the default; "
            "safe_serialization=True on older versions) or convert an original checkpoint with `mage-hf convert`, "
            "and delete the pickle files."
        )

    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        class_name = index.get("_class_name")
        if class_name not in PIPELINE_CLASSES:
            raise PublishError(
                f"{path / 'model_index.json'} describes a {class_name!r}, not a MAGE pipeline "
                f"({' or '.join(PIPELINE_CLASSES)}). Save one with MageGenerationPipeline.save_pretrained."
            )
        model_entry, scheduler_entry = index.get("model"), index.get("scheduler")
        if not (isinstance(model_entry, list) and model_entry[-1:] == ["MageForMaskedImageModeling"]
                and isinstance(scheduler_entry, list) and scheduler_entry[-1:] == ["MageScheduler"]):
            raise PublishError(f"{path / 'model_index.json'} does not list the components model "
                               "(MageForMaskedImageModeling) and scheduler (MageScheduler); re-save the pipeline with "
                               "MageGenerationPipeline.save_pretrained.")
        for component, config_name in (("model", "config.json"), ("scheduler", "scheduler_config.json")):
            if not (path / component / config_name).is_file():
                raise PublishError(f"{folder} is a pipeline folder without {component}/{config_name}; re-save the "
                                   "pipeline with MageGenerationPipeline.save_pretrained.")
        info = FolderInfo(path=path, kind="pipeline", class_name=class_name, files=files)
        info.config = _config_summary(path / "model", "MageForMaskedImageModeling")
    elif (path / "config.json").is_file():
        config = _read_json(path / "config.json")
        architectures = config.get("architectures") or []
        class_name = architectures[0] if architectures else None
        if class_name not in MODEL_CLASSES:
            raise PublishError(
                f"{path / 'config.json'} names architectures {architectures or 'none'}, not one of "
                f"{', '.join(MODEL_CLASSES)}. Save the model with its MAGE class's save_pretrained."
            )
        info = FolderInfo(path=path, kind="model", class_name=class_name, files=files)
        info.config = _config_summary(path, class_name)
    else:
        raise PublishError(
            f"{folder} is neither a diffusers MAGE pipeline folder (model_index.json with model/ and scheduler/) nor "
            "a transformers MAGE folder (config.json). Pass the folder written by save_pretrained, `mage-hf convert` "
            "or a training script."
        )
    if not any(name.endswith(".safetensors") for name in files):
        raise PublishError(f"{folder} has no *.safetensors weights. Save the model with save_pretrained (it writes "
                           "model.safetensors) and publish that folder.")
    _read_provenance(info)
    if load:
        _check_loads(info)
    return info


def _check_loads(info: FolderInfo) -> None:
    """Load the folder with `from_pretrained` (the model with `output_loading_info`, then the pipeline around it)."""
    import mage_hf
    from mage_hf.modeling_mage import random_weights

    path = info.path
    try:
        if info.kind == "pipeline":
            model_class = mage_hf.MageForMaskedImageModeling
            model, loading = model_class.from_pretrained(path / "model", output_loading_info=True)
            getattr(mage_hf, info.class_name).from_pretrained(path, model=model)
        else:
            model, loading = getattr(mage_hf, info.class_name).from_pretrained(path, output_loading_info=True)
    except Exception as error:  # whatever from_pretrained raises, the folder cannot be published
        raise PublishError(
            f"{path} would not load: {type(error).__name__}: {_one_line(error)}. Re-save it with save_pretrained "
            "(or convert the checkpoint again)."
        ) from error
    missing = random_weights(loading)
    if missing:
        raise PublishError(
            f"{path} would not load: {len(missing)} weights are missing from its safetensors or have the wrong shape "
            f"(e.g. {', '.join(missing[:3])}), so they would be random. Re-save it with save_pretrained."
        )
    info.loaded = True


def _hub_id(value: Any) -> str | None:
    """`value` when it reads as a Hub repo id and is not a local path, else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(value, str) or not value or value.startswith((".", "/", "~")) or "\\" in value:
        return None
    if os.path.exists(value):
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return None
    return value


def _base_model_value(training_args: dict) -> str | None:
    for key in BASE_MODEL_KEYS:
        if isinstance(training_args.get(key), str) and training_args[key]:
            return training_args[key]
    return None


_ABSENT = object()  # a file the base folder or repo does not have (as opposed to one that could not be checked)


def _read_base_file(base: str, name: str):
    """`name` of the local folder or Hub repo `base`, parsed: a dict, `_ABSENT`, or None when it cannot be checked
    (offline and not cached, network errors, an unreadable file)."""
    folder = Path(base).expanduser()
    if folder.is_dir():
        path = folder / name
        if not path.is_file():
            return _ABSENT
    else:
        if _hub_id(base) is None:
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(hf_hub_download(base, name))
        except EntryNotFoundError:
            return _ABSENT
        except Exception:  # offline without a cached copy, no access, network errors: unknown
            return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def base_provenance(base: str) -> dict:
    """What the weights of `base` (the folder or Hub repo a training run starts from) derive from, for the model card
    of the run's output: `{"base_model", "official_weights", "conversion"}`. `official_weights` is True when `base`
    is (or derives from) a converted original MAGE checkpoint, whose `conversion.json` is then `conversion`; False
    when it was trained from scratch with mage-hf; None when that cannot be told (the card then needs a licence)."""
    record = {"base_model": _hub_id(base) or Path(base).name, "official_weights": None, "conversion": None}
    conversion = _read_base_file(base, "conversion.json")
    if isinstance(conversion, dict):
        return {**record, "official_weights": True, "conversion": conversion}
    inherited = _read_base_file(base, BASE_PROVENANCE_FILE) if conversion is _ABSENT else None
    if isinstance(inherited, dict):
        return {**record, "official_weights": inherited.get("official_weights"),
                "conversion": inherited.get("conversion")}
    args = _read_base_file(base, "training_args.json") if inherited is _ABSENT else None
    if isinstance(args, dict) and _base_model_value(args) is None:
        record["official_weights"] = False  # trained from scratch by mage-hf's scripts
    return record


def write_base_provenance(output_dir: str | os.PathLike, base: str) -> dict:
    """Record [`base_provenance`] of `base` as `base_provenance.json` in `output_dir` (the training scripts call this
    when they start from a folder), so that the card of the output knows where its weights come from wherever
    `mage-hf push` is run."""
    record = base_provenance(base)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / BASE_PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def training_folder_info(folder: str | os.PathLike, training_args: dict | None = None,
                         final_loss: float | None = None) -> FolderInfo:
    """A [`FolderInfo`] for a training output folder, without checking or loading its weights (they may not be
    written yet): the class comes from `config.json` when it is there (else `MageForMaskedImageModeling`, what
    training/train_mage.py writes), the provenance from the files present, `training_args` from the argument."""
    path = Path(folder)
    info = FolderInfo(path=path, kind="model", class_name="MageForMaskedImageModeling", final_loss=final_loss)
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            architectures = json.loads(config_file.read_text()).get("architectures") or []
        except (OSError, json.JSONDecodeError):
            architectures = []
        if architectures and architectures[0] in MODEL_CLASSES:
            info.class_name = architectures[0]
        try:
            info.config = _config_summary(path, info.class_name)
        except PublishError:
            info.config = {}
    if path.is_dir():
        info.files = _list_files(path)
        _read_provenance(info)
    if training_args is not None:
        info.training_args = dict(training_args)
        _read_base_provenance(info)
    return info


# ---------------------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------------------


def _dataset(info: FolderInfo) -> tuple[str | None, str | None]:
    """(Hub dataset id or None, a human-readable name of the training data or None)."""
    args = info.training_args or {}
    for source in (args, info.eval_results or {}):
        name = source.get("dataset_name") or source.get("dataset")
        if name:
            hub = _hub_id(name)
            return hub, hub or f"local dataset `{Path(str(name)).name}`"
    if args.get("train_data_dir"):
        return None, f"local image folder `{Path(str(args['train_data_dir'])).name}`"
    return None, None


def _eval_results(info: FolderInfo, model_name: str) -> list:
    from huggingface_hub import EvalResult

    dataset_id, dataset_label = _dataset(info)
    results = []
    if info.eval_results and isinstance(info.eval_results.get("top1"), (int, float)):
        ev = info.eval_results
        mode = str(ev.get("mode", "evaluation")).replace("_", " ")
        count = ev.get("num_validation_images")
        results.append(EvalResult(
            task_type="image-classification", task_name="Image Classification",
            dataset_type=dataset_id or "custom",
            dataset_name=(dataset_label or "held-out images") + (f" ({count} held-out images)" if count else ""),
            dataset_split="validation", metric_type="accuracy", metric_name=f"Top-1 accuracy (%, {mode})",
            metric_value=round(float(ev["top1"]), 4),
        ))
    if info.fid and isinstance(info.fid.get("frechet_inception_distance"), (int, float)):
        fid = info.fid
        reference = fid.get("reference") if isinstance(fid.get("reference"), dict) else {}
        samples = fid.get("samples") if isinstance(fid.get("samples"), dict) else {}
        ref_name = Path(str(reference.get("folder", ""))).name or dataset_label or "reference images"
        ref_count = reference.get("num_images")
        sample_count = samples.get("num_images")
        common = {
            "task_type": "unconditional-image-generation", "task_name": "Image Generation",
            "dataset_type": dataset_id or "custom",
            "dataset_name": f"{ref_name}" + (f" ({ref_count} reference images)" if ref_count else ""),
        }
        suffix = f" ({sample_count} samples)" if sample_count else ""
        results.append(EvalResult(**common, metric_type="fid", metric_name="FID" + suffix,
                                  metric_value=round(float(fid["frechet_inception_distance"]), 4)))
        if isinstance(fid.get("inception_score_mean"), (int, float)):
            results.append(EvalResult(**common, metric_type="inception_score", metric_name="Inception Score" + suffix,
                                      metric_value=round(float(fid["inception_score_mean"]), 4)))
    return results


def check_license(license: str | None, info: FolderInfo | None = None) -> None:
    """Raise a [`PublishError`] unless `license` is a Hub licence identifier that fits the folder: `other` stands for
    the MAGE authors' terms, so it is only for weights that derive from their checkpoints."""
    if license is None:
        return
    if not LICENSE_ID.match(license):
        raise PublishError(
            f"--license {license!r} is not a Hub licence identifier (lower case, e.g. mit, apache-2.0, cc-by-4.0; "
            "see https://huggingface.co/docs/hub/repositories-licenses)."
        )
    if license == "other" and info is not None and not info.from_official_weights:
        raise PublishError(
            "--license other is for weights that derive from the MAGE authors' checkpoints (their terms apply); these "
            "do not. Give the Hub licence id of your weights, e.g. --license apache-2.0."
        )


def _license_fields(info: FolderInfo, license: str | None) -> dict[str, str]:
    check_license(license, info)
    if license is not None and license != "other":
        return {"license": license}
    if info.from_official_weights:
        return {"license": "other", "license_name": "mage-weights", "license_link": MAGE_CODE_URL}
    if info.unknown_base is not None:
        raise PublishError(
            f"These weights were trained from {info.unknown_base}, and mage-hf cannot tell where that model's weights "
            "come from (a converted MAGE checkpoint, whose authors' terms would apply, or not): pass --license with "
            "the licence that applies."
        )
    return {"license": "mit"}


def _tags(info: FolderInfo) -> list[str]:
    tags = ["mage", "mage-hf", "masked-image-modeling", "transformers"]
    if info.can_generate:
        tags += ["diffusers", "image-generation", "inpainting", "outpainting"]
        if info.config.get("num_classes"):
            tags.append("class-conditional")
    elif info.model_class == "MageModel":
        tags.append("feature-extraction")
    elif info.model_class == "MageForImageClassification":
        tags.append("image-classification")
    else:
        tags += ["vqgan", "image-tokenizer"]
    return tags


def _code(language: str, lines: list[str]) -> list[str]:
    return [f"```{language}", *lines, "```", ""]


def _usage(info: FolderInfo, repo: str) -> list[str]:
    """The usage section: transformers, diffusers and the command line, for what this kind of folder supports."""
    cfg = info.config
    size = cfg.get("resolution", 256)
    sub = f', subfolder="{info.model_subfolder}"' if info.model_subfolder else ""
    has_processor = "preprocessor_config.json" in info.files
    if has_processor:
        processor_line = f'processor = AutoImageProcessor.from_pretrained("{repo}")'
    else:
        processor_line = (f'processor = MageImageProcessor(size={{"shortest_edge": {size}}}, '
                          f'crop_size={{"height": {size}, "width": {size}}})')
    processor_import = "AutoImageProcessor" if has_processor else None
    out = [
        "## Usage", "",
        ("The model classes, pipelines and the `mage-hf` command come from the `mage-hf` package (module "
         "`mage_hf`): install it, then `import mage_hf` registers the MAGE classes with transformers' `Auto*` "
         "factories and pipelines."), "",
    ]
    # (a) transformers
    out += ["### transformers", ""]
    cls = info.model_class
    grid = cfg.get("grid_size", 16)
    if cls == "MageVQModel":
        out += _code("python", [
            "import torch",
            "import mage_hf  # registers the MAGE classes with transformers",
            "from mage_hf import MageImageProcessor",
            "from PIL import Image",
            "from transformers import AutoModel",
            "",
            f'vq = AutoModel.from_pretrained("{repo}").eval()  # MageVQModel',
            processor_line,
            'pixel_values = processor(Image.open("photo.png"), return_tensors="pt").pixel_values',
            "with torch.no_grad():",
            f"    token_ids = vq.encode(pixel_values).token_ids  # (1, {grid}, {grid}) codebook ids",
            "    reconstruction = vq.decode(token_ids).clamp(0, 1)  # (1, 3, H, W) in [0, 1]",
        ])
    elif cls == "MageForImageClassification":
        out += _code("python", [
            "import mage_hf  # registers the MAGE classes with transformers",
            *([] if has_processor else ["from mage_hf import MageImageProcessor"]),
            "from transformers import AutoModelForImageClassification, pipeline",
            "",
            *([] if has_processor else [processor_line]),
            (f'classifier = pipeline("image-classification", model="{repo}")' if has_processor else
             f'classifier = pipeline("image-classification", model="{repo}", image_processor=processor)'),
            'print(classifier("photo.png", top_k=3))',
            f'model = AutoModelForImageClassification.from_pretrained("{repo}")  # MageForImageClassification',
        ])
    else:
        imports = ", ".join(n for n in (processor_import, "AutoModel", "AutoModelForMaskedImageModeling"
                                        if cls == "MageForMaskedImageModeling" else None) if n)
        lines = [
            "import torch",
            "import mage_hf  # registers the MAGE classes with transformers",
            *([] if has_processor else ["from mage_hf import MageImageProcessor"]),
            "from PIL import Image",
            f"from transformers import {imports}",
            "",
            f'encoder = AutoModel.from_pretrained("{repo}"{sub}).eval()  # MageModel: encoder and tokenizer',
            processor_line,
            'inputs = processor(Image.open("photo.png"), return_tensors="pt")',
            "with torch.no_grad():",
            "    features = encoder(**inputs).pooler_output  # (1, hidden size)",
        ]
        if cls == "MageForMaskedImageModeling":
            lines += ["", f'model = AutoModelForMaskedImageModeling.from_pretrained("{repo}"{sub})  # MAGE + decoder']
        out += _code("python", lines)
    # (b) diffusers
    if info.can_generate:
        conditional = cfg.get("num_classes", 0) > 0
        lines = [
            "import torch",
            "from PIL import Image",
            "from mage_hf import MageGenerationPipeline, MageInpaintPipeline",
            "",
            f'pipe = MageGenerationPipeline.from_pretrained("{repo}")  # .to("cuda") on a GPU',
            "images = pipe(num_images=4, generator=torch.Generator().manual_seed(0)).images",
        ]
        if conditional:
            if cfg.get("class_names"):
                label, comment = json.dumps(cfg["class_names"][0]), "a class name (config.id2label) or id"
            else:
                label, comment = "0", "class 0"
            lines.append(f"images = pipe(num_images=4, class_labels={label}, guidance_scale=2.0, "
                         f"generator=torch.Generator().manual_seed(0)).images  # {comment}")
        lines += [
            "",
            f'inpaint = MageInpaintPipeline.from_pretrained("{repo}")',
            f'image = Image.open("photo.png").convert("RGB")  # square; resized to {size} px',
            'mask = Image.new("L", image.size, 0)',
            "mask.paste(255, (0, 0, image.width // 2, image.height))  # white = regenerate",
            "seed = torch.Generator().manual_seed(0)",
            "filled = inpaint(image, mask_image=mask, paste_back=True, generator=seed).images[0]",
            'wider = inpaint.outpaint(image, direction="right", amount=0.25, generator=seed).images[0]',
        ]
        out += ["### diffusers", ""] + _code("python", lines)
        box = f"{size // 4},{size // 4},{3 * size // 4},{3 * size // 4}"
        out += ["### Command line", ""] + _code("bash", [
            f"mage-hf generate --model {repo} --num-images 8 --output samples/",
            f"mage-hf inpaint --model {repo} --image photo.png --box {box} --paste-back --output inpainted/",
            f"mage-hf outpaint --model {repo} --image photo.png --direction right --amount 0.25 --output outpainted/",
        ])
    elif cls == "MageModel":
        out += ["### Command line", ""] + _code("bash", [
            f"mage-hf features --model {repo} photo.png other.png --output features.safetensors",
        ])
    return out


def _provenance(info: FolderInfo) -> list[str]:
    out = []
    conv = info.conversion
    if conv:
        checkpoint = conv.get("checkpoint", "unknown")
        out += ["## Provenance", "",
                (f"Converted with `mage-hf convert` (mage-hf {conv.get('mage_hf_version', '?')}) from the original "
                 f"MAGE checkpoint `{checkpoint}`:"), "",
                "| | |", "| --- | --- |",
                f"| checkpoint | `{checkpoint}` |",
                f"| sha256 | `{conv.get('sha256', 'unknown')}` |",
                f"| kind | {conv.get('kind', 'unknown')} |"]
        if conv.get("vqgan_checkpoint"):
            out.append(f"| tokenizer checkpoint | `{conv['vqgan_checkpoint']}` (sha256 `{conv.get('vqgan_sha256')}`) |")
        if "mapped_tensors" in conv:
            diff = conv.get("max_abs_diff", 0.0)
            out.append(f"| tensors mapped | {conv['mapped_tensors']} (max difference from the source {diff:g}) |")
        out.append("")
    args = info.training_args
    if args:
        out += ["## Training", "",
                "Trained with mage-hf's `training/train_mage.py`; the full arguments are in `training_args.json`.", "",
                "| setting | value |", "| --- | --- |"]
        for key in TRAINING_TABLE_KEYS:
            value = args.get(key)
            if value is None or (key == "num_train_epochs" and args.get("max_train_steps") is not None):
                continue  # (--max_train_steps overrides --num_train_epochs: its default would mislead)
            if key in ("dataset_name", "train_data_dir", "pretrained_model") and not _hub_id(value):
                value = f"local folder `{Path(str(value)).name}`"
            out.append(f"| {key} | {value} |")
        out.append("")
        if info.base_conversion:
            base = info.base_conversion
            out += [(f"It continued from a folder converted from the original checkpoint "
                     f"`{base.get('checkpoint', 'unknown')}` (sha256 `{base.get('sha256', 'unknown')}`)."), ""]
    if info.final_loss is not None:
        if not args:
            out += ["## Training", ""]
        out += [f"Final training loss: {info.final_loss:.4f}.", ""]
    return out


def _evaluation(info: FolderInfo) -> list[str]:
    lines = []
    ev = info.eval_results
    if ev and isinstance(ev.get("top1"), (int, float)):
        mode = str(ev.get("mode", "evaluation")).replace("_", " ")
        detail = ", ".join(x for x in (
            f"{ev['num_validation_images']} held-out images" if ev.get("num_validation_images") else "",
            f"step {ev['step']}" if ev.get("step") is not None else "") if x)
        lines.append(f"- Top-1 accuracy ({mode}): **{float(ev['top1']):.2f}%**" + (f" ({detail})" if detail else "")
                     + ", from `eval_results.json` (training/train_classifier.py).")
    fid = info.fid
    if fid and isinstance(fid.get("frechet_inception_distance"), (int, float)):
        samples = fid.get("samples") if isinstance(fid.get("samples"), dict) else {}
        reference = fid.get("reference") if isinstance(fid.get("reference"), dict) else {}
        line = f"- FID: **{float(fid['frechet_inception_distance']):.2f}**"
        if isinstance(fid.get("inception_score_mean"), (int, float)):
            line += f", Inception Score **{float(fid['inception_score_mean']):.2f}**"
            if isinstance(fid.get("inception_score_std"), (int, float)):
                line += f" ± {float(fid['inception_score_std']):.2f}"
        counts = [f"{samples['num_images']} samples" if samples.get("num_images") else "",
                  f"{reference['num_images']} reference images" if reference.get("num_images") else ""]
        if any(counts):
            line += f" ({' vs '.join(c for c in counts if c)})"
        lines.append(line + ", from `fid.json` (pipelines/evaluate_fid.py).")
        if samples.get("num_images") and samples["num_images"] < 50_000:
            lines.append("  With fewer than 50,000 samples FID is biased upwards: not comparable to published numbers.")
        if fid.get("official_inception_weights") is False:
            lines.append("  Computed with unofficial Inception weights: not comparable to published numbers.")
    if info.evaluation_notes:
        lines += ([""] if lines else []) + [info.evaluation_notes]
    return ["## Evaluation", "", *lines, ""] if lines else []


def _licence_text(info: FolderInfo, fields: dict[str, str], explicit: bool) -> list[str]:
    out = ["## Licence and attribution", ""]
    if fields["license"] == "other" and info.from_official_weights:
        source = info.conversion or info.base_conversion or {}
        how = "are" if info.conversion else "derive from"
        out.append(
            f"The weights {how} the MAGE authors' ({MAGE_AUTHORS}; MAGE, CVPR 2023), from their released checkpoint "
            f"`{source.get('checkpoint', 'unknown')}`: their terms at [LTH14/mage]({MAGE_CODE_URL}) apply "
            "(`license: other`, `license_name: mage-weights`). The conversion code, mage-hf, is MIT licensed."
        )
    elif explicit:
        out.append(f"The weights are released under `{fields['license']}`. mage-hf and MAGE's reference code "
                   f"([LTH14/mage]({MAGE_CODE_URL})) are MIT licensed.")
    else:
        trained = "were trained with mage-hf and " if info.training_args else ""
        out.append(f"The weights {trained}are released under the MIT licence. mage-hf and MAGE's reference code "
                   f"([LTH14/mage]({MAGE_CODE_URL}), by {MAGE_AUTHORS}) are MIT licensed.")
    out += ["", "MAGE is the work of Li et al.; please cite the paper:", ""]
    return out


def build_model_card(info: FolderInfo, repo_id: str | None = None, sample_grid: str | os.PathLike | None = None,
                     license: str | None = None, sample_settings: dict | None = None, title: str | None = None,
                     dataset_description: str | None = None) -> ModelCard:
    """The model card (`README.md`) of a MAGE folder, as a `huggingface_hub.ModelCard`.

    Args:
        info: from [`inspect_folder`] or [`training_folder_info`] (nothing is loaded here).
        repo_id: the Hub repo the card is for; the usage snippets load it. Without it they use the folder's path.
        sample_grid: file name of a sample grid saved beside the card (shown with `![samples](...)`).
        license: a Hub licence id to use instead of the default: `mit` for folders trained with mage-hf, `other`
            (`license_name: mage-weights`, linking to LTH14/mage) for the converted original MAGE weights and
            models trained from them.
        sample_settings: how the grid was made (`num_images`, `steps`, `seed`), for its caption.
        title: the card's heading (default: the repo id, or the folder's name).
        dataset_description: how the card names the training data (default: the Hub dataset id, or "local dataset
            `<folder name>`" from the recorded training arguments).

    Metadata: `license`, `library_name: mage-hf`, `pipeline_tag`, `tags`, `datasets` and `base_model` (when the
    training arguments name Hub repos) and `model-index` evaluation results (from `eval_results.json` and
    `fid.json`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    repo = repo_id or str(info.path)
    name = (repo_id or info.path.resolve().name).split("/")[-1]
    fields = _license_fields(info, license)
    dataset_id, dataset_label = _dataset(info)
    dataset_label = dataset_description or dataset_label
    base = _hub_id(_base_model_value(info.training_args or {}))
    eval_results = _eval_results(info, name)
    data = ModelCardData(
        **fields,
        library_name="mage-hf",
        pipeline_tag=info.pipeline_tag,
        tags=_tags(info),
        datasets=[dataset_id] if dataset_id else None,
        base_model=base,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )

    cfg = info.config
    what = {
        "MageForMaskedImageModeling": "image generation, inpainting, outpainting and image features",
        "MageModel": "image features (the encoder alone)",
        "MageForImageClassification": f"image classification ({cfg.get('num_labels', '?')} classes)",
        "MageVQModel": "image tokenization: the MaskGIT VQGAN that MAGE uses to turn images into tokens and back",
    }[info.model_class]
    if info.can_generate:
        what = ("class-conditional " if cfg.get("num_classes") else "unconditional ") + what
    packaging = ("a diffusers pipeline folder (`model/` + `scheduler/`, for `MageGenerationPipeline` and "
                 "`MageInpaintPipeline`)" if info.kind == "pipeline" else f"a transformers `{info.class_name}` folder")
    if info.model_class == "MageVQModel":
        shape = (f"It maps {cfg.get('resolution')}x{cfg.get('resolution')} images to a {cfg.get('grid_size')}x"
                 f"{cfg.get('grid_size')} grid of ids into a {cfg.get('codebook_size')}-entry codebook.")
    else:
        shape = (f"A ViT ({cfg.get('num_hidden_layers')} layers, width {cfg.get('hidden_size')}) over the "
                 f"{cfg.get('grid_size')}x{cfg.get('grid_size')} tokens of {cfg.get('resolution')}x"
                 f"{cfg.get('resolution')} images from a MaskGIT VQGAN tokenizer ({cfg.get('codebook_size')}-entry "
                 "codebook) stored inside the model.") if cfg else ""
    if info.conversion:
        origin = f"Converted from the original MAGE checkpoint `{info.conversion.get('checkpoint', 'unknown')}`."
    elif info.training_args:
        origin = (f"Trained with mage-hf's `training/train_mage.py` on {dataset_label or 'an unrecorded dataset'}"
                  + (" (class-conditional)" if info.training_args.get("class_column") else "") + ".")
    else:
        origin = ""
    intro = (f"[MAGE]({MAGE_PAPER_URL}) (MAsked Generative Encoder, Li et al., CVPR 2023) for {what}, packaged "
             f"as {packaging} for mage-hf.")
    classes = ("Its classes (`class_labels=`, by id or name): "
               + ", ".join(f"{i} {name}" for i, name in enumerate(cfg["class_names"])) + "."
               ) if info.can_generate and cfg.get("class_names") else ""
    lines = [f"# {title or repo_id or info.path.resolve().name}", "",
             " ".join(x for x in (intro, shape, origin, classes) if x), ""]
    lines += _usage(info, repo)
    if sample_grid is not None:
        settings = sample_settings or {}
        caption = "Samples"
        if settings:
            count, steps, seed = settings.get("num_images"), settings.get("steps"), settings.get("seed", 0)
            caption = (f"{count} samples, {steps} decoding steps, one `torch.Generator().manual_seed({seed} + i)` per "
                       "image" + (", classes 0, 1, 2, ..." if cfg.get("num_classes") else "") + ", made by "
                       "`mage-hf push`.")
        lines += ["## Samples", "", f"![samples]({Path(sample_grid).name})", "", caption, ""]
    lines += _provenance(info)
    lines += _evaluation(info)
    lines += _licence_text(info, fields, explicit=license is not None)
    lines += _code("bibtex", CITATION.splitlines())
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------


def generate_sample_grid(folder: str | os.PathLike, num_images: int = 8, steps: int = 12, seed: int = 0,
                         device: str | None = None) -> PIL.Image.Image:
    """Generate `num_images` images with [`MageGenerationPipeline`] loaded from `folder` (a pipeline folder or a
    bare model folder), `steps` decoding steps, image `i` from `torch.Generator().manual_seed(seed + i)` (classes
    `i % num_classes` for class-conditional models), in float32 on CUDA when available else the CPU; return them
    as a grid of up to 4 columns (a short last row is padded with white)."""
    import torch
    from diffusers.utils import make_image_grid

    from .pipeline_mage import MageGenerationPipeline

    if num_images < 1 or steps < 1:
        raise ValueError(f"num_images and steps must be positive, got {num_images} and {steps}.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = MageGenerationPipeline.from_pretrained(folder, dtype=torch.float32).to(device)
    num_classes = int(pipe.model.config.num_classes)
    images = pipe(
        num_images=num_images,
        num_inference_steps=steps,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(num_images)],
        class_labels=[i % num_classes for i in range(num_images)] if num_classes else None,
    ).images
    cols = min(num_images, 4)
    rows = math.ceil(num_images / cols)
    blank = images[0].copy().point(lambda _: 255)
    return make_image_grid(images + [blank] * (rows * cols - num_images), rows=rows, cols=cols)


# ---------------------------------------------------------------------------------------------------------------
# Hub access
# ---------------------------------------------------------------------------------------------------------------


def require_hub_access(token: str | None = None, api: HfApi | None = None) -> dict:
    """Fail fast when nothing can be uploaded: offline mode (`HF_HUB_OFFLINE`), the Hub unreachable, or no valid
    token. Creates nothing. Returns `whoami`'s answer; raises [`HubAccessError`] with what to do."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import LocalTokenNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise HubAccessError(
            "cannot reach the Hub: HF_HUB_OFFLINE is set (offline mode), so nothing can be uploaded. Run with "
            "--dry-run to write the folder locally, or unset HF_HUB_OFFLINE.",
            offline=True,
        )
    api = api or HfApi(token=token)
    try:
        return api.whoami(token=token)
    except LocalTokenNotFoundError:
        raise HubAccessError(
            "not logged in to the Hugging Face Hub: run `hf auth login` or pass --token (or run with --dry-run to "
            "write the folder locally)."
        ) from None
    except Exception as error:  # connection errors, 401s...: all mean the upload would fail
        raise HubAccessError(
            f"cannot reach the Hub or use the token ({type(error).__name__}: {_one_line(error, 200)}). Run with "
            "--dry-run to write the folder locally, or check the network and log in with `hf auth login` (or pass "
            "--token)."
        ) from error


# ---------------------------------------------------------------------------------------------------------------
# Staging and upload
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PublishResult:
    """What [`publish`] did: the staging folder and its files, the target, and the URLs of a real push."""

    staging: Path
    files: dict[str, int]
    repo_id: str
    repo_type: str
    revision: str | None
    private: bool
    create_pr: bool
    dry_run: bool
    info: FolderInfo | None = None
    samples: Path | None = None
    url: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    space_variables: dict[str, str] = field(default_factory=dict)


def _staging_path(folder: Path, output: str | os.PathLike | None) -> Path:
    staging = Path(output) if output is not None else folder.resolve().parent / f"{folder.resolve().name}-hub"
    source, target = folder.resolve(), staging.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise PublishError(f"the staging folder {staging} must be outside {folder} (and not contain it); pass another "
                           "--output.")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / STAGING_MARKER).exists())):
        raise PublishError(f"--output {staging} already exists and was not made by `mage-hf push`; pass a new or "
                           "empty folder, or remove it.")
    return staging


def _fresh_staging(staging: Path) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / STAGING_MARKER).write_text("Made by `mage-hf push`; replaced on the next push. Not uploaded.\n")


def _copy_files(source: Path, staging: Path, files: dict[str, int], skip: tuple[str, ...] = ()) -> None:
    """Copy `files` (relative paths) from `source` into `staging`; `training_args.json` loses any secret."""
    for rel in files:
        if rel in skip:
            continue
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel == "training_args.json":  # train_mage.py records --hub_token with the other arguments
            args = _read_json(source / rel)
            clean = {k: v for k, v in args.items() if not (SECRET_KEY.search(k) and v not in (None, False))}
            target.write_text(json.dumps(clean, indent=2) + "\n")
        else:
            shutil.copy2(source / rel, target)


def _validate_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"--repo-id {repo_id!r} is not a valid repo id ({error}); use ORG/NAME.") from None
    if "/" not in repo_id:
        raise PublishError(f"--repo-id {repo_id!r} needs its namespace: ORG/NAME (your user name or an organisation).")


def _stage_space(folder: Path, staging: Path, model: str | None, license: str | None) -> None:
    """Copy the Space folder and the `mage_hf` package (as `mage_hf/`) into `staging`; point the card at `model`."""
    from huggingface_hub import SpaceCard

    import mage_hf

    files = {k: v for k, v in _list_files(folder).items() if not k.startswith("mage_hf/")}
    _copy_files(folder, staging, files)
    package = Path(mage_hf.__file__).resolve().parent
    _copy_files(package, staging / "mage_hf", _list_files(package))
    card = SpaceCard.load(staging / "README.md")
    if model is not None:
        card.data.models = [model]
    if license is not None:
        card.data.license = license
    card.save(staging / "README.md")


def _inspect_space(folder: Path) -> dict:
    """Check the Space folder (README.md front matter with `sdk`, the app file); return the front matter."""
    from huggingface_hub import SpaceCard

    if not folder.is_dir():
        raise PublishError(f"{folder} does not exist or is not a folder. With --space, pass the Space folder (the "
                           "repository's space/, with app.py, requirements.txt and README.md).")
    readme = folder / "README.md"
    if not readme.is_file():
        raise PublishError(f"{folder} has no README.md; a Space needs one whose front matter says `sdk: gradio` and "
                           "`app_file: app.py`.")
    try:
        data = SpaceCard.load(readme).data.to_dict()
    except Exception as error:  # YAML errors, a front matter that is not a mapping...
        raise PublishError(f"{readme}'s front matter does not parse ({_one_line(error)}).") from error
    if data.get("sdk") != "gradio":
        raise PublishError(f"{readme}'s front matter has sdk {data.get('sdk')!r}; this command publishes Gradio "
                           "Spaces: set `sdk: gradio`.")
    app_file = data.get("app_file", "app.py")
    if not (folder / app_file).is_file():
        raise PublishError(f"{folder} has no {app_file} (the front matter's app_file).")
    if not (folder / "requirements.txt").is_file():
        raise PublishError(f"{folder} has no requirements.txt; the Space needs one listing torch, transformers, "
                           "diffusers... (mage_hf itself is copied beside app.py).")
    try:
        compile((folder / app_file).read_text(), str(folder / app_file), "exec")
    except SyntaxError as error:
        raise PublishError(f"{folder / app_file} does not compile: {error}.") from None
    return data


def publish(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    dry_run: bool,
    output: str | os.PathLike | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    license: str | None = None,
    samples: int = 8,
    steps: int = 12,
    seed: int = 0,
    replace_readme: bool = False,
    token: str | None = None,
    space: bool = False,
    model: str | None = None,
    log: Callable[[str], None] | None = None,
) -> PublishResult:
    """Stage `folder` for the Hub and, unless `dry_run`, upload it to `repo_id`.

    The folder is checked ([`inspect_folder`]), copied to the staging folder (`output`, default `<folder>-hub`
    beside it) without [`DEFAULT_EXCLUDES`], with a model card ([`build_model_card`]) and, for generation models,
    a grid of `samples` images (`steps` decoding steps, seeds `seed + i`) as `samples.png`; the staging folder is
    then checked to load with `from_pretrained` too. A real push first checks that the Hub can be reached
    ([`require_hub_access`], before any slow work), then creates the repo (`exist_ok`), the branch `revision` when
    given, and uploads the staging folder (as a pull request with `create_pr`).

    With `space=True`, `folder` is the Gradio Space folder (`app.py`, `requirements.txt`, `README.md`): it is
    staged with a copy of the `mage_hf` package beside it, `model` (a Hub repo id) becomes the front matter's
    `models` list and, on a real push, the Space variable `MAGE_MODEL`.

    Raises [`PublishError`] (a `ValueError`) for folder problems and [`HubAccessError`] (a `ConnectionError`) when
    the Hub cannot be used; `log` receives progress messages.
    """
    log = log or (lambda message: None)
    folder = Path(folder)
    _validate_repo_id(repo_id)
    if samples < 0 or steps < 1:
        raise PublishError(f"--samples must be >= 0 and --steps >= 1, got {samples} and {steps}.")
    if not 0 <= seed <= 2**63 - 1 - samples:  # image i is seeded seed + i (torch.Generator.manual_seed's range)
        raise PublishError(f"--seed must be between 0 and {2**63 - 1 - samples} for {samples} samples, got {seed}.")
    if model is not None and not space:
        raise PublishError("--model only applies with --space (it names the model the Space serves).")
    repo_type = "space" if space else "model"
    revision = revision or None

    # 1. Cheap checks first, then the Hub (before anything slow), then the load check.
    if space:
        _inspect_space(folder)
        check_license(license)
        if model is not None and not _hub_id(model):
            raise PublishError(f"--model {model!r} is not a Hub repo id (ORG/NAME); a Space loads its model from "
                               "the Hub, so push the model first.")
        info = None
    else:
        info = inspect_folder(folder, load=False)
        _license_fields(info, license)  # a licence that does not fit, or one that is needed, before any slow work
        _check_own_readme(folder, replace_readme)
    staging = _staging_path(folder, output)
    api = None
    if not dry_run:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        log("Checking access to the Hub...")
        require_hub_access(token, api)
    if info is not None:
        log(f"Loading {folder} to check it...")
        _check_loads(info)

    # 2. Stage.
    _fresh_staging(staging)
    samples_path = None
    if space:
        _stage_space(folder, staging, model, license)
    else:
        _copy_files(folder, staging, info.files, skip=("README.md",))
        settings = None
        if info.can_generate and samples > 0:
            log(f"Generating {samples} samples ({steps} steps)...")
            grid = generate_sample_grid(folder, num_images=samples, steps=steps, seed=seed)
            samples_path = staging / SAMPLES_FILE
            grid.save(samples_path)
            settings = {"num_images": samples, "steps": steps, "seed": seed}
        elif (staging / SAMPLES_FILE).is_file():
            samples_path = staging / SAMPLES_FILE  # the folder's own grid, copied
        card = build_model_card(info, repo_id, sample_grid=SAMPLES_FILE if samples_path else None, license=license,
                                sample_settings=settings)
        card.save(staging / "README.md")
        log("Checking that the staging folder loads...")
        try:
            inspect_folder(staging, load=True)
        except PublishError as error:
            raise PublishError(f"the staging folder does not load: {error}") from error
    files = _list_files(staging)
    result = PublishResult(staging=staging, files=files, repo_id=repo_id, repo_type=repo_type, revision=revision,
                           private=private, create_pr=create_pr, dry_run=dry_run, info=info, samples=samples_path)
    if model is not None:
        result.space_variables["MAGE_MODEL"] = model
    if dry_run:
        return result

    # 3. Upload. The Space variable applies to the running Space (its main branch): not for a PR or another branch.
    set_variable = space and model is not None and not create_pr and revision in (None, "main")
    if space and model is not None and not set_variable:
        result.space_variables = {}
        log(f"note: MAGE_MODEL is not set for a pull request or a branch; set it to {model} in the Space's settings "
            "once the change is on main.")
    log(f"Uploading {len(files)} files to {repo_type} {repo_id}...")
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type=repo_type,
                                   **({"space_sdk": "gradio"} if space else {}))
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=staging, repo_type=repo_type, revision=revision, create_pr=create_pr,
            commit_message=f"Upload {'the Space' if space else info.class_name} with mage-hf push",
            ignore_patterns=[STAGING_MARKER],
        )
        # Only once the new app is uploaded: the variable restarts the running Space, which must not serve the new
        # model with the old code if the upload fails.
        if set_variable:
            api.add_space_variable(repo_id, "MAGE_MODEL", model,
                                   description="The model the demo serves (a Hub repo id); set by mage-hf push.")
    except Exception as error:  # HTTP errors, permissions, network...: the staging folder is kept for a retry
        raise HubAccessError(
            f"the upload to {repo_id} failed ({type(error).__name__}: {_one_line(error, 200)}). The staging folder "
            f"{staging} is complete: fix the cause and run the command again."
        ) from error
    result.url = str(getattr(repo_url, "url", repo_url))
    result.commit_url = getattr(commit, "commit_url", None)
    result.pr_url = getattr(commit, "pr_url", None)
    return result


def _check_own_readme(folder: Path, replace: bool) -> None:
    """The staged card replaces the folder's README.md: refuse when that README is the user's own (not a card that
    mage-hf wrote, which carries the `mage-hf` tag) unless `replace`, naming its licence so that it can be kept."""
    readme = folder / "README.md"
    if replace or not readme.is_file():
        return
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # unreadable front matter: certainly not a card mage-hf wrote
        data = {}
    if "mage-hf" in (data.get("tags") or []):
        return
    licence = f" Its licence is `{data['license']}`: pass --license {data['license']} to keep it." if isinstance(
        data.get("license"), str) else ""
    raise PublishError(
        f"{readme} is your own README, not a card mage-hf wrote, and the upload would replace it with a generated "
        f"model card.{licence} Pass --replace-readme to go ahead (the folder's copy stays), or move the README out."
    )


def _size(num_bytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes} B"


def format_report(result: PublishResult) -> str:
    """A human-readable summary of [`publish`]'s result: staging folder, files with sizes, target, URLs."""
    lines = [f"Staging folder: {result.staging}"]
    lines += [f"  {_size(size):>9}  {name}" for name, size in result.files.items()]
    lines.append(f"  {_size(sum(result.files.values())):>9}  total ({len(result.files)} files)")
    target = (f"{result.repo_type} repo {result.repo_id} (revision: {result.revision or 'main'}, private: "
              f"{'yes' if result.private else 'no'}, create_pr: {'yes' if result.create_pr else 'no'})")
    if result.dry_run:
        lines.append(f"Dry run: nothing uploaded. Target: {target}.")
        for key, value in result.space_variables.items():
            lines.append(f"Would set the Space variable {key}={value}.")
    else:
        lines.append(f"Uploaded to {target}.")
        lines.append(f"URL: {result.url}")
        if result.pr_url:
            lines.append(f"Pull request: {result.pr_url}")
        elif result.commit_url:
            lines.append(f"Commit: {result.commit_url}")
        for key, value in result.space_variables.items():
            lines.append(f"Set the Space variable {key}={value}.")
    return "\n".join(lines)
