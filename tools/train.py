"""Train a detector, segmentor or classifier from an mmdet / mmseg / mmpretrain config.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--cfg-options key=value ...] [--launcher {none,pytorch,slurm}] [--threads N]
        [--verbose] [--debug]

CONFIG is a file or ``mlla_mm::NAME`` (a shipped config). The library comes from the config's
``default_scope``; the config is checked (datasets, annotation files, MLLA type and arch,
pretrained checkpoint, mixed precision without CUDA) before anything is built, and every problem
found is listed with its fix. The console shows progress, metrics and where the results are; the
whole config, the environment and the parameter groups go to the log file in the work dir
(``--verbose`` prints them too).
"""

import argparse
import os

from mlla_mm.utils.command_line import user_errors
from mlla_mm.utils.config_check import validate_config
from mlla_mm.utils.console import build_runner, prints_to_log_file, silence_library_warnings
from mlla_mm.utils.distributed import (
    end_distributed_process,
    local_rank_env,
    setup_cpu_distributed,
)
from mlla_mm.utils.run_config import add_run_args, configure_train, load_run_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model with an MLLA backbone')
    add_run_args(parser)
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
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    silence_library_warnings()
    local_rank_env(args.local_rank)
    with user_errors(debug=args.debug):
        cfg, _ = load_run_config(args)
        validate_config(cfg, ('train', 'val'), problems=configure_train(cfg, args))
        setup_cpu_distributed(cfg, args.launcher)
        os.makedirs(cfg.work_dir, exist_ok=True)
        runner = build_runner(cfg, verbose=args.verbose)
        with prints_to_log_file(runner.logger, args.verbose):
            runner.train()  # e.g. a corrupt --resume / load_from checkpoint: one line, too
    runner.logger.info(f'Checkpoints and logs are in {os.path.abspath(cfg.work_dir)}')


if __name__ == '__main__':
    main()
    end_distributed_process()  # a torchrun rank ends here, once all ranks are done
