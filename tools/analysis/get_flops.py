"""Params and FLOPs (multiply-accumulates) of an MLLA backbone or of a whole config.

    python tools/analysis/get_flops.py --arch tiny --shape 224 --num-classes 1000
    python tools/analysis/get_flops.py configs/mask_rcnn_mlla_t.py --shape 800 1280
    python tools/analysis/get_flops.py CONFIG --shape 512 512 --backbone-only --json out.json

Unlike module-hook counters, the count includes the linear-attention matrix products (``k^T v``,
``q (k^T v)``, the normaliser), reported as the ``attention`` kind; see ``mlla_mm/flops.py``.
"""

import argparse
import json

from mmengine.config import DictAction

from mlla_mm.analysis.flops import backbone_flops, config_flops


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Count params and FLOPs (MACs)')
    parser.add_argument('config', nargs='?', help='mmdet/mmseg/mmpretrain config (whole model)')
    parser.add_argument('--arch', default='tiny', help='MLLA arch when no config is given')
    parser.add_argument(
        '--shape', type=int, nargs='+', default=None, help='input height [width]; '
        'default 224 for --arch, 800 1280 for a config',
    )  # fmt: skip
    parser.add_argument(
        '--num-classes', type=int, default=0, help='--arch: add a classification head'
    )
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--backbone-only', action='store_true', help='config: count the backbone')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override keys')
    parser.add_argument('--json', help='also write the report to this JSON file')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = args.shape or ([800, 1280] if args.config else [224])
    if len(shape) not in (1, 2):
        raise SystemExit(f'--shape takes a height and an optional width, got {shape}')
    height, width = shape[0], shape[-1]
    if args.config:
        report = config_flops(
            args.config, height, width, args.cfg_options, backbone_only=args.backbone_only
        )
        what = f'{args.config}' + (' (backbone)' if args.backbone_only else '')
    else:
        report = backbone_flops(args.arch, height, width, args.num_classes, args.batch_size)
        head = f' + {args.num_classes}-class head' if args.num_classes else ''
        what = f'MLLA {args.arch}{head}'
    print(what)
    print(report.summary())
    result = dict(model=what, **report.to_dict())
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
