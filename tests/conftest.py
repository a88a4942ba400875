"""Shared fixtures: the golden data from the original MAGE code, and converted tiny folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "mage-tiny"
# The golden tiny model's head counts cannot be read from its weights (see shared/golden/mage-tiny/config.json).
TINY_HEADS = ["--num-heads", "2", "--decoder-num-heads", "4"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network in tests


def require_golden() -> Path:
    if not (GOLDEN / "reference.safetensors").is_file():
        pytest.skip(f"golden data from the original MAGE code not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def golden_reference():
    from safetensors.torch import load_file

    return load_file(str(require_golden() / "reference.safetensors"))


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The golden checkpoints converted by the `mage-hf convert` command: {"pretrain": dir, "finetune": dir, "vqgan": dir}."""
    from mage_hf.cli import main

    golden = require_golden()
    root = tmp_path_factory.mktemp("converted")
    folders = {}
    for kind, name in (("pretrain", "mage_pretrain.pth"), ("finetune", "mage_finetune.pth"), ("vqgan", "vqgan.ckpt")):
        out = root / kind
        heads = [] if kind == "vqgan" else TINY_HEADS[:2] if kind == "finetune" else TINY_HEADS
        assert main(["convert", "--checkpoint", str(golden / name), "--output", str(out), *heads]) == 0
        folders[kind] = out
    return folders


@pytest.fixture
def fresh_accelerate_state():
    """Reset Accelerate's process-wide state around a test that calls a training script's `main` in-process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
