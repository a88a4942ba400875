# Copyright 2026 The mage-hf authors. MIT licence.
"""The `mage-hf` command line: `mage-hf convert ...`, `mage-hf features ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _convert(args: argparse.Namespace) -> int:
    from .convert_mage import convert_checkpoint

    report = convert_checkpoint(
        args.checkpoint,
        args.output,
        vqgan=args.vqgan,
        kind=args.kind,
        num_attention_heads=args.num_heads,
        decoder_num_attention_heads=args.decoder_num_heads,
    )
    print(
        f"Converted a {report.kind} checkpoint in {report.seconds:.1f} s: {report.mapped} tensors mapped "
        f"(max difference {report.max_abs_diff:g}), {len(report.unused)} unused keys left out "
        f"({', '.join(report.unused) or 'none'})."
    )
    print(f"Wrote {args.output}. Load it with from_pretrained after `import mage_hf`.")
    return 0


def _features(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from . import MageImageProcessor, MageModel

    model = MageModel.from_pretrained(args.model).eval()
    processor = MageImageProcessor.from_pretrained(args.model)
    paths = [Path(p) for p in args.images]
    images = []
    for path in paths:
        try:
            images.append(Image.open(path))
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: cannot read {path} as an image: {err}") from None
    with torch.no_grad():
        inputs = processor(images, return_tensors="pt")
        outputs = model(**inputs)
    pooled = outputs.pooler_output  # (N, D)
    normed = torch.nn.functional.normalize(pooled, dim=-1)
    print(f"{len(paths)} images -> last_hidden_state {tuple(outputs.last_hidden_state.shape)}, "
          f"pooled {tuple(pooled.shape)}")
    if len(paths) > 1:
        similarity = normed @ normed.T
        for i, path in enumerate(paths):
            row = "  ".join(f"{v:+.3f}" for v in similarity[i].tolist())
            print(f"  {path.name:>24}  {row}")
    if args.output:
        save_file({"pooler_output": pooled.contiguous(), "last_hidden_state": outputs.last_hidden_state.contiguous()},
                  args.output)
        print(f"Wrote {args.output}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mage-hf", description="MAGE in the Hugging Face ecosystem.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an original MAGE or VQGAN checkpoint to a folder")
    convert.add_argument("--checkpoint", required=True, help="mage-vitb-1600.pth, a fine-tuned .pth or a VQGAN .ckpt")
    convert.add_argument("--vqgan", help="VQGAN checkpoint, for a MAGE checkpoint that lacks vqgan.* weights")
    convert.add_argument("--output", required=True, help="folder to write")
    convert.add_argument("--kind", choices=["pretrain", "finetune", "vqgan"], help="override the detected kind")
    convert.add_argument("--num-heads", type=int, help="encoder heads (only for shapes other than ViT-B/L)")
    convert.add_argument("--decoder-num-heads", type=int, help="decoder heads (only for shapes other than ViT-B/L)")
    convert.set_defaults(func=_convert)

    features = commands.add_parser("features", help="extract MAGE features from images")
    features.add_argument("--model", required=True, help="a converted folder or Hub repo id")
    features.add_argument("images", nargs="+", help="image files")
    features.add_argument("--output", help="write the features to this .safetensors file")
    features.set_defaults(func=_features)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .convert_mage import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
