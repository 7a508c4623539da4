"""Evaluate a checkpoint on the test split of an mmdet / mmseg / mmpretrain config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl]
        [--show-dir DIR] [--tta] [--cfg-options key=value ...] [--launcher ...]

Checkpoints load with ``torch.load(weights_only=True)``; ``import mlla_mm`` allow-lists exactly
the types mmengine's Runner stores in them.
"""

import argparse
import sys

from mmengine.config import Config, DictAction

from mlla_mm.tools_utils import (
    ConfigCheckError,
    build_runner,
    configure_test,
    local_rank_env,
    setup_cpu_distributed,
    setup_scope,
    validate_config,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a model with an MLLA backbone')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='folder for the evaluation logs')
    parser.add_argument('--out', help='dump the predictions to this pickle file')
    parser.add_argument('--show-dir', help='draw the predictions into this folder')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    local_rank_env(args.local_rank)
    if args.out and not args.out.endswith(('.pkl', '.pickle')):
        sys.exit(f'--out {args.out}: the output file must be a .pkl/.pickle file')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        scope = setup_scope(cfg)
        configure_test(cfg, args, scope)
        validate_config(cfg, phases=('test',))
        setup_cpu_distributed(cfg, args.launcher)
    except ConfigCheckError as e:
        sys.exit(f'{args.config}: {e}')
    build_runner(cfg).test()


if __name__ == '__main__':
    main()
