"""Convert an official MLLA checkpoint to this package's mmpretrain / mmdet 3 / mmseg 1 layout.

Examples:
    python tools/model_converters/mlla2mm.py mlla_t.pth mlla_t_in1k_mmpretrain.pth --task cls
    python tools/model_converters/mlla2mm.py mlla_t_mrcnn_1x.pth mask_rcnn_mlla_t.pth --task det
    python tools/model_converters/mlla2mm.py mlla_b_upernet.pth upernet_mlla_b.pth --task seg
"""

import argparse
import sys

from mlla_mm.convert import convert_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='where to save the converted checkpoint')
    parser.add_argument('--task', choices=['cls', 'det', 'seg'], required=True)
    parser.add_argument('--arch', help='tiny|small|base (default: inferred from the weights)')
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
    print(f'mlla2mm: wrote {len(ckpt["state_dict"])} tensors ({args.task}) to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
