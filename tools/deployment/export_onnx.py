"""Export an MLLA backbone (or a whole segmentor/classifier, or a detector's backbone + neck) to
ONNX with dynamic batch, height and width, then check onnxruntime against PyTorch at two other
input sizes (one non-square, one not a multiple of 32); exits with 1 above the tolerance.

Examples:
    python tools/deployment/export_onnx.py --arch tiny --shape 224 224 --out mlla_t.onnx
    python tools/deployment/export_onnx.py --arch small --checkpoint MLLA_S.pth --out mlla_s.onnx
    python tools/deployment/export_onnx.py --config configs/upernet_mlla_t.py --whole-model \
        --checkpoint upernet_mlla_t.pth --shape 512 512 --out upernet_mlla_t.onnx
"""

import argparse
import os
import sys
import time

import torch

from mlla_mm.deploy import (
    EXPORTERS,
    assert_parity,
    build_backbone,
    build_whole_model,
    check_onnx_parity,
    default_check_shapes,
    export_onnx,
    onnx_io_dims,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    source.add_argument('--config', help='config of this package (its model.backbone is used)')
    parser.add_argument('--checkpoint', help="official or this package's checkpoint")
    parser.add_argument(
        '--whole-model',
        action='store_true',
        help='with --config: export the segmentor (logits) / classifier (logits) / detector '
        '(backbone + neck features) instead of the backbone',
    )
    parser.add_argument('--shape', type=int, nargs=2, default=(224, 224), metavar=('H', 'W'))
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--exporter', choices=EXPORTERS, default='torchscript')
    parser.add_argument('--opset', type=int, help='ONNX opset (default: the exporter default)')
    parser.add_argument(
        '--check-shape',
        type=int,
        nargs=2,
        action='append',
        metavar=('H', 'W'),
        help='input size of a parity check (repeatable; default: two sizes derived from --shape)',
    )
    parser.add_argument('--check-batch', type=int, default=3, help='batch of the parity checks')
    parser.add_argument('--tol', type=float, default=1e-4, help='max relative error allowed')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random initialisation')
    args = parser.parse_args(argv)
    if args.whole_model and not args.config:
        parser.error('--whole-model needs --config')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # reproducible random weights where no checkpoint gives them
    if args.whole_model:
        model = build_whole_model(args.config, args.checkpoint)
    else:
        model = build_backbone(args.arch, args.config, args.checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    start = time.perf_counter()
    export_onnx(model, args.out, args.shape, exporter=args.exporter, opset=args.opset)
    print(f'export_onnx: wrote {args.out} ({args.exporter}, {time.perf_counter() - start:.1f} s)')
    for name, dims in onnx_io_dims(args.out).items():
        print(f'  {name}: {dims}')
    shapes = args.check_shape or default_check_shapes(args.shape)
    results = check_onnx_parity(model, args.out, shapes, batch=args.check_batch)
    for result in results:
        print(f'  onnxruntime vs PyTorch at {result}')
    try:
        assert_parity(results, args.tol)
    except AssertionError as e:
        print(f'export_onnx: FAILED: {e}', file=sys.stderr)
        return 1
    worst = max(r.max_rel_err for r in results)
    print(f'export_onnx: parity OK (max rel err {worst:.2e} <= {args.tol:g})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
