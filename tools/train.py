"""Train a detector, segmentor or classifier from an mmdet / mmseg / mmpretrain config.

    python tools/train.py configs/mask_rcnn_mlla_t.py [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--cfg-options key=value ...] [--launcher {none,pytorch,slurm}] [--threads N]
        [--verbose] [--debug]

The library comes from the config's ``default_scope``; the config is checked (datasets,
annotation files, MLLA type and arch, pretrained checkpoint) before anything is built, and every
problem found is listed with its fix. The console shows progress, metrics and where the results
are; the whole config, the environment and the parameter groups go to the log file in the work
dir (``--verbose`` prints them too).
"""

import argparse
import os

from mmengine.config import Config, DictAction

from mlla_mm.utils.config_check import (
    add_common_args,
    build_runner,
    configure_train,
    end_distributed_process,
    local_rank_env,
    prints_to_log_file,
    setup_cpu_distributed,
    setup_scope,
    setup_threads,
    silence_library_warnings,
    user_errors,
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
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    silence_library_warnings()
    local_rank_env(args.local_rank)
    with user_errors('tools/train.py', args.debug):
        setup_threads(args.threads)
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        setup_scope(cfg)
        configure_train(cfg, args)
        validate_config(cfg, phases=('train', 'val'))
        setup_cpu_distributed(cfg, args.launcher)
        os.makedirs(cfg.work_dir, exist_ok=True)
        runner = build_runner(cfg, verbose=args.verbose)
        with prints_to_log_file(runner.logger, args.verbose):
            runner.train()  # e.g. a corrupt --resume / load_from checkpoint: one line, too
    runner.logger.info(f'Checkpoints and logs are in {os.path.abspath(cfg.work_dir)}')


if __name__ == '__main__':
    main()
    end_distributed_process()  # a torchrun rank ends here, once all ranks are done
