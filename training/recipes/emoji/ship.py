# Copyright 2026 The mage-hf authors. MIT licence.
"""Ship the evaluated pipeline folder as the package's embedded demo model (step 5 of train.sh).

    python training/recipes/emoji/ship.py --pipeline WORK/eval/pipeline

Copies the folder to `src/mage_hf/data/demo-model`, with its model card's usage snippets pointing at the embedded
model (`mage_hf.demo.EMBEDDED_MODEL`) instead of the folder it was written to, and local paths in the recorded
training arguments reduced to their last part. Refuses a folder over the 25 MB budget.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
TARGET = REPO_ROOT / "src" / "mage_hf" / "data" / "demo-model"
BUDGET = 25 * 2**20


def main(args) -> None:
    source = Path(args.pipeline).resolve()
    size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    if size > BUDGET:
        raise SystemExit(f"{source} is {size / 2**20:.1f} MB, over the {BUDGET / 2**20:.0f} MB budget.")
    shutil.rmtree(TARGET, ignore_errors=True)
    shutil.copytree(source, TARGET)

    # The card's snippets load the folder by the path evaluate.py wrote it to (as given, relative or absolute):
    # in Python they now load `EMBEDDED_MODEL`, and on the command line they rely on `--model`'s default.
    card = (TARGET / "README.md").read_text()
    written = sorted({args.pipeline, str(source), os.path.relpath(source, REPO_ROOT)}, key=len, reverse=True)
    for written_as in written:
        card = card.replace(f'"{written_as}"', "EMBEDDED_MODEL").replace(f"--model {written_as} ", "")
    if "EMBEDDED_MODEL" not in card or any(written_as in card for written_as in written):
        raise SystemExit(f"Could not point the model card's snippets at the embedded model; check {TARGET}/README.md.")
    blocks = card.split("```python\n")
    card = "```python\n".join(
        [blocks[0]] + [("from mage_hf.demo import EMBEDDED_MODEL  # this folder\n" if "EMBEDDED_MODEL" in block.split(
            "```")[0] else "") + block for block in blocks[1:]]
    )
    (TARGET / "README.md").write_text(card)

    args_file = TARGET / "training_args.json"
    if args_file.is_file():
        recorded = json.loads(args_file.read_text())
        for key, value in recorded.items():
            if isinstance(value, str) and value.startswith("/"):
                recorded[key] = Path(value).name  # no paths of the machine it was trained on
        args_file.write_text(json.dumps(recorded, indent=2) + "\n")
    print(f"Shipped {source} ({size / 2**20:.1f} MB) to {TARGET.relative_to(REPO_ROOT)}.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="evaluate.py's OUT/pipeline folder")
    main(parser.parse_args())
