# Copyright 2026 The mage-hf authors. MIT licence.
"""Plot curves from a training run's `metrics.jsonl` (written by train_mage.py) to a PNG, with PIL only.

    python training/plot_metrics.py --metrics mage-out/metrics.jsonl --keys loss masked_token_accuracy \
        --output training/assets/loss_curve.png
"""

from __future__ import annotations

import argparse
import json
import os

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", required=True, help="A metrics.jsonl file.")
    parser.add_argument("--keys", nargs="+", default=["loss"], help="One panel per key.")
    parser.add_argument("--smooth", type=int, default=1, help="Also draw a running mean over this many steps.")
    parser.add_argument("--title", default="")
    parser.add_argument("--output", required=True)
    return parser.parse_args(argv)


def draw_panel(draw, box, steps, values, label, colour, smooth):
    left, top, right, bottom = box
    draw.rectangle(box, outline=(0, 0, 0))
    low, high = min(values), max(values)
    high = high if high > low else low + 1.0
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)

    def point(step, value):
        return (left + (step - x0) / (x1 - x0) * (right - left),
                bottom - (value - low) / (high - low) * (bottom - top))

    for fraction in (0.0, 0.5, 1.0):  # y ticks
        value = low + fraction * (high - low)
        y = point(x0, value)[1]
        draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
        draw.text((left - 58, y - 6), f"{value:.3g}", fill=(0, 0, 0))
    for step in (x0, (x0 + x1) // 2, x1):  # x ticks
        x = point(step, low)[0]
        draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
        draw.text((x - 10, bottom + 6), str(step), fill=(0, 0, 0))
    faint = tuple(int(c + (255 - c) * 0.6) for c in colour)
    draw.line([point(s, v) for s, v in zip(steps, values)], fill=faint if smooth > 1 else colour, width=1)
    if smooth > 1:
        means = [sum(values[max(0, i - smooth + 1) : i + 1]) / len(values[max(0, i - smooth + 1) : i + 1])
                 for i in range(len(values))]
        draw.line([point(s, v) for s, v in zip(steps, means)], fill=colour, width=2)
    draw.text((right - 250, top + 4), label + (f" (running mean of {smooth})" if smooth > 1 else ""), fill=colour)


def main(args):
    with open(args.metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    width, panel_height = 720, 240
    image = Image.new("RGB", (width, 40 + panel_height * len(args.keys) + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((70, 12), args.title, fill=(0, 0, 0))
    for i, key in enumerate(args.keys):
        points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
        if not points:
            raise ValueError(f"No values for {key!r} in {args.metrics}; it has {sorted(rows[0]) if rows else []}.")
        top = 40 + i * panel_height
        box = (70, top, width - 20, top + panel_height - 40)
        draw_panel(draw, box, [p[0] for p in points], [p[1] for p in points], key, COLOURS[i % len(COLOURS)],
                   args.smooth)
    draw.text((width // 2 - 30, image.height - 22), "optimiser step", fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    image.save(args.output)
    return image


if __name__ == "__main__":
    main(parse_args())
