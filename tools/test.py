"""Evaluate a checkpoint on the test split of an mmdet / mmseg / mmpretrain config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl]
        [--show-dir DIR] [--tta] [--cfg-options key=value ...] [--launcher ...] [--threads N]
        [--skip-checkpoint-check] [--verbose] [--debug]

CONFIG is a file or ``mlla_mm::NAME`` (a shipped config). Before testing, the checkpoint's
weights are compared with the model the config builds: a checkpoint that lacks part of the model
(e.g. a detector's on a segmentation config) is refused, with the missing keys named, instead of
being evaluated with random weights in their place. Checkpoints load with
``torch.load(weights_only=True)``; ``import mlla_mm`` allow-lists exactly the types mmengine's
Runner stores in them.
"""

import argparse

from mlla_mm.utils.checkpoint_check import check_checkpoint
from mlla_mm.utils.command_line import user_errors
from mlla_mm.utils.config_check import validate_config
from mlla_mm.utils.console import build_runner, prints_to_log_file, silence_library_warnings
from mlla_mm.utils.distributed import (
    end_distributed_process,
    local_rank_env,
    setup_cpu_distributed,
)
from mlla_mm.utils.errors import ConfigCheckError
from mlla_mm.utils.run_config import add_run_args, configure_test, load_run_config


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a model with an MLLA backbone')
    add_run_args(parser)
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='folder for the evaluation logs')
    parser.add_argument('--out', help='dump the predictions to this pickle file')
    parser.add_argument('--show-dir', help='draw the predictions into this folder')
    parser.add_argument('--tta', action='store_true', help='test-time augmentation')
    parser.add_argument(
        '--skip-checkpoint-check',
        action='store_true',
        help='evaluate even if the checkpoint lacks weights of the model (they stay random)',
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    silence_library_warnings()
    local_rank_env(args.local_rank)
    with user_errors(debug=args.debug):
        if args.out and not args.out.endswith(('.pkl', '.pickle')):
            raise ConfigCheckError(f'--out {args.out}: the output file must be .pkl/.pickle')
        cfg, scope = load_run_config(args)
        configure_test(cfg, args, scope)
        validate_config(cfg, phases=('test',))
        setup_cpu_distributed(cfg, args.launcher)
        runner = build_runner(cfg, verbose=args.verbose)
        if not args.skip_checkpoint_check:
            check_checkpoint(runner.model, args.checkpoint)
        with prints_to_log_file(runner.logger, args.verbose):
            runner.test()
    runner.logger.info(f'Logs of this evaluation are in {runner.log_dir}')


if __name__ == '__main__':
    main()
    end_distributed_process()  # a torchrun rank ends here, once all ranks are done
