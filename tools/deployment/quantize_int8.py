"""Static int8 post-training quantisation (NNCF) of a detector's MLLA backbone, calibrated on
training images, and the detector's accuracy on its validation set with the float and the int8
backbone in onnxruntime and OpenVINO (mmdet's evaluator; exits 1 when int8 loses more than
--max-drop bbox mAP_50 in any runtime).

Example (the toy detector of `make demo`):
    python tools/deployment/quantize_int8.py configs/toy/mask_rcnn_mlla_t_toy.py \\
        work_dirs/deploy_toy/iter_250.pth --work-dir work_dirs/int8
"""

import argparse
import json
import logging
import os
import sys

from mlla_mm.deploy.quantize import FLOAT_NODES, PRESETS, _map50, quantize_detector_backbone
from mlla_mm.utils.command_line import user_errors


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--work-dir', default='work_dirs/int8')
    parser.add_argument('--calibration', type=int, default=64, help='training images')
    parser.add_argument('--runtimes', nargs='+', default=['onnxruntime', 'openvino'])
    parser.add_argument(
        '--float-nodes',
        nargs='*',
        default=list(FLOAT_NODES),
        help='ONNX node name patterns kept in float (default: the attention products and the '
        "stem's first conv; none: quantise everything)",
    )
    parser.add_argument(
        '--preset',
        choices=PRESETS,
        default=PRESETS[0],
        help='NNCF preset: symmetric (performance) or asymmetric (mixed) int8 activations',
    )
    parser.add_argument('--max-drop', type=float, default=0.01)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = quantize_detector_backbone(
        args.config, args.checkpoint, args.work_dir, args.calibration, args.runtimes,
        ignored_names=args.float_nodes, preset=args.preset,
    )  # fmt: skip
    with open(os.path.join(args.work_dir, 'int8_metrics.json'), 'w') as f:
        json.dump(result, f, indent=1, default=float)
    base = _map50(result['metrics']['eager'])
    print(f'bbox mAP_50: eager fp32 {base:.4f}')
    worst = 0.0  # rounded: mAP_50 moves in steps of the evaluator's precision
    for name, metrics in result['metrics'].items():
        value = _map50(metrics)
        print(f'  {name:24s} {value:.4f} ({value - base:+.4f})')
        if name.endswith('int8'):
            worst = max(worst, round(base - value, 6))
    if worst > args.max_drop:
        print(f'quantize_int8: FAILED: int8 loses {worst:.4f} bbox mAP_50 (> {args.max_drop})')
        return 1
    print(f'quantize_int8: OK (int8 within {args.max_drop} bbox mAP_50 of float32)')
    return 0


def _exit(code: int) -> None:
    """End the process with ``code`` once logging and the console are flushed, skipping the exit
    handlers and the interpreter's finalisation: after runs that evaluated with OpenVINO, the exit
    handlers segfaulted (exit status 139) with every result already written (every full run here;
    not with onnxruntime alone, nor after one OpenVINO evaluation alone; cause not isolated)."""
    logging.shutdown()  # flushes and closes the log files
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == '__main__':
    with user_errors():
        _exit(main())
