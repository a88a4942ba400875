# Copyright 2026 The mage-hf authors. MIT licence.
"""The main job, as `make demo` runs it: extract MAGE features from a few photos and reconstruct them.

    python -m mage_hf.demo --model outputs/mage-hf-model --output outputs

The photos are the ones scikit-image ships (public domain or CC0, see its documentation). With random weights
(the default small test checkpoint) the pictures are noise; with a converted ViT-B they are real reconstructions.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import MageForMaskedImageModeling, MageImageProcessor, MageModel
from .modeling_mage import random_token_masks

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def load_photos() -> dict[str, Image.Image]:
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("The demo's photos come from scikit-image: pip install scikit-image") from None
    return {name: Image.fromarray(getattr(data, name)()) for name in PHOTOS}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [0, 1] -> PIL images, clipped."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    width, height = rows[0][0].size
    canvas = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            canvas.paste(image, (c * width, r * height))
    return canvas


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a converted MAGE folder")
    parser.add_argument("--output", default="outputs", help="where to write the pictures and features")
    parser.add_argument("--mask-ratio", type=float, default=0.5, help="fraction of tokens to mask and predict")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@torch.no_grad()
def main(args: argparse.Namespace) -> None:
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    processor = MageImageProcessor.from_pretrained(args.model)
    encoder = MageModel.from_pretrained(args.model).eval()
    photos = load_photos()
    pixel_values = processor(list(photos.values()), return_tensors="pt").pixel_values

    features = encoder(pixel_values=pixel_values)
    pooled = torch.nn.functional.normalize(features.pooler_output, dim=-1)
    print(f"Features: last_hidden_state {tuple(features.last_hidden_state.shape)}, pooled {tuple(pooled.shape)}")
    print("Cosine similarity of the pooled features:")
    print("            " + "".join(f"{n:>11}" for n in photos))
    for name, row in zip(photos, pooled @ pooled.T):
        print(f"{name:>11} " + "".join(f"{v:>11.3f}" for v in row.tolist()))
    from safetensors.torch import save_file

    save_file({"pooler_output": features.pooler_output.contiguous()}, str(output / "features.safetensors"))

    # Masked token modelling: mask tokens, predict them (argmax), decode.
    mim = MageForMaskedImageModeling.from_pretrained(args.model).eval()
    vq = mim.mage.vq_model
    side = mim.config.vq_config.grid_size
    noise = torch.rand(len(photos), side * side, generator=torch.Generator().manual_seed(args.seed))
    token_mask, _ = random_token_masks(noise, math.ceil(side * side * args.mask_ratio))
    out = mim(pixel_values=pixel_values, token_mask=token_mask)
    predicted = torch.where(out.token_mask, out.logits.argmax(-1), out.labels)  # (B, L)
    tokenized = vq.decode(out.labels.view(-1, side, side))
    filled = vq.decode(predicted.view(-1, side, side))
    accuracy = (out.logits.argmax(-1) == out.labels)[out.token_mask].float().mean()
    print(f"Masked {out.token_mask.sum(1)[0].item()} of {side * side} tokens per photo: loss {out.loss:.3f}, "
          f"masked-token accuracy {accuracy:.1%}")
    picture = grid([to_pil(pixel_values), to_pil(tokenized), to_pil(filled)])
    picture.save(output / "reconstructions.png")
    print(f"Wrote {output / 'reconstructions.png'} (rows: input, VQGAN reconstruction, masked tokens predicted) "
          f"and {output / 'features.safetensors'}.")


if __name__ == "__main__":
    main(parse_args())
