"""The tools' command-line flags applied to a config (``tools/train.py``, ``tools/test.py``), and
the metrics a test run logged."""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp

import torch
from mmengine.config import Config, ConfigDict, DictAction

from mlla_mm.utils.command_line import add_common_args, setup_threads
from mlla_mm.utils.config_check import leaf_datasets
from mlla_mm.utils.config_loader import load_config
from mlla_mm.utils.errors import ConfigCheckError
from mlla_mm.utils.paths import is_remote, shown
from mlla_mm.utils.scope import setup_scope

__all__ = [
    'add_run_args',
    'configure_test',
    'configure_train',
    'load_run_config',
    'read_logged_metrics',
]


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """The arguments ``tools/train.py`` and ``tools/test.py`` share: the config, ``--cfg-options``,
    the launcher, and the common ``--threads``/``--verbose``/``--debug``."""
    parser.add_argument('config', help='config file, or mlla_mm::NAME for a shipped config')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config keys, e.g. train_cfg.max_epochs=24',
    )
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None)
    add_common_args(parser)


def load_run_config(args: argparse.Namespace) -> tuple[Config, str]:
    """Set the threads, read the config with its ``--cfg-options`` and import its library.

    Args:
        args: Arguments of :func:`add_run_args`.

    Returns:
        tuple[Config, str]: The config and its scope (``'mmdet'``, ``'mmseg'``, ``'mmpretrain'``).
    """
    setup_threads(args.threads)
    cfg = load_config(args.config, args.cfg_options)
    return cfg, setup_scope(cfg)


def _default_work_dir(cfg: Config) -> str:
    return osp.join('./work_dirs', osp.splitext(osp.basename(cfg.filename))[0])


# Arguments of mmengine's AmpOptimWrapper that its plain OptimWrapper does not take.
_AMP_ONLY_KEYS = ('loss_scale', 'dtype', 'use_fsdp')


def _cpu_amp_fix(cfg: Config) -> str:
    """How to train an ``AmpOptimWrapper`` config on the CPU, in float32."""
    amp_keys = [k for k in _AMP_ONLY_KEYS if k in cfg.optim_wrapper]
    name = osp.basename(cfg.filename or '')
    plain = osp.join(osp.dirname(cfg.filename or ''), name.replace('_amp.py', '.py'))
    if name.endswith('_amp.py') and osp.isfile(plain):
        return f'on the CPU train {plain} instead (the same recipe in float32)'
    if amp_keys:
        return (
            "on the CPU set optim_wrapper.type='OptimWrapper' and remove "
            f'{", ".join(amp_keys)} from optim_wrapper in your copy of the config'
        )
    return 'on the CPU train in float32 with --cfg-options optim_wrapper.type=OptimWrapper'


def configure_train(cfg: Config, args) -> list[str]:
    """Apply ``tools/train.py`` flags to the config (as mmdet's ``tools/train.py`` does).

    Args:
        cfg: The loaded config (modified in place).
        args: Parsed arguments with ``work_dir``, ``amp``, ``auto_scale_lr``, ``resume`` and
            ``launcher``.

    Returns:
        list[str]: The problems of the flags with this config and machine, each with a fix that
        applies (e.g. mixed precision without CUDA); empty if none. They are returned, not
        raised, so that the tool reports them together with :func:`config_problems`.
    """
    problems = []
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or _default_work_dir(cfg)
    wrapper = cfg.optim_wrapper
    amp = wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper'
    if not torch.cuda.is_available():
        if args.amp:
            problems.append(
                '--amp: mmengine mixed precision needs a CUDA device; on the CPU train without '
                '--amp'
            )
        elif amp:
            problems.append(
                'optim_wrapper.type=AmpOptimWrapper: mmengine mixed precision needs a CUDA '
                f'device; {_cpu_amp_fix(cfg)}'
            )
    if args.amp and not amp and torch.cuda.is_available():
        wrapper.type = 'AmpOptimWrapper'
        wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            problems.append(
                '--auto-scale-lr: the config has no auto_scale_lr=dict(base_batch_size=...)'
            )
        else:
            cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            problems.append(f'--resume: checkpoint {shown(args.resume)} does not exist')
        cfg.resume = True
        cfg.load_from = args.resume
    return problems


# default_scope -> (evaluator type that dumps predictions to a pickle, its output argument)
_DUMPERS = {
    'mmdet': ('mmdet.DumpDetResults', 'out_file_path'),
    'mmseg': ('mmengine.DumpResults', 'out_file_path'),
    'mmpretrain': ('mmengine.DumpResults', 'out_file_path'),
}


def configure_test(cfg: Config, args, scope: str) -> None:
    """Apply ``tools/test.py`` flags to the config.

    Args:
        cfg: The loaded config (modified in place).
        args: Parsed arguments with ``checkpoint``, ``work_dir``, ``out``, ``show_dir``, ``tta``
            and ``launcher``.
        scope: The config's library (from :func:`setup_scope`).
    """
    if not osp.isfile(args.checkpoint) and not is_remote(args.checkpoint):
        raise ConfigCheckError(f'checkpoint {shown(args.checkpoint)} does not exist')
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or _default_work_dir(cfg)
    cfg.load_from = args.checkpoint
    if args.tta:
        if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
            raise ConfigCheckError(
                '--tta: this config defines no tta_model/tta_pipeline (mmdet has no test-time '
                'augmentation for instance masks); add them to the config or drop --tta'
            )
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        for _, ds in leaf_datasets(cfg.test_dataloader.dataset, 'test_dataloader.dataset'):
            ds['pipeline'] = cfg.tta_pipeline
    if args.show_dir:
        hooks = cfg.setdefault('default_hooks', ConfigDict())
        vis = hooks.get('visualization')
        if scope == 'mmpretrain':
            hooks.visualization = ConfigDict(
                type='VisualizationHook', enable=True, out_dir=args.show_dir
            )
        elif vis is None:
            raise ConfigCheckError('--show-dir: the config has no default_hooks.visualization')
        else:
            vis.draw = True
            if scope == 'mmdet':
                vis.test_out_dir = osp.abspath(args.show_dir)
            else:  # mmseg's hook draws into the visualizer's save_dir
                cfg.visualizer.save_dir = args.show_dir
                vis.interval = 1
    if args.out:
        dump_type, key = _DUMPERS[scope]
        evaluators = cfg.test_evaluator
        evaluators = list(evaluators) if isinstance(evaluators, (list, tuple)) else [evaluators]
        evaluators.append(ConfigDict(type=dump_type, **{key: args.out}))
        cfg.test_evaluator = evaluators


def read_logged_metrics(work_dir: str) -> dict:
    """The metrics of the latest ``tools/test.py`` run in ``work_dir``.

    mmengine's LoggerHook writes them, rank 0 only, to ``work_dir/<timestamp>/<timestamp>.json``
    after the test epoch (training runs write no such file there).

    Raises:
        FileNotFoundError: If no test run logged metrics into ``work_dir``.
    """
    runs = sorted(
        osp.join(work_dir, d, f'{d}.json')
        for d in os.listdir(work_dir)
        if osp.isfile(osp.join(work_dir, d, f'{d}.json'))
    )
    if not runs:
        raise FileNotFoundError(f'no test metrics (<timestamp>/<timestamp>.json) in {work_dir}')
    with open(runs[-1], encoding='utf-8') as f:
        return json.load(f)
