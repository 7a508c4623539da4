"""``mlla-make-toy {coco,ade20k} [DIR]``: write a toy dataset that the toy configs read.

    mlla-make-toy coco data/toy_coco        # configs/toy/mask_rcnn_mlla_t_toy.py (mmdet)
    mlla-make-toy ade20k data/toy_ade20k    # configs/toy/upernet_mlla_t_toy.py (mmseg)

Also ``python -m mlla_mm.datasets {coco,ade20k} [DIR]`` and, from a checkout,
``tools/misc/make_toy_{coco,ade20k}.py [DIR]``. The folders are the toy configs' ``data_root``
(relative to the folder the tools run in).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ['DEFAULT_DIRS', 'add_ade20k_args', 'add_coco_args', 'main', 'run_ade20k', 'run_coco']

# The data_root of each toy config
DEFAULT_DIRS = {'coco': 'data/toy_coco', 'ade20k': 'data/toy_ade20k'}


def add_coco_args(parser: argparse.ArgumentParser) -> None:
    """The options of the toy COCO set."""
    parser.add_argument('out_dir', nargs='?', default=DEFAULT_DIRS['coco'], help='output folder')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=50)
    parser.add_argument('--size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--max-objects', type=int, default=3, help='shapes per image (max)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true', help='rewrite an existing set')


def add_ade20k_args(parser: argparse.ArgumentParser) -> None:
    """The options of the toy ADE20K-layout set."""
    parser.add_argument('out_dir', nargs='?', default=DEFAULT_DIRS['ade20k'], help='output folder')
    parser.add_argument('--num-train', type=int, default=200)
    parser.add_argument('--num-val', type=int, default=40)
    parser.add_argument('--size', type=int, default=128, help='image height in pixels')
    parser.add_argument('--seed', type=int, default=0)


def run_coco(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Write the toy COCO set of ``args`` (:func:`add_coco_args`) and say where it is."""
    from .toy_coco import CLASSES, make_toy_coco

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


def run_ade20k(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Write the toy ADE20K-layout set of ``args`` (:func:`add_ade20k_args`)."""
    from .toy_ade20k import CLASSES, make_toy_ade20k

    try:
        root = make_toy_ade20k(args.out_dir, args.num_train, args.num_val, args.size, args.seed)
    except ValueError as e:
        parser.error(str(e))
    print(
        f'toy ADE20K ({", ".join(CLASSES)}): {args.num_train} training / {args.num_val} '
        f'validation images in {root}'
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parse ``{coco,ade20k} [DIR] [options]`` and write that toy set.

    Args:
        argv: The arguments; ``sys.argv[1:]`` when None.
        prog: The program name in usage and errors.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description='Write a toy dataset for the toy configs (mlla_mm::toy/...)',
    )
    sets = parser.add_subparsers(dest='dataset', metavar='{coco,ade20k}', required=True)
    coco = sets.add_parser(
        'coco', help='instance segmentation, COCO layout (toy/mask_rcnn_mlla_t_toy.py)'
    )
    add_coco_args(coco)
    coco.set_defaults(run=run_coco, parser=coco)
    ade = sets.add_parser(
        'ade20k', help='semantic segmentation, ADE20K layout (toy/upernet_mlla_t_toy.py)'
    )
    add_ade20k_args(ade)
    ade.set_defaults(run=run_ade20k, parser=ade)
    args = parser.parse_args(argv)
    args.run(args, args.parser)
