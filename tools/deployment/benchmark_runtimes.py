"""Time models across runtimes in one run: PyTorch eager (fp32, bf16 autocast), onnxruntime and
OpenVINO (fp32, bf16), same input, same threads, all runners interleaved.

MLLA is exported through the deploy-time rewrite (mlla_mm.deploy.export_friendly) unless
--no-optimize; --plain also times onnxruntime on the export without it. Peers (e.g. swin_t) are
exported with torch.onnx.export as they are, at the timed size. OpenVINO compiles every file
for the timed input shape (--dynamic-openvino: for the files' own shapes).

Examples:
    python tools/deployment/benchmark_runtimes.py --models mlla_t swin_t --size 1280x800 \\
        --threads 2 --repeats 5
    python tools/deployment/benchmark_runtimes.py --models mlla_t --runtimes eager onnxruntime \\
        --size 320x256 --repeats 3
"""

import argparse
import json
import os
import tempfile

# OpenMP threads that sleep when idle, as onnxruntime's (spinning off) and OpenVINO's: with
# spinning threads PyTorch's 2-thread runs slow down 2-4x on a CPU shared with other jobs
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from mlla_mm.analysis.benchmark.measure import parse_size
from mlla_mm.analysis.benchmark.peers import ARCH_ALIASES, PEERS, build_peer
from mlla_mm.deploy import build_whole_model
from mlla_mm.deploy.export_friendly import LAYOUTS
from mlla_mm.deploy.runtimes import RUNTIMES, benchmark_models, describe_cpu, summarise
from mlla_mm.utils.command_line import user_errors

DEFAULT_RUNTIMES = ['eager', 'eager-bf16', 'onnxruntime', 'openvino', 'openvino-bf16']


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--models', nargs='*', default=['mlla_t', 'swin_t'], help=f'of {sorted(PEERS)}'
    )
    parser.add_argument(
        '--config',
        nargs='+',
        default=[],
        help='also whole models of these configs (segmentor -> logits, Mask R-CNN -> detections; '
        'random weights unless --checkpoint)',
    )
    parser.add_argument('--checkpoint', nargs='+', default=[], help='one per --config')
    parser.add_argument('--size', default='1280x800', help='WIDTHxHEIGHT of the input')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--runtimes', nargs='+', default=DEFAULT_RUNTIMES, choices=sorted(RUNTIMES))
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--work-dir', help='where the ONNX files go (default: a temporary folder)')
    parser.add_argument(
        '--no-optimize', action='store_true', help='export MLLA without the rewrite'
    )
    parser.add_argument(
        '--plain', action='store_true', help='also time the export without the rewrite'
    )
    parser.add_argument(
        '--layout', choices=LAYOUTS, default=LAYOUTS[0], help='token layout of the rewrite'
    )
    parser.add_argument(
        '--dynamic-openvino',
        action='store_true',
        help="compile OpenVINO for the files' dynamic shapes, not for the timed input shape",
    )
    parser.add_argument('--json', help='write the times and the summary to this file')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    shape = parse_size(args.size)
    models = {name: build_peer(ARCH_ALIASES.get(name, name)) for name in args.models}
    for i, config in enumerate(args.config):
        checkpoint = args.checkpoint[i] if i < len(args.checkpoint) else None
        models[os.path.splitext(os.path.basename(config))[0]] = build_whole_model(
            config, checkpoint
        )
    for model in models.values():
        model.eval()  # (mmdet's SwinTransformer.train returns None)
    print(f'CPU: {describe_cpu()}; {args.threads} threads; input 1x3x{shape[0]}x{shape[1]}')
    with tempfile.TemporaryDirectory() as tmp:
        times = benchmark_models(
            models, shape, args.runtimes, args.work_dir or tmp, args.threads, args.repeats,
            args.warmup, optimize=not args.no_optimize, plain=args.plain, layout=args.layout,
            static_openvino=not args.dynamic_openvino,
        )  # fmt: skip
    rows = []
    for name in models:
        mine = {k: v for k, v in times.items() if k.startswith(f'{name} ')}
        rows += summarise(mine, f'{name} eager' if f'{name} eager' in mine else None)
    print(f'{"runner":42s} {"median ms":>10s} {"range ms":>16s} {"x eager":>8s}')
    for r in rows:
        ratio = f'{r["ratio"]:.2f}' if r['ratio'] else '-'
        span = f'{r["min_ms"]:.0f}-{r["max_ms"]:.0f}'
        print(f'{r["runner"]:42s} {r["median_ms"]:10.0f} {span:>16s} {ratio:>8s}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(
                dict(cpu=describe_cpu(), args=vars(args), times=times, rows=rows), f, indent=1
            )


if __name__ == '__main__':
    with user_errors():
        main()
