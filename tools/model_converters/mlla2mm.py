"""Convert an official MLLA checkpoint to this package's mmpretrain / mmdet 3 / mmseg 1 layout.

Examples:
    python tools/model_converters/mlla2mm.py mlla_t.pth mlla_t_in1k_mmpretrain.pth --task cls
    python tools/model_converters/mlla2mm.py mlla_t_mrcnn_1x.pth mask_rcnn_mlla_t.pth --task det
    python tools/model_converters/mlla2mm.py mlla_b_upernet.pth upernet_mlla_b.pth --task seg
    python tools/model_converters/mlla2mm.py my.pth out.pth --task cls \
        --arch '{"embed_dims": 32, "depths": [1, 2, 2, 1], "num_heads": [1, 2, 4, 8]}'
"""

import argparse
import json
import sys

from mlla_mm.apis.conversion import convert_checkpoint


def parse_arch(text: str):
    """``--arch``: a variant name, or a JSON object of a custom arch."""
    if not text.lstrip().startswith('{'):
        return text
    try:
        arch = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'--arch is not valid JSON ({e}): {text}') from e
    if not isinstance(arch, dict):
        raise argparse.ArgumentTypeError(f'--arch JSON must be an object, got {text}')
    return arch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='where to save the converted checkpoint')
    parser.add_argument('--task', choices=['cls', 'det', 'seg'], required=True)
    parser.add_argument(
        '--arch',
        type=parse_arch,
        help='tiny|small|base, or a JSON dict with embed_dims, depths (and num_heads); checked '
        'against the weights (default: read from the weights)',
    )
    parser.add_argument(
        '--key', help='entry holding the weights, e.g. model_ema (default: model/state_dict)'
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ckpt = convert_checkpoint(args.src, args.dst, args.task, args.arch, args.key)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f'mlla2mm: error: {e}', file=sys.stderr)
        return 1
    arch = ckpt['meta']['arch']
    print(
        f'mlla2mm: wrote {len(ckpt["state_dict"])} tensors ({args.task}, arch {arch}) to {args.dst}'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
