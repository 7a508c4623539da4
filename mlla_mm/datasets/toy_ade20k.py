"""A small ADE20K-layout semantic-segmentation dataset of coloured shapes, for demos and tests.

Every image holds one to three shapes (``circle``, ``square``, ``triangle``; later ones may occlude
earlier ones) on a textured background (low-frequency colour noise, oriented stripes and pixel
noise), and sometimes a thin stroke of random colour that is left unlabelled. Each class has its own
hue (jittered per object), so that UperNet trained from scratch learns it in minutes on a CPU.
Widths vary from the height to 1.5 times the height, as ADE20K's images are not square.

The layout is the one of ``ADEChallengeData2016``, so mmseg's ADE20K pipelines read it unchanged::

    OUT/images/training/toy_00000.jpg       OUT/annotations/training/toy_00000.png
    OUT/images/validation/toy_00000.jpg     OUT/annotations/validation/toy_00000.png

The label maps follow ADE20K's convention: ``0`` is "unlabelled" (the strokes), ``1`` the
background and ``2..4`` the shapes. Configs load them with ``reduce_zero_label=True``, which turns
``0`` into the ignore index 255 and shifts the classes down by one, exactly as for ADE20K (150
classes, ``0`` = other). Generation is deterministic given the seed (numpy's ``default_rng``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['CLASSES', 'PALETTE', 'UNLABELLED', 'draw_toy_sample', 'make_toy_ade20k']

#: Class names after ``reduce_zero_label`` (value in the label PNG = index + 1).
CLASSES = ('background', 'circle', 'square', 'triangle')
#: Drawing palette for mmseg's visualiser, one RGB colour per class. The shapes' mean colours are
#: the same, jittered per object; the background is textured grey-ish and never uses it.
PALETTE = ((120, 120, 120), (220, 60, 60), (60, 190, 70), (60, 100, 230))
#: Label value of the unlabelled pixels (ignored in training and evaluation).
UNLABELLED = 0
_SIDES = {'circle': 48, 'square': 4, 'triangle': 3}


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random background (float (h, w, 3)): smooth grey-ish colour noise, stripes, noise."""
    low = rng.uniform(80, 170, size=(3, max(2, h // 16), max(2, w // 16))).astype(np.float32)
    smooth = np.stack(
        [np.asarray(Image.fromarray(c).resize((w, h), Image.BILINEAR)) for c in low], axis=-1
    )
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 20)
    stripes = rng.uniform(5, 20) * np.sin(
        (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
    )
    return smooth + stripes[..., None] + rng.normal(0, 8, size=(h, w, 3))


def _polygon(name: str, cx: float, cy: float, r: float, rot: float) -> list:
    """Vertices ``[(x, y), ...]`` of a shape of circumradius ``r`` centred at (cx, cy)."""
    n = _SIDES[name]
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
        for k in range(n)
    ]


def draw_toy_sample(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image and its ADE20K-style label map.

    Args:
        rng: Random generator (the only source of randomness).
        size: Image height in pixels; the width is a multiple of 8 from ``size`` to ``1.5 * size``.

    Returns:
        tuple[np.ndarray, np.ndarray]: The RGB image (H, W, 3) and the label map (H, W), both
        uint8; label values are ``0`` (unlabelled), ``1`` (background) and ``i + 1`` for the shape
        ``CLASSES[i]``.
    """
    h = size
    w = int(rng.integers(size // 8, size * 3 // 16 + 1)) * 8
    img = _texture(rng, h, w)
    label = np.full((h, w), 1, np.uint8)
    canvas = Image.new('L', (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):
        cls_id = int(rng.integers(1, len(CLASSES)))
        r = rng.uniform(0.12, 0.28) * size
        cx, cy = rng.uniform(r * 0.7, w - r * 0.7), rng.uniform(r * 0.7, h - r * 0.7)
        draw.rectangle((0, 0, w, h), fill=0)
        draw.polygon(_polygon(CLASSES[cls_id], cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=1)
        mask = np.asarray(canvas, dtype=bool)
        colour = np.array(PALETTE[cls_id]) + rng.uniform(-30, 30, size=3)
        img[mask] = colour + rng.normal(0, 6, size=(int(mask.sum()), 3))
        label[mask] = cls_id + 1
    if rng.random() < 0.5:  # unlabelled clutter, like ADE20K's "other" pixels
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(3)]
        draw.rectangle((0, 0, w, h), fill=0)
        draw.line(pts, fill=1, width=3)
        mask = np.asarray(canvas, dtype=bool)
        img[mask] = rng.uniform(0, 255, size=3)
        label[mask] = UNLABELLED
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_toy_ade20k(
    out_dir: str | Path, num_train: int = 200, num_val: int = 40, size: int = 128, seed: int = 0
) -> Path:
    """Write the toy dataset (see the module docstring for the layout).

    Args:
        out_dir: Dataset root, the ``data_root`` of the configs (created if needed; files of the
            same names are replaced).
        num_train: Number of training images.
        num_val: Number of validation images.
        size: Image height in pixels (at least 32, the largest MLLA output stride).
        seed: Seed; the two splits draw from independent streams of it.

    Returns:
        Path: The dataset root.

    Raises:
        ValueError: On an image count below 1 or a size below 32.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train and num_val must be >= 1, got {num_train} and {num_val}')
    if size < 32:
        raise ValueError(f'size must be at least 32 pixels (one MLLA output stride), got {size}')
    root = Path(out_dir)
    for split, count, stream in (('training', num_train, 0), ('validation', num_val, 1)):
        rng = np.random.default_rng([seed, stream])
        img_dir, ann_dir = root / 'images' / split, root / 'annotations' / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, label = draw_toy_sample(rng, size)
            Image.fromarray(img).save(img_dir / f'toy_{i:05d}.jpg', quality=95)
            Image.fromarray(label).save(ann_dir / f'toy_{i:05d}.png')
    return root


# ------------------------------------------------------------------------------------------
# Command line: mlla-make-toy ade20k [DIR], python -m mlla_mm.datasets.toy_ade20k [DIR]
# ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the toy ADE20K-layout set."""
    parser.add_argument('out_dir', nargs='?', default='data/toy_ade20k', help='output folder')
    parser.add_argument('--num-train', type=int, default=200)
    parser.add_argument('--num-val', type=int, default=40)
    parser.add_argument('--size', type=int, default=128, help='image height in pixels')
    parser.add_argument('--seed', type=int, default=0)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Write the toy ADE20K-layout set of ``args`` (:func:`add_arguments`)."""
    try:
        root = make_toy_ade20k(args.out_dir, args.num_train, args.num_val, args.size, args.seed)
    except ValueError as e:
        parser.error(str(e))
    print(
        f'toy ADE20K ({", ".join(CLASSES)}): {args.num_train} training / {args.num_val} '
        f'validation images in {root}'
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parse the options of :func:`add_arguments` and write the set."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv), parser)


if __name__ == '__main__':
    main(prog='python -m mlla_mm.datasets.toy_ade20k')
