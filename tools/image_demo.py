"""Run a detector, segmentor or classifier on images and draw the results.

    python tools/image_demo.py IMG_OR_FOLDER CONFIG CHECKPOINT [--out-file OUT.png]
        [--out-dir DIR] [--device cpu] [--batch-size 1] [--score-thr 0.3] [--opacity 0.5]
        [--topk 5] [--cfg-options key=value ...] [--skip-checkpoint-check] [--threads N]
        [--debug]

CONFIG is a file or ``mlla_mm::NAME`` (a shipped config). The task comes from the config's
``default_scope``; the model is built once (``mlla_mm.MLLAInferencer``) and run on the image, or
on every image of a folder. A checkpoint of another task is refused (as by tools/test.py). Prints
what was found as JSON (one object for an image, a list for a folder), and only that on stdout.
"""

import argparse
import contextlib
import json
import os.path as osp
import sys

from mmengine.config import DictAction

from mlla_mm.apis.inference import MLLAInferencer, read_images, summarise
from mlla_mm.utils.command_line import add_common_args, setup_threads, user_errors
from mlla_mm.utils.console import silence_library_warnings
from mlla_mm.utils.errors import InputError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Inference on an image or a folder of images')
    parser.add_argument('img', help='image file, or a folder of images')
    parser.add_argument('config', help='config file, or mlla_mm::NAME for a shipped config')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out-file', help='drawing of the result of one image (PNG/JPEG)')
    parser.add_argument('--out-dir', help='folder for the drawings (one per image)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch-size', type=int, default=1, help='images per forward pass')
    parser.add_argument('--score-thr', type=float, default=0.3, help='detection score threshold')
    parser.add_argument('--opacity', type=float, default=0.5, help='segmentation overlay opacity')
    parser.add_argument('--topk', type=int, default=5, help='classification: classes to report')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys')
    parser.add_argument(
        '--skip-checkpoint-check',
        action='store_true',
        help='run even if the checkpoint lacks weights of the model (they stay random)',
    )
    add_common_args(parser)
    return parser.parse_args(argv)


def _json(found, pad: str = '') -> str:
    """JSON with one line per detection / class, for people to read (and still JSON)."""
    if isinstance(found, list):
        return '[\n' + ',\n'.join(_json(f, ' ') for f in found) + '\n]'
    items = []
    for key, value in found.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            rows = ',\n'.join(f'{pad}  {json.dumps(v)}' for v in value)
            items.append(f'{pad} {json.dumps(key)}: [\n{rows}\n{pad} ]')
        else:
            items.append(f'{pad} {json.dumps(key)}: {json.dumps(value)}')
    return f'{pad}{{\n' + ',\n'.join(items) + f'\n{pad}}}'


def main(argv=None) -> list | dict:
    args = parse_args(argv)
    silence_library_warnings()
    # stdout carries the JSON alone (`mlla-demo ... | python -m json.tool`): whatever the
    # libraries print while the model is built and run goes to stderr.
    with user_errors(debug=args.debug), contextlib.redirect_stdout(sys.stderr):
        if args.out_file and osp.isdir(args.img):
            raise InputError(
                f'{args.img!r} is a folder: draw its images with --out-dir DIR, not --out-file'
            )
        if args.topk < 1 or args.batch_size < 1:
            raise InputError('--topk and --batch-size must be at least 1')
        setup_threads(args.threads)
        read_images(args.img)  # a missing or unreadable image fails before the model is built
        inferencer = MLLAInferencer(
            args.config,
            args.checkpoint,
            device=args.device,
            cfg_options=args.cfg_options,
            check_checkpoint=not args.skip_checkpoint_check,
        )
        results = inferencer(
            args.img,
            batch_size=args.batch_size,
            score_thr=args.score_thr,
            topk=args.topk,
            out_file=args.out_file,
            out_dir=args.out_dir,
            opacity=args.opacity,
        )
    found = [summarise(r) for r in results] if isinstance(results, list) else summarise(results)
    print(_json(found))
    return found


if __name__ == '__main__':
    main()
