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
import re
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

    card = (TARGET / "README.md").read_text()
    card = card.replace(f'"{source}"', "EMBEDDED_MODEL").replace(str(source), "<embedded model>")
    card = re.sub(r"(?m)^(import mage_hf.*)$", r"\1\nfrom mage_hf.demo import EMBEDDED_MODEL  # this folder", card, 1)
    card = card.replace(f"# {source.name}\n", "# mage-hf emoji demo model\n", 1)
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
