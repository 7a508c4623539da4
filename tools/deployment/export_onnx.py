"""Export an MLLA backbone, or a whole segmentor/classifier/Mask R-CNN, to ONNX with dynamic
height and width (and batch, except Mask R-CNN: one image), then check onnxruntime against PyTorch
at other input sizes; exits with 1 when they differ.

Backbone, segmentor, classifier: random inputs at two other sizes (one non-square, one not a
multiple of 32), max relative error against --tol. Mask R-CNN (--whole-model on a detection
config): image in, boxes/scores/labels/masks out, one graph of standard ONNX operators; checked
against mmdet's predict() on skimage photographs and toy-set images (detections above
--match-score-thr matched: same label, box IoU >= 0.99, |score diff| <= 1e-3, mask IoU >= 0.98).

Examples:
    python tools/deployment/export_onnx.py --arch tiny --shape 224 224 --out mlla_t.onnx
    python tools/deployment/export_onnx.py --arch small --checkpoint MLLA_S.pth --out mlla_s.onnx
    python tools/deployment/export_onnx.py --config configs/upernet_mlla_t.py --whole-model \
        --checkpoint upernet_mlla_t.pth --shape 512 512 --out upernet_mlla_t.onnx
    python tools/deployment/export_onnx.py --config configs/mask_rcnn_mlla_t.py --whole-model \
        --checkpoint mask_rcnn_mlla_t.pth --out mask_rcnn_mlla_t.onnx --benchmark 3
"""

import argparse
import os
import sys
import time

import torch
from mmengine.config import Config, DictAction

from mlla_mm.deploy import (
    EXPORTERS,
    assert_parity,
    build_backbone,
    build_whole_model,
    check_onnx_parity,
    default_check_shapes,
    export_onnx,
    onnx_io_dims,
    require_exporter,
)
from mlla_mm.deploy.export_friendly import LAYOUTS, export_friendly
from mlla_mm.deploy.mask_rcnn_export import (
    export_detector_onnx,
    onnx_ops,
)
from mlla_mm.deploy.mask_rcnn_graph import (
    DIFFERENCES,
    MaskRCNNGraph,
)
from mlla_mm.deploy.mask_rcnn_parity import (
    assert_det_parity,
    benchmark_detector,
    check_detector_parity,
    detection_check_images,
)
from mlla_mm.utils import require
from mlla_mm.utils.command_line import user_errors
from mlla_mm.utils.config_loader import load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    source.add_argument('--config', help='config of this package (its model.backbone is used)')
    parser.add_argument('--checkpoint', help="official or this package's checkpoint")
    parser.add_argument(
        '--whole-model',
        action='store_true',
        help='with --config: export the segmentor (logits) / classifier (logits) / Mask R-CNN '
        '(boxes, scores, labels, masks) instead of the backbone',
    )
    parser.add_argument('--shape', type=int, nargs=2, default=(224, 224), metavar=('H', 'W'))
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument('--exporter', choices=EXPORTERS, default='torchscript')
    parser.add_argument(
        '--no-optimize',
        action='store_true',
        help='export the plain module forward instead of the graph rewritten for ONNX runtimes '
        '(mlla_mm.deploy.export_friendly; checked against the unmodified model either way)',
    )
    parser.add_argument(
        '--layout',
        choices=LAYOUTS,
        default=LAYOUTS[0],
        help='token layout of the rewritten MLLA stages: nchw (default, faster in onnxruntime and '
        'OpenVINO where measured) or nhwc (2-D tokens, Gemm linears); see docs/deployment.md',
    )
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
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction, help='with --config: override config keys'
    )
    det = parser.add_argument_group('Mask R-CNN (--whole-model on a detection config)')
    det.add_argument(
        '--match-score-thr',
        type=float,
        default=0.3,
        help='detections above this score must match between onnxruntime and mmdet',
    )
    det.add_argument('--toy-images', type=int, default=2, help='toy-set images to check on')
    det.add_argument('--no-photos', action='store_true', help='skip the skimage.data photographs')
    det.add_argument(
        '--benchmark',
        type=int,
        default=0,
        metavar='N',
        help='then time mmdet eager against onnxruntime on the first check image (median of N)',
    )
    det.add_argument('--threads', type=int, default=0, help='onnxruntime threads (0: default)')
    parser.add_argument(
        '--debug', action='store_true', help='show the traceback of an error (MLLA_MM_DEBUG=1)'
    )
    args = parser.parse_args(argv)
    if args.whole_model and not args.config:
        parser.error('--whole-model needs --config')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with user_errors(debug=args.debug):
        return _main(args)


def _main(args) -> int:
    require_exporter(args.exporter)  # one line naming the deploy extra, before any work
    require('onnxruntime', 'the parity checks of the export')
    torch.manual_seed(args.seed)  # reproducible random weights where no checkpoint gives them
    config = args.config
    if config:
        config = load_config(config, args.cfg_options)
    if args.whole_model:
        model = build_whole_model(config, args.checkpoint)
        if isinstance(model, MaskRCNNGraph):
            return _export_detector(args, model, config)
    else:
        model = build_backbone(args.arch, config, args.checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    start = time.perf_counter()
    exported = model if args.no_optimize else export_friendly(model, args.layout)
    export_onnx(exported, args.out, args.shape, exporter=args.exporter, opset=args.opset)
    kind = 'plain' if args.no_optimize or exported is model else f'rewritten, {args.layout}'
    print(f'export_onnx: wrote {args.out} ({args.exporter}, {kind}, '
          f'{time.perf_counter() - start:.1f} s)')  # fmt: skip
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


def _export_detector(args, graph: MaskRCNNGraph, config) -> int:
    """--whole-model on a detection config: the whole Mask R-CNN, checked against mmdet."""
    if args.exporter != 'torchscript' or args.check_shape:
        print('export_onnx: Mask R-CNN exports with --exporter torchscript and is checked on '
              'images (--toy-images, --no-photos), not --check-shape', file=sys.stderr)  # fmt: skip
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    start = time.perf_counter()
    exported = graph if args.no_optimize else export_friendly(graph, args.layout)
    export_detector_onnx(exported, args.out, args.shape, opset=args.opset or 17)
    print(f'export_onnx: wrote {args.out} (Mask R-CNN, traced at 1x3x{args.shape[0]}x'
          f'{args.shape[1]}, {time.perf_counter() - start:.1f} s)')  # fmt: skip
    for name, dims in onnx_io_dims(args.out).items():
        print(f'  {name}: {dims}')
    ops = onnx_ops(args.out)
    custom = sorted(op for op in ops if '::' in op)
    print(f'  operators: {", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))}')
    print(f'  custom-domain operators: {custom or "none (standard ONNX only)"}')
    cfg = config if isinstance(config, Config) else load_config(config)
    images = detection_check_images(cfg, not args.no_photos, args.toy_images)
    results = check_detector_parity(
        graph.detector, args.out, images, args.match_score_thr, args.threads
    )
    for r in results:
        print(f'  onnxruntime vs mmdet predict(): {r} [mmdet {r.torch_ms:.0f} ms, '
              f'onnxruntime {r.onnx_ms:.0f} ms]')  # fmt: skip
    print('  not bit-exact with mmdet 3.3 (see docs/deployment.md):')
    for line in DIFFERENCES:
        print(f'    - {line}')
    if args.benchmark:
        name, image = images[0]
        bench = benchmark_detector(graph.detector, args.out, image, args.benchmark, args.threads)
        print(f'  latency on {name} {image.shape[0]}x{image.shape[1]} (median of '
              f'{args.benchmark}, {torch.get_num_threads()} torch threads): mmdet eager '
              f'{bench["eager_ms"]:.0f} ms, onnxruntime {bench["onnx_ms"]:.0f} ms')  # fmt: skip
    if custom:
        print(f'export_onnx: FAILED: custom operators {custom}', file=sys.stderr)
        return 1
    try:
        assert_det_parity(results)
    except AssertionError as e:
        print(f'export_onnx: FAILED: {e}', file=sys.stderr)
        return 1
    matched = sum(r.matched for r in results)
    if not any(r.reference for r in results):
        print(f'export_onnx: WARNING: no detection above {args.match_score_thr:g} on any image '
              '(random weights?): the check compared no detection; pass --checkpoint')  # fmt: skip
    print(f'export_onnx: parity OK ({matched} detections matched on {len(results)} images)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
