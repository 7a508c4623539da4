"""Evaluate a checkpoint on the test split of an mmdet / mmseg / mmpretrain config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl]
        [--show-dir DIR] [--tta] [--cfg-options key=value ...] [--launcher ...] [--threads N]
        [--skip-checkpoint-check] [--verbose] [--debug]

Before testing, the checkpoint's weights are compared with the model the config builds: a
checkpoint that lacks part of the model (e.g. a detector's on a segmentation config) is refused,
with the missing keys named, instead of being evaluated with random weights in their place.
Checkpoints load with ``torch.load(weights_only=True)``; ``import mlla_mm`` allow-lists exactly
the types mmengine's Runner stores in them.
"""

import argparse

from mmengine.config import Config, DictAction

from mlla_mm.utils.config_check import (
    ConfigCheckError,
    add_common_args,
    build_runner,
    check_checkpoint,
    configure_test,
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
    parser.add_argument(
        '--skip-checkpoint-check',
        action='store_true',
        help='evaluate even if the checkpoint lacks weights of the model (they stay random)',
    )
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    silence_library_warnings()
    local_rank_env(args.local_rank)
    with user_errors('tools/test.py', args.debug):
        if args.out and not args.out.endswith(('.pkl', '.pickle')):
            raise ConfigCheckError(f'--out {args.out}: the output file must be .pkl/.pickle')
        setup_threads(args.threads)
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        scope = setup_scope(cfg)
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
