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

from . import toy_ade20k, toy_coco

__all__ = ['main']


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
    for module, help_text in (
        (toy_coco, 'instance segmentation, COCO layout (toy/mask_rcnn_mlla_t_toy.py)'),
        (toy_ade20k, 'semantic segmentation, ADE20K layout (toy/upernet_mlla_t_toy.py)'),
    ):
        sub = sets.add_parser(module.__name__.rsplit('_', 1)[1], help=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, parser=sub)
    args = parser.parse_args(argv)
    args.run(args, args.parser)
