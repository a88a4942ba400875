# Copyright 2026 The mage-hf authors. MIT licence.
"""Convert the original MAGE checkpoints (LTH14/mage) into `from_pretrained` folders.

Three kinds of checkpoint are read, always with `torch.load(weights_only=True)`:

* `pretrain` - `{"model": state_dict}` of `MaskedGenerativeEncoderViT` (`mage-vitb-1600.pth`, ...), tokenizer
  included under `vqgan.*`. Gives a [`MageForMaskedImageModeling`] folder, which `AutoModel` also loads as a
  [`MageModel`] (the decoder is then left out).
* `finetune` - `{"model": state_dict}` of `VisionTransformerMage` (the fine-tuned classifiers). Gives a
  [`MageForImageClassification`] folder.
* `vqgan` - `{"state_dict": state_dict}` of the MaskGIT VQGAN alone (`vqgan_jax_strongaug.ckpt`). Gives a
  [`MageVQModel`] folder.

Every key of the source is accounted for: it is mapped, or it is on the list of keys the original forward pass
never reads (`UNUSED_KEYS`), or conversion stops with an error naming it. The tokenizer is stored once, inside the
model folder under `mage.vq_model.*`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configuration_mage import NUM_CLASS_SLOTS, MageConfig, MageVQConfig

__all__ = [
    "CheckpointError",
    "ConversionReport",
    "convert_checkpoint",
    "file_sha256",
    "load_original_checkpoint",
    "write_conversion_record",
]

KINDS = ("pretrain", "finetune", "vqgan")

# Keys that the original forward passes never read (checked against LTH14/mage models_mage.py and
# models_vit_mage.py): MAE leftovers (patch embedding, sin-cos tables, cls/mask tokens, the pixel head
# `decoder_pred`) and the position-id buffer of the token embedding.
UNUSED_KEYS = {
    "pretrain": re.compile(
        r"^(cls_token|pos_embed|mask_token|decoder_pos_embed|patch_embed\..*|decoder_pred\..*|token_emb\.position_ids)$"
    ),
    "finetune": re.compile(r"^(cls_token|pos_embed|patch_embed\..*|token_emb\.position_ids)$"),
    "vqgan": re.compile(r"^$"),
}

# Head counts cannot be read from weights. These are the released shapes: (width, depth) -> heads.
KNOWN_HEADS = {(768, 12): 12, (1024, 24): 16}
KNOWN_DECODER_HEADS = {(768, 8): 16, (1024, 8): 16}


class CheckpointError(ValueError):
    """The file is not a MAGE checkpoint that can be converted; the message says why and what to do."""


@dataclass
class ConversionReport:
    kind: str
    mapped: int = 0
    unused: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    seconds: float = 0.0


def _not_a_checkpoint_reason(path: Path) -> str | None:
    """Why `path` cannot be a PyTorch checkpoint, from its first bytes (None if it may be one). `torch.save` writes a
    zip archive (`PK`) or, in the legacy format, a pickle (protocol byte 0x80); failed downloads often leave
    something else under the checkpoint's name."""
    with path.open("rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    if not head:
        return "it is empty (a failed or interrupted download?): download it again"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file itself: run `git lfs pull` in its repository"
    if head.lstrip().startswith(b"<"):
        return (
            "it is an HTML or XML page (a failed download, e.g. a sign-in or virus-scan page): download the file itself"
        )
    return "it does not start like a file written by torch.save: it may be truncated or corrupt (download it again)"


def load_original_checkpoint(path: str | Path) -> dict:
    """Read a `.pth`/`.ckpt` file safely and return the raw object (a dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint file at {path}.")
    reason = _not_a_checkpoint_reason(path)
    if reason is not None:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {reason}.")
    try:
        # Checkpoints written by the original training code also hold its `argparse.Namespace` of arguments (and
        # optimizer state); allowing that one plain container keeps them loadable without a full unpickler.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        details = " ".join(str(err).split())
        # torch names the refused class or function ("Unsupported global: GLOBAL ...", "unsupported GLOBAL ...");
        # any other unpickling error is damage to the file, not a code object.
        if "global" in details.lower():
            found = re.search(r"GLOBAL [\w.]+", details)
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain containers"
                f"{f' ({found.group(0)})' if found else ''}, so it was not loaded (loading it could run arbitrary "
                "code). Re-save just the state dict, e.g. torch.save({'model': sd}, ...), from a trusted environment."
            ) from None
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint; it may be truncated or corrupt (download it again). "
            f"Details: {details[-200:]}"
        ) from None
    except Exception as err:  # garbage bytes fail in many ways inside the unpickler (KeyError, EOFError, ...)
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint; it may be truncated or corrupt (download it again). "
            f"Details: {type(err).__name__}: {err}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict.")
    return obj


def unwrap_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: `{"model": sd}`, `{"state_dict": sd}` or a bare state dict."""
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("The checkpoint has no tensors under 'model', 'state_dict' or at its top level.")
    others = sorted(set(obj) - set(tensors))
    if others:
        raise CheckpointError(f"The state dict has entries that are not tensors: {others[:5]}.")
    return tensors


def detect_kind(sd: dict[str, torch.Tensor]) -> str:
    if "mlm_layer.fc.weight" in sd and "decoder_embed.weight" in sd:
        return "pretrain"
    if "head.weight" in sd and "token_emb.word_embeddings.weight" in sd:
        return "finetune"
    if "quantize.embedding.weight" in sd and "encoder.conv_in.weight" in sd:
        return "vqgan"
    raise CheckpointError(
        "This does not look like a MAGE checkpoint: expected the MAGE pre-training layout (mlm_layer.*, "
        "decoder_embed.*), the fine-tuned classifier layout (token_emb.*, head.*) or the VQGAN layout (encoder.*, "
        f"quantize.*). First keys found: {sorted(sd)[:6]}. Pass --kind if the detection is wrong."
    )


def _shape(sd, key, source):
    if key not in sd:
        raise CheckpointError(f"The {source} checkpoint lacks '{key}'; it is truncated or not of that kind.")
    return tuple(sd[key].shape)


def infer_vq_config(sd: dict[str, torch.Tensor]) -> MageVQConfig:
    """Tokenizer hyper-parameters from the shapes of a VQGAN state dict (keys without the `vqgan.` prefix)."""
    num_embeddings, embed_dim = _shape(sd, "quantize.embedding.weight", "VQGAN")
    base_channels, num_channels = _shape(sd, "encoder.conv_in.weight", "VQGAN")[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))) or not blocks:
        raise CheckpointError("The VQGAN encoder levels (encoder.down.N.block.M) are missing or not contiguous.")
    multipliers = []
    for level in levels:
        width = _shape(sd, f"encoder.down.{level}.block.0.conv1.weight", "VQGAN")[0]
        if width % base_channels:
            raise CheckpointError(f"VQGAN level {level} is {width} wide, not a multiple of {base_channels}.")
        multipliers.append(width // base_channels)
    return MageVQConfig(
        num_channels=num_channels,
        base_channels=base_channels,
        channel_multiplier=multipliers,
        num_res_blocks=len(blocks),
        num_embeddings=num_embeddings,
        embed_dim=embed_dim,
        # Only nominal for the fully convolutional tokenizer; a MAGE checkpoint's position table fixes it later.
        resolution=max(256, 2 ** (len(levels) - 1)),
    )


def _num_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """The number of transformer blocks `prefix.<i>.*` in `sd`, after checking that they are numbered 0..N-1: a block
    lost from a damaged or hand-edited file must not turn into a shallower model. (A block that lacks some tensors
    is named by the key accounting in `load_into`; a lost last block of a released shape shows as a depth that is
    not a released one.)"""
    indices = {int(key.split(".")[1]) for key in sd if key.startswith(prefix + ".") and key.split(".")[1].isdigit()}
    if not indices:
        raise CheckpointError(f"The checkpoint has no {prefix}.* weights.")
    missing = sorted(set(range(max(indices) + 1)) - indices)
    if missing:
        raise CheckpointError(
            f"The checkpoint has {prefix}.{max(indices)} but no {prefix}.{missing[0]}.*: blocks are missing, the file "
            "is damaged or incomplete."
        )
    return len(indices)


def infer_config(
    sd: dict[str, torch.Tensor],
    kind: str,
    vq_config: MageVQConfig,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
) -> MageConfig:
    """MAGE hyper-parameters from the shapes of an original state dict."""
    vocab_size, hidden_size = _shape(sd, "token_emb.word_embeddings.weight", kind)
    if vocab_size != vq_config.num_embeddings + NUM_CLASS_SLOTS + 1:
        raise CheckpointError(
            f"The token embedding has {vocab_size} rows but the tokenizer has {vq_config.num_embeddings} codes; MAGE "
            f"needs codebook + 1001 = {vq_config.num_embeddings + NUM_CLASS_SLOTS + 1}. Is --vqgan the tokenizer this "
            "model was trained with?"
        )
    num_positions = _shape(sd, "token_emb.position_embeddings.weight", kind)[0]
    grid = int(round((num_positions - 1) ** 0.5))
    if grid * grid != num_positions - 1:
        raise CheckpointError(f"{num_positions} positions is not 1 + a square grid of tokens.")
    vq_config.resolution = grid * vq_config.downsample_factor

    depth = _num_blocks(sd, "blocks")
    for name, value in (("--num-heads", num_attention_heads), ("--decoder-num-heads", decoder_num_attention_heads)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{name} must be a positive number of attention heads, got {value!r}.")
    heads = num_attention_heads if num_attention_heads is not None else KNOWN_HEADS.get((hidden_size, depth))
    if heads is None:
        raise CheckpointError(
            f"The encoder is {hidden_size} wide and {depth} deep, not a released shape, and head counts cannot be read "
            "from weights: pass --num-heads (and --decoder-num-heads for a pre-training checkpoint)."
        )
    kwargs = dict(
        vq_config=vq_config,
        hidden_size=hidden_size,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=_shape(sd, "blocks.0.mlp.fc1.weight", kind)[0],
    )
    if kind == "pretrain":
        decoder_hidden_size = _shape(sd, "decoder_embed.weight", kind)[0]
        decoder_depth = _num_blocks(sd, "decoder_blocks")
        decoder_heads = (
            decoder_num_attention_heads
            if decoder_num_attention_heads is not None
            else KNOWN_DECODER_HEADS.get((decoder_hidden_size, decoder_depth))
        )
        if decoder_heads is None:
            raise CheckpointError(
                f"The decoder is {decoder_hidden_size} wide and {decoder_depth} deep, not a released shape (those have "
                "8 blocks): pass --decoder-num-heads."
            )
        kwargs.update(
            decoder_hidden_size=decoder_hidden_size,
            decoder_num_hidden_layers=decoder_depth,
            decoder_num_attention_heads=decoder_heads,
            decoder_intermediate_size=_shape(sd, "decoder_blocks.0.mlp.fc1.weight", kind)[0],
        )
    else:
        kwargs["use_mean_pooling"] = "fc_norm.weight" in sd
        kwargs["num_labels"] = _shape(sd, "head.weight", kind)[0]
    return MageConfig(**kwargs)


def _rename(key: str, kind: str) -> str | None:
    """Original key -> key of the converted model, or None when no rule applies."""
    rules = [
        (r"^vqgan\.", "mage.vq_model."),
        (r"^token_emb\.word_embeddings\.", "mage.embeddings.word_embeddings."),
        (r"^token_emb\.position_embeddings\.", "mage.embeddings.position_embeddings."),
        (r"^token_emb\.LayerNorm\.", "mage.embeddings.layer_norm."),
        (r"^blocks\.(\d+)\.", r"mage.encoder.layers.\1."),
        (r"^norm\.", "mage.layernorm."),
        (r"^fc_norm\.", "mage.pooler.layernorm."),
        (r"^head\.", "classifier."),
        (r"^decoder_embed\.", "decoder.embed."),
        (r"^decoder_pos_embed_learned$", "decoder.position_embeddings"),
        (r"^decoder_blocks\.(\d+)\.", r"decoder.transformer.layers.\1."),
        (r"^decoder_norm\.", "decoder.layernorm."),
        (r"^mlm_layer\.fc\.", "mlm_head.dense."),
        (r"^mlm_layer\.ln\.", "mlm_head.layer_norm."),
        (r"^mlm_layer\.bias$", "mlm_head.bias"),
    ]
    if kind == "vqgan":
        return key
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return None


def convert_state_dict(sd: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename every key; return the new state dict and the known-unused keys. Unknown keys raise."""
    converted, unused, unknown = {}, [], []
    for key, tensor in sd.items():
        if UNUSED_KEYS[kind].match(key):
            unused.append(key)
            continue
        new_key = _rename(key, kind)
        if new_key is None:
            unknown.append(key)
            continue
        if new_key in ("mlm_head.bias",):
            tensor = tensor.reshape(-1)  # the original stores it as (1, 1, vocab) for broadcasting
        converted[new_key] = tensor
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys of this {kind} checkpoint have no place in the MAGE port: {unknown[:8]}. The file "
            "is not an original MAGE checkpoint of that kind, or was modified."
        )
    return converted, sorted(unused)


def build_model(config, kind: str):
    from .modeling_mage import MageForImageClassification, MageForMaskedImageModeling
    from .modeling_mage_vq import MageVQModel

    cls = {"pretrain": MageForMaskedImageModeling, "finetune": MageForImageClassification, "vqgan": MageVQModel}[kind]
    return cls(config)


def load_into(model: torch.nn.Module, converted: dict[str, torch.Tensor], kind: str) -> float:
    """Load `converted` strictly and check every parameter equals its source; return the max abs difference."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    extra = sorted(set(converted) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"The {kind} checkpoint does not fit the model it describes: missing {missing[:6]}, unexpected "
            f"{extra[:6]}. It may be truncated or come from a different architecture."
        )
    for key, tensor in converted.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"'{key}' has shape {tuple(tensor.shape)} in the checkpoint but the model needs "
                f"{tuple(expected[key].shape)}; the checkpoint's shapes are inconsistent."
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()}, strict=True)
    loaded = model.state_dict()
    return max(float((loaded[k].float() - v.float()).abs().max()) if v.numel() else 0.0 for k, v in converted.items())


@torch.no_grad()
def _probe(model, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A deterministic forward pass used to check the saved folder reloads to the same numbers."""
    if kind == "vqgan":
        size = model.config.resolution
        return model(torch.rand(1, 3, size, size, generator=generator))
    ids = torch.randint(0, model.config.codebook_size, (1, model.config.num_image_tokens), generator=generator)
    if kind == "pretrain":
        mask = torch.rand(ids.shape, generator=generator) < 0.6
        return model(input_ids=ids, token_mask=mask).logits
    return model(input_ids=ids).logits


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def write_conversion_record(output_dir: str | Path, checkpoint: str | Path, kind: str, mapped: int,
                            max_abs_diff: float, vqgan: str | Path | None = None) -> Path:
    """Write `conversion.json` into a converted folder: where its weights came from (the checkpoint's file name and
    SHA-256, and the separate tokenizer's when one was given), the kind, and the mage-hf version that converted it.
    `mage-hf push` reads it for the model card's provenance and licence."""
    import json

    from . import __version__

    record = {
        "source": "conversion",
        "checkpoint": Path(checkpoint).name,
        "sha256": file_sha256(checkpoint),
        "kind": kind,
        "mage_hf_version": __version__,
        "max_abs_diff": float(max_abs_diff),
        "mapped_tensors": int(mapped),
    }
    if vqgan is not None and kind != "vqgan":
        record["vqgan_checkpoint"] = Path(vqgan).name
        record["vqgan_sha256"] = file_sha256(vqgan)
    path = Path(output_dir) / "conversion.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _check_output_dir(output_dir: Path, sources: list, overwrite: bool) -> None:
    """Refuse an output path that would lose data, before any work is done."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointError(f"--output {output_dir} is a file; give the path of a folder to create.")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"--output {output_dir} already exists and is not empty; choose a new folder, or pass --overwrite to "
                "replace it (everything in it is deleted)."
            )
        resolved = output_dir.resolve()
        for source in sources:
            if resolved in Path(source).resolve().parents:
                raise CheckpointError(
                    f"--overwrite would delete {source}, which is inside --output {output_dir}; write elsewhere."
                )


def _write_folder(model, probe: torch.Tensor, kind: str, config, folder: Path) -> None:
    """Save `model` with its image processor's config into `folder`, then reload it and check it gives `probe`."""
    from .image_processing_mage import MageImageProcessor

    model.save_pretrained(folder)
    resolution = config.resolution if kind == "vqgan" else config.vq_config.resolution
    MageImageProcessor(size=resolution, crop_size=resolution).save_pretrained(folder)
    reloaded = type(model).from_pretrained(folder).eval()
    # The weights must come back bit for bit.
    saved, loaded = model.state_dict(), reloaded.state_dict()
    if saved.keys() != loaded.keys():
        raise CheckpointError(
            f"The converted folder does not reload the same tensors (missing: {sorted(saved.keys() - loaded.keys())}, "
            f"unexpected: {sorted(loaded.keys() - saved.keys())}); nothing was written to --output."
        )
    changed = [name for name in saved if not torch.equal(saved[name], loaded[name])]
    if changed:
        raise CheckpointError(f"The converted folder reloads different values for {changed[:5]}; nothing was written "
                              "to --output.")
    # The forward pass checks that the saved config describes the weights. It is compared to float rounding, not bit
    # for bit: safetensors loads the same values at addresses that are not 64-byte aligned, and on AVX2 CPUs (AMD
    # EPYC here) the float32 kernels then round differently (2.4e-7 on the tiny test model; bit-identical again once
    # the reloaded weights are copied to aligned memory). A wrong config changes the numbers at the first decimal.
    again = _probe(reloaded, kind, torch.Generator().manual_seed(0))
    if not torch.allclose(probe, again, rtol=1e-5, atol=1e-5):
        diff = (probe - again).abs().max().item()
        raise CheckpointError(
            f"The converted folder reloads to different numbers (max abs diff {diff:.3g}): its config does not "
            "describe the converted weights; nothing was written to --output."
        )


def convert_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path,
    vqgan: str | Path | None = None,
    kind: str | None = None,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    id2label: dict[int, str] | None = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert one original checkpoint into a `from_pretrained` folder at `output_dir` and return a report.

    The converted weights are checked to equal the source tensors exactly, the model is run once, the folder is
    written as safetensors (with the image processor's config), reloaded, and run again to check the numbers agree;
    then `conversion.json` records the source checkpoint's name and SHA-256 ([`write_conversion_record`]).

    The folder is written beside `output_dir` and moved into place only once it has passed those checks, so a failed
    conversion leaves nothing behind. An existing non-empty `output_dir` is refused unless `overwrite`, which
    replaces it whole (no file of the old folder is mixed into the new one).
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, [checkpoint] + ([vqgan] if vqgan is not None else []), overwrite)
    sd = unwrap_state_dict(load_original_checkpoint(checkpoint))
    if kind is not None and kind not in KINDS:
        raise CheckpointError(f"Unknown kind '{kind}'; use one of {KINDS}.")
    try:
        detected = detect_kind(sd)
    except CheckpointError:
        if kind is None:
            raise
        detected = kind  # trust --kind; the strict key accounting below names whatever does not fit
    kind = kind or detected
    if kind != detected:
        raise CheckpointError(f"--kind {kind} was given, but the checkpoint has the layout of a '{detected}' checkpoint.")
    if kind == "vqgan" and any(x is not None for x in (vqgan, num_attention_heads, decoder_num_attention_heads)):
        raise CheckpointError(
            f"{checkpoint} is a VQGAN checkpoint: --vqgan, --num-heads and --decoder-num-heads apply to MAGE "
            "checkpoints only; leave them out."
        )

    if kind != "vqgan":
        embedded = {k[len("vqgan."):]: v for k, v in sd.items() if k.startswith("vqgan.")}
        if vqgan is not None:
            separate = unwrap_state_dict(load_original_checkpoint(vqgan))
            if detect_kind(separate) != "vqgan":
                raise CheckpointError(f"--vqgan {vqgan} is not a VQGAN checkpoint.")
            if embedded and (
                embedded.keys() != separate.keys()
                or any(not torch.equal(embedded[k], separate[k]) for k in embedded)
            ):
                raise CheckpointError(
                    f"{checkpoint} already holds a tokenizer (vqgan.*) that differs from --vqgan {vqgan}. Leave out "
                    "--vqgan to keep the one the model was trained with."
                )
            sd = {k: v for k, v in sd.items() if not k.startswith("vqgan.")}
            sd.update({f"vqgan.{k}": v for k, v in separate.items()})
            embedded = separate
        elif not embedded:
            raise CheckpointError(
                f"{checkpoint} has no tokenizer weights (vqgan.*). Pass --vqgan vqgan_jax_strongaug.ckpt (or the "
                "tokenizer it was trained with)."
            )
        vq_config = infer_vq_config(embedded)
        config = infer_config(sd, kind, vq_config, num_attention_heads, decoder_num_attention_heads)
        if kind == "finetune":
            if id2label is None and config.num_labels == NUM_CLASS_SLOTS:
                from .labels import imagenet1k_id2label

                id2label = imagenet1k_id2label()
            if id2label is not None:
                config.id2label = {int(k): v for k, v in id2label.items()}
                config.label2id = {v: int(k) for k, v in config.id2label.items()}
    else:
        config = infer_vq_config(sd)

    converted, unused = convert_state_dict(sd, kind)
    model = build_model(config, kind).eval()
    max_diff = load_into(model, converted, kind)
    if max_diff != 0.0:
        raise CheckpointError(f"Converted weights differ from the source by {max_diff}; this is a bug in the port.")
    probe = _probe(model, kind, torch.Generator().manual_seed(0))
    if not torch.isfinite(probe).all():
        raise CheckpointError("The converted model produces non-finite outputs; the checkpoint's weights are broken.")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.converting-", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private (0700); the output folder gets the usual mode
    try:
        _write_folder(model, probe, kind, config, staging)
        write_conversion_record(staging, checkpoint, kind, mapped=len(converted), max_abs_diff=max_diff, vqgan=vqgan)
        if output_dir.exists():  # checked above: empty, or `overwrite`
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ConversionReport(
        kind=kind, mapped=len(converted), unused=unused, max_abs_diff=max_diff, seconds=time.perf_counter() - start
    )
