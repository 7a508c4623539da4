"""Train a detector, segmentor or classifier from an mmdet / mmseg / mmpretrain config.

    python tools/train.py configs/mask_rcnn_mlla_t.py [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--cfg-options key=value ...] [--launcher {none,pytorch,slurm}]

The library comes from the config's ``default_scope``; the config is checked (datasets,
annotation files, MLLA arch, pretrained checkpoint) before anything is built.
"""

import argparse
import os
import sys

from mmengine.config import Config, DictAction

from mlla_mm.tools_utils import (
    ConfigCheckError,
    build_runner,
    configure_train,
    local_rank_env,
    setup_cpu_distributed,
    setup_scope,
    validate_config,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model with an MLLA backbone')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--work-dir', help='folder for logs and checkpoints')
    parser.add_argument('--amp', action='store_true', help='mixed precision (CUDA)')
    parser.add_argument(
        '--auto-scale-lr', action='store_true', help='scale the lr by the real batch size'
    )
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from CKPT, or without a value from the last checkpoint in the work dir',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config keys, e.g. train_cfg.max_epochs=24',
    )
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    local_rank_env(args.local_rank)
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        setup_scope(cfg)
        configure_train(cfg, args)
        validate_config(cfg, phases=('train', 'val'))
        setup_cpu_distributed(cfg, args.launcher)
    except ConfigCheckError as e:
        sys.exit(f'{args.config}: {e}')
    os.makedirs(cfg.work_dir, exist_ok=True)
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
