"""Small real image datasets for the training and generation tests, built from what pip packages ship (nothing is
downloaded): the photos bundled with scikit-image, and scikit-learn's handwritten digits (1,797 labelled 8x8 scans).

Each builder writes both layouts the training scripts accept: an imagefolder (`<root>/<class>/<n>.png`) and a
`datasets` folder (`Dataset.save_to_disk`), with columns `image` and `label`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Colour and grey photos bundled with scikit-image (no pooch download needed).
PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel", "cat",
    "camera", "brick", "grass", "gravel", "moon", "coins", "clock", "text",
)


def photo_images(size: int | None = None) -> list[Image.Image]:
    """The scikit-image photos as RGB PIL images, centre-cropped to a square and resized to `size` when given."""
    import skimage.data

    images = []
    for name in PHOTOS:
        array = np.asarray(getattr(skimage.data, name)())
        image = Image.fromarray(array).convert("RGB")
        if size is not None:
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        images.append(image)
    return images


def digit_images(size: int = 32, per_class: int | None = None) -> tuple[list[Image.Image], list[int]]:
    """scikit-learn's handwritten digits as RGB images (white strokes on black), upscaled to `size`, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = [], []
    counts: dict[int, int] = {}
    for pixels, label in zip(digits.images, digits.target):
        label = int(label)
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        grey = Image.fromarray(np.uint8(np.clip(pixels / 16.0, 0, 1) * 255))  # values are 0..16
        images.append(grey.resize((size, size), Image.BICUBIC).convert("RGB"))
        labels.append(label)
    return images, labels


def write_imagefolder(root: Path, images: list[Image.Image], labels: list[int] | None = None) -> Path:
    """`<root>/<label>/<n>.png` (one folder `all` when unlabelled), the layout of datasets' `imagefolder`."""
    root = Path(root)
    for n, image in enumerate(images):
        folder = root / (f"class_{labels[n]}" if labels is not None else "all")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{n:05d}.png")
    return root


def write_datasets_folder(root: Path, images: list[Image.Image], labels: list[int] | None = None) -> Path:
    """A `datasets.Dataset.save_to_disk` folder with an `image` column (and `label` when labelled)."""
    import datasets

    columns = {"image": images}
    features = {"image": datasets.Image()}
    if labels is not None:
        columns["label"] = labels
        features["label"] = datasets.ClassLabel(names=[str(c) for c in sorted(set(labels))])
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    dataset.save_to_disk(str(root))
    return Path(root)
