"""Latency, throughput, peak memory and FLOPs of MLLA and its peers over a resolution sweep.

    # backbones: MLLA-T against the plain transcription, Swin-T, ConvNeXt-T, ResNet-50, ViT-B/16
    python tools/benchmark.py --arch tiny --out work_dirs/bench
    # the 1280x800 targets, 2 threads, 7 interleaved repeats
    python tools/benchmark.py --models mlla_t mlla_t_plain swin_t --sizes 1280x800 --repeats 7
    # bf16: autocast, and a bf16 model (AMX / AVX512-BF16 kernels where the CPU has them)
    python tools/benchmark.py --models mlla_t swin_t --sizes 1280x800 --dtype bf16
    python tools/benchmark.py --models mlla_t swin_t --sizes 1280x800 --dtype bf16-model
    # a training step, and activation checkpointing
    python tools/benchmark.py --models mlla_t mlla_t_cp mlla_t_plain --mode train --sizes 1280x800
    # whole models from configs (any mmdet / mmseg / mmpretrain config, mmdet:: paths too)
    python tools/benchmark.py --config configs/mask_rcnn_mlla_t.py \
        mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py --sizes 1280x800

Writes ``results.json``, ``results.csv`` and ``results.png`` (log-log latency and memory against
the pixel count) to ``--out``; see ``mlla_mm/benchmark.py`` for how each figure is measured.
"""

import argparse
import os

from mlla_mm.analysis.benchmark import (
    ARCH_ALIASES,
    DEFAULT_SIZES,
    DTYPES,
    PEERS,
    BenchConfig,
    parse_size,
    plot,
    run_benchmark,
    summarise,
    write_csv,
    write_json,
)
from mlla_mm.utils.console import silence_library_warnings

DEFAULT_PEERS = ('mlla_t_plain', 'swin_t', 'convnext_t', 'resnet50', 'vit_b16')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Benchmark MLLA backbones against peers')
    what = parser.add_mutually_exclusive_group()
    what.add_argument('--arch', nargs='+', help='MLLA archs (tiny/small/base), with --peers')
    what.add_argument('--models', nargs='+', help=f'exact model list, from {sorted(PEERS)}')
    what.add_argument('--config', nargs='+', help='whole-model mode: config files to compare')
    parser.add_argument(
        '--peers', nargs='*', default=list(DEFAULT_PEERS), help='peers added to --arch'
    )
    parser.add_argument(
        '--sizes', nargs='+', default=list(DEFAULT_SIZES), help='WIDTHxHEIGHT or one number'
    )
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='CPU threads (default: OMP_NUM_THREADS if set, else every core, unlike the other '
        'tools: its figures state the thread count)',
    )
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument(
        '--dtype', default='fp32', choices=sorted(DTYPES),
        help='fp16/bf16: autocast; bf16-model: model.to(torch.bfloat16)',
    )  # fmt: skip
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model')
    parser.add_argument('--mode', default='infer', choices=['infer', 'train'])
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--no-flops', action='store_true', help='skip the FLOP count')
    parser.add_argument('--no-memory', action='store_true', help='skip the memory pass')
    parser.add_argument(
        '--keep-freed-memory', action='store_true',
        help='glibc keeps freed memory (no page faults for large tensors; see docs/performance.md)',
    )  # fmt: skip
    parser.add_argument('--baseline', default='mlla_t_plain', help='model the speed-ups refer to')
    parser.add_argument(
        '--max-seconds', type=float, default=120.0,
        help='drop a model from larger sizes once one iteration took longer',
    )  # fmt: skip
    parser.add_argument('--out', default='work_dirs/benchmark', help='output folder')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    silence_library_warnings()
    if args.config:
        models = [f'config:{c}' for c in args.config]
        baseline = models[0] if args.baseline == 'mlla_t_plain' else args.baseline
    elif args.models:
        models, baseline = args.models, args.baseline
    else:
        archs = [ARCH_ALIASES.get(a, a) for a in (args.arch or ['tiny'])]
        models, baseline = [*archs, *[p for p in args.peers if p not in archs]], args.baseline
    cfg = BenchConfig(
        models=models,
        sizes=[parse_size(s) for s in args.sizes],
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        channels_last=args.channels_last,
        compile=args.compile,
        mode=args.mode,
        warmup=args.warmup,
        repeats=args.repeats,
        flops=not args.no_flops,
        memory=not args.no_memory,
        keep_freed_memory=args.keep_freed_memory,
        baseline=baseline,
        max_seconds=args.max_seconds,
    )
    result = run_benchmark(cfg)
    os.makedirs(args.out, exist_ok=True)
    write_json(result, os.path.join(args.out, 'results.json'))
    write_csv(result, os.path.join(args.out, 'results.csv'))
    plot(result, os.path.join(args.out, 'results.png'))
    print(summarise(result))
    print(f'load average: {result["env"]["load_start"]} -> {result["env"]["load_end"]}')
    print(f'results in {args.out}/results.{{json,csv,png}}')
    return result


if __name__ == '__main__':
    main()
