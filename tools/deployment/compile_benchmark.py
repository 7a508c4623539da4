"""Does ``torch.compile`` pay for an MLLA backbone here? Eager against compiled latency per input
size (interleaved rounds, no autograd), compile time, compiled graphs and graph breaks.

Examples:
    python tools/deployment/compile_benchmark.py --arch tiny --shape 224 224 --static
    python tools/deployment/compile_benchmark.py --arch tiny --shape 224 224 --shape 229 301
"""

import argparse
import json

import torch

from mlla_mm.deploy import benchmark_compile, build_backbone


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    parser.add_argument(
        '--shape', type=int, nargs=2, action='append', metavar=('H', 'W'), help='repeatable'
    )
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--backend', default='inductor')
    parser.add_argument('--static', action='store_true', help='dynamic=False (default: True)')
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--threads', type=int, help='torch.set_num_threads')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_backbone(args.arch)
    stats = benchmark_compile(
        model,
        args.shape or [(224, 224)],
        batch=args.batch,
        backend=args.backend,
        dynamic=not args.static,
        repeats=args.repeats,
    )
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}')
    for row in stats['rows']:
        print(json.dumps(row))
    print(f'compiled graphs: {stats["graphs"]}, graph breaks: {stats["graph_breaks"] or "none"}')


if __name__ == '__main__':
    main()
