"""A small COCO-format instance-segmentation dataset of coloured shapes, for demos and tests.

Every image holds a few non-overlapping shapes (``circle``, ``square``, ``triangle``) with polygon
masks on a textured background (low-frequency colour gradient, random stripes and pixel noise).
The colour of a shape is random (a saturated hue, whatever its class), so the class can only be
told from the shape: a detector has to learn shapes, not colours. The output is the layout of
``mmdet::_base_/datasets/coco_instance.py``::

    OUT/annotations/instances_train.json
    OUT/annotations/instances_val.json
    OUT/train/000000.png ...
    OUT/val/000000.png ...

Generation is deterministic given the seed (numpy's ``default_rng``).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['CLASSES', 'PALETTE', 'make_toy_coco', 'draw_toy_image']

CLASSES = ('circle', 'square', 'triangle')
# The colours predictions of each class are drawn in (the shapes themselves have random colours).
PALETTE = ((220, 60, 60), (60, 190, 70), (60, 100, 230))
_SIDES = {'circle': 32, 'square': 4, 'triangle': 3}
_STAMP = 'toy_coco_params.json'  # the arguments of a complete set, and the version below
_VERSION = 2  # of the drawing: a set drawn by another version is written again


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background: a grey-ish colour gradient, oriented stripes and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(90, 160, size=3)
    slope = rng.uniform(-40, 40, size=(2, 3))
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    for _ in range(rng.integers(1, 4)):
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(4, 16)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
        img += wave[..., None] * rng.uniform(5, 20) * rng.uniform(0.6, 1.0, size=3)
    img += rng.normal(0, 8, size=img.shape)
    return img


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour of random hue (HSV with S in [0.6, 1] and V in [0.65, 1])."""
    h, s, v = rng.uniform(0, 6), rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0)
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][int(h) % 6]
    return np.array(rgb) * 255


def _polygon(rng: np.random.Generator, name: str, cx: float, cy: float, r: float) -> list:
    """Vertices ``[(x, y), ...]`` of one shape of circumradius ``r`` at a random rotation."""
    n = _SIDES[name]
    rot = rng.uniform(0, 2 * math.pi / n)
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _area(poly: list) -> float:
    xs, ys = np.array(poly).T
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def draw_toy_image(
    rng: np.random.Generator, size: int = 128, max_objects: int = 3
) -> tuple[np.ndarray, list]:
    """Draw one image and its instances.

    Args:
        rng: Random generator (the only source of randomness).
        size: Image height and width in pixels.
        max_objects: Each image holds 1..max_objects shapes.

    Returns:
        tuple: ``(image, instances)``: a (size, size, 3) uint8 RGB array and a list of dicts with
        ``label`` (index into :data:`CLASSES`), ``polygon`` (list of (x, y)), ``bbox`` (x, y, w, h)
        and ``area``.
    """
    img = _background(rng, size)
    canvas = Image.fromarray(np.zeros((size, size), np.uint8))
    draw = ImageDraw.Draw(canvas)
    instances: list = []
    boxes: list = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            r = rng.uniform(0.09, 0.24) * size
            cx, cy = rng.uniform(r, size - r, size=2)
            box = (cx - r, cy - r, cx + r, cy + r)
            gap = 2.0
            if all(
                box[2] + gap < b[0]
                or b[2] + gap < box[0]
                or box[3] + gap < b[1]
                or b[3] + gap < box[1]
                for b in boxes
            ):
                break
        else:
            continue
        boxes.append(box)
        label = int(rng.integers(len(CLASSES)))
        poly = _polygon(rng, CLASSES[label], cx, cy, r)
        draw.rectangle((0, 0, size, size), fill=0)
        draw.polygon(poly, fill=1)
        mask = np.asarray(canvas, dtype=bool)
        colour = _random_colour(rng)
        shade = colour + rng.normal(0, 6, size=(int(mask.sum()), 3))
        img[mask] = shade
        xs, ys = np.array(poly).clip(0, size).T
        x0, y0 = float(xs.min()), float(ys.min())
        bbox = [x0, y0, float(xs.max()) - x0, float(ys.max()) - y0]
        instances.append(dict(label=label, polygon=poly, bbox=bbox, area=_area(poly)))
    return np.clip(img, 0, 255).astype(np.uint8), instances


def _write_split(
    out_dir: Path, split: str, num_images: int, size: int, max_objects: int, seed: int
) -> Path:
    rng = np.random.default_rng(seed)
    img_dir = out_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img, instances = draw_toy_image(rng, size, max_objects)
        file_name = f'{i:06d}.png'
        Image.fromarray(img).save(img_dir / file_name)
        images.append(dict(id=i + 1, file_name=file_name, height=size, width=size))
        for inst in instances:
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=i + 1,
                    category_id=inst['label'] + 1,
                    segmentation=[[round(c, 2) for xy in inst['polygon'] for c in xy]],
                    bbox=[round(c, 2) for c in inst['bbox']],
                    area=round(inst['area'], 2),
                    iscrowd=0,
                )
            )
    coco = dict(
        info=dict(description=f'mlla_mm toy COCO ({split}, seed {seed})'),
        images=images,
        annotations=annotations,
        categories=[dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)],
    )
    ann_file = out_dir / 'annotations' / f'instances_{split}.json'
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(coco))
    return ann_file


def make_toy_coco(
    out_dir: str | Path,
    num_train: int = 400,
    num_val: int = 50,
    size: int = 128,
    max_objects: int = 3,
    seed: int = 0,
    skip_existing: bool = False,
) -> dict:
    """Write the toy dataset (see the module docstring for the layout).

    Args:
        out_dir: Root folder (created if needed; existing files of the same names are replaced).
        num_train: Number of training images.
        num_val: Number of validation images.
        size: Image side in pixels (at least 32).
        max_objects: At most this many shapes per image (at least 1).
        seed: Seed; the train and val splits use ``seed`` and ``seed + 1``.
        skip_existing: Return at once if ``out_dir`` already holds a complete set written with
            the same arguments (``make demo`` runs this every time).

    Returns:
        dict: ``{'train': ann_file, 'val': ann_file}`` paths.
    """
    if size < 32:
        raise ValueError(f'size must be at least 32 pixels (one MLLA output stride), got {size}')
    if max_objects < 1 or num_train < 1 or num_val < 1:
        raise ValueError(
            f'num_train, num_val and max_objects must be >= 1, got {num_train}, {num_val}, '
            f'{max_objects}'
        )
    out = Path(out_dir)
    params = dict(
        num_train=num_train,
        num_val=num_val,
        size=size,
        max_objects=max_objects,
        seed=seed,
        version=_VERSION,
    )
    stamp = out / _STAMP
    files = {split: out / 'annotations' / f'instances_{split}.json' for split in ('train', 'val')}
    complete = stamp.is_file() and all(f.is_file() for f in files.values())
    if skip_existing and complete and json.loads(stamp.read_text()) == params:
        return files
    stamp.unlink(missing_ok=True)  # written last: a half-written set is never taken as complete
    _write_split(out, 'train', num_train, size, max_objects, seed)
    _write_split(out, 'val', num_val, size, max_objects, seed + 1)
    stamp.write_text(json.dumps(params))
    return files


# ------------------------------------------------------------------------------------------
# Command line: mlla-make-toy coco [DIR], python -m mlla_mm.datasets.toy_coco [DIR]
# ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the toy COCO set."""
    parser.add_argument('out_dir', nargs='?', default='data/toy_coco', help='output folder')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=50)
    parser.add_argument('--size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--max-objects', type=int, default=3, help='shapes per image (max)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true', help='rewrite an existing set')


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Write the toy COCO set of ``args`` (:func:`add_arguments`) and say where it is."""
    try:
        files = make_toy_coco(
            args.out_dir,
            args.num_train,
            args.num_val,
            args.size,
            args.max_objects,
            args.seed,
            skip_existing=not args.force,
        )
    except ValueError as e:
        parser.error(str(e))
    print(f'toy COCO ({", ".join(CLASSES)}): {args.num_train} train / {args.num_val} val images')
    for split, path in files.items():
        print(f'  {split}: {path}')


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parse the options of :func:`add_arguments` and write the set."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv), parser)


if __name__ == '__main__':
    main(prog='python -m mlla_mm.datasets.toy_coco')
