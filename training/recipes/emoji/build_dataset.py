# Copyright 2026 The mage-hf authors. MIT licence.
"""Build the emoji dataset of the embedded demo model: Google's Noto emoji from the `emoji-datasource-google` npm
package (images Apache-2.0, package MIT), composited onto white, with their emoji category as the label.

    python training/recipes/emoji/build_dataset.py --output data/emoji [--tarball emoji-datasource-google-16.0.0.tgz]

Without `--tarball` it runs `npm pack emoji-datasource-google@16.0.0` (the npm registry is the only network it
needs). Every image of the package is used: 1,906 emoji and 1,875 skin-tone variants, in 9 categories (the 5
"Component" swatches are left out). 10% of the emoji, chosen per category with `--seed`, are held out as the `test`
split together with all their skin-tone variants, so that no near-copy of a test image is in `train`.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

from PIL import Image

PACKAGE = "emoji-datasource-google@16.0.0"
IMAGE_DIR = "package/img/google/64/"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="where to save the DatasetDict (train / test)")
    p.add_argument("--tarball", help="the package tarball (default: npm pack it into a temporary folder)")
    p.add_argument("--resolution", type=int, default=64, help="stored image size (the package's PNGs are 64 px)")
    p.add_argument("--test_fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def fetch_tarball(folder: Path) -> Path:
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return next(folder.glob("emoji-datasource-google-*.tgz"))


def on_white(png: bytes, resolution: int) -> Image.Image:
    rgba = Image.open(io.BytesIO(png)).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.width == resolution else image.resize((resolution, resolution), Image.LANCZOS)


def main(args) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(args.tarball) if args.tarball else fetch_tarball(Path(tmp))
        with tarfile.open(tarball) as tar:
            entries = json.load(tar.extractfile("package/emoji.json"))
            pngs = {m.name[len(IMAGE_DIR):]: tar.extractfile(m).read() for m in tar if m.name.startswith(IMAGE_DIR)}

    categories = sorted({e["category"] for e in entries} - {"Component"})
    rows = defaultdict(list)  # category -> [(group, name, file)]
    for entry in entries:
        if entry["category"] == "Component" or not entry.get("has_img_google"):
            continue
        files = [entry["image"]] + [v["image"] for v in (entry.get("skin_variations") or {}).values()]
        for file in files:
            if file in pngs:  # every listed image is in the package; checked rather than assumed
                rows[entry["category"]].append((entry["unified"], entry["short_name"], file))

    rng = random.Random(args.seed)
    splits = {"train": [], "test": []}
    for category in categories:
        groups = sorted({group for group, _, _ in rows[category]})
        rng.shuffle(groups)
        held_out = set(groups[: max(1, round(args.test_fraction * len(groups)))])
        for group, name, file in rows[category]:
            split = "test" if group in held_out else "train"
            splits[split].append({"image": on_white(pngs[file], args.resolution), "label": categories.index(category),
                                  "name": name, "group": group})
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=categories), "name": Value("string"),
                         "group": Value("string")})
    dataset = DatasetDict({k: Dataset.from_list(v, features=features) for k, v in splits.items()})
    dataset.save_to_disk(args.output)
    print(f"Saved {args.output}: " + ", ".join(f"{k} {len(v)} images" for k, v in dataset.items())
          + f"; {len(categories)} categories: {', '.join(categories)}")


if __name__ == "__main__":
    main(parse_args())
