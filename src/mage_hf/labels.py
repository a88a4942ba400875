"""ImageNet-1k class names, available offline (no network, no extra dependency).

The names are read from ``mage_hf/data/imagenet1k_labels.json`` (see ``mage_hf/data/README.md`` for their source and
licence) through :mod:`importlib.resources`, so they also work from an installed wheel or zip.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


__all__ = ["IMAGENET1K_NUM_CLASSES", "imagenet1k_id2label", "imagenet1k_label2id", "imagenet1k_labels"]

IMAGENET1K_NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def _load_labels() -> tuple[str, ...]:
    text = resources.files("mage_hf").joinpath("data", "imagenet1k_labels.json").read_text(encoding="utf-8")
    labels = json.loads(text)
    if not isinstance(labels, list) or len(labels) != IMAGENET1K_NUM_CLASSES or not all(
        isinstance(name, str) and name for name in labels
    ):
        raise RuntimeError(
            "mage_hf/data/imagenet1k_labels.json is corrupt: expected a JSON list of 1000 non-empty strings."
        )
    return tuple(labels)


def imagenet1k_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard class-index order (0 = "tench, Tinca tinca")."""
    return list(_load_labels())


def imagenet1k_id2label() -> dict[int, str]:
    """Map ImageNet-1k class index (0-999) to its human-readable name, e.g. for `PretrainedConfig.id2label`.

    The names are unique except "crane", which is both index 134 (the bird) and 517 (the machine), as in the standard
    ImageNet-1k label list.
    """
    return dict(enumerate(_load_labels()))


def imagenet1k_label2id() -> dict[str, int]:
    """Inverse of :func:`imagenet1k_id2label`. The duplicated name "crane" maps to its first index, 134."""
    label2id: dict[str, int] = {}
    for index, name in enumerate(_load_labels()):
        label2id.setdefault(name, index)
    return label2id
