"""Shared logic of ``tools/train.py`` and ``tools/test.py`` (which stay thin).

One pair of tools serves mmdet, mmseg and mmpretrain configs: the library is picked from the
config's ``default_scope``. Everything that can be checked before a run starts is checked here
(:func:`validate_config`), so that a wrong dataset path, a malformed annotation file, an unknown
MLLA arch or a missing pretrained checkpoint fails in a second with a message naming the fix,
not after minutes of model building or in the middle of the first epoch.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import importlib
import io
import json
import logging
import os
import os.path as osp
import re
import sys
import warnings
from collections.abc import Iterator

import torch
from mmengine.config import Config, ConfigDict

from mlla_mm.utils import require

__all__ = [
    'SCOPES',
    'CheckpointMismatchError',
    'ConfigCheckError',
    'ConsoleFilter',
    'add_common_args',
    'check_checkpoint',
    'checkpoint_problems',
    'config_problems',
    'DEFAULT_THREADS',
    'prints_to_log_file',
    'quiet_console',
    'setup_threads',
    'silence_library_warnings',
    'user_errors',
    'setup_scope',
    'validate_config',
    'configure_train',
    'configure_test',
    'setup_cpu_distributed',
    'build_runner',
    'read_logged_metrics',
]

# default_scope -> what it is used for (named in error messages)
SCOPES = {'mmdet': 'detection', 'mmseg': 'segmentation', 'mmpretrain': 'classification'}
_MLLA_TYPES = ('mlla_mm.MLLA', 'MLLA')
_DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
# The fields mmdet's CocoDataset reads, checked on the first entry of each list.
_COCO_FIELDS = {
    'images': ('id', 'file_name', 'height', 'width'),
    'annotations': ('id', 'image_id', 'category_id', 'bbox'),
    'categories': ('id', 'name'),
}
# Annotation files larger than this are only sniffed, not parsed (COCO train2017 is ~450 MB).
_MAX_PARSE_BYTES = 64 * 2**20


class ConfigCheckError(ValueError):
    """A config (or a command line) that cannot run; the message names each problem and its fix.

    Args:
        problems: One message, or a list of them (one per problem found); ``str(error)`` lists
            them all, one per line.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f'{len(self.problems)} problems:\n' + '\n'.join(
                f'  - {p}' for p in self.problems
            )
        super().__init__(text)


class CheckpointMismatchError(ConfigCheckError):
    """A checkpoint whose weights do not cover the model that the config builds."""


# ------------------------------------------------------------------------------------------
# Library selection
# ------------------------------------------------------------------------------------------
def setup_scope(cfg: Config) -> str:
    """Import the library named by ``cfg.default_scope`` and register all its modules.

    Args:
        cfg: A loaded config.

    Returns:
        str: The scope (``'mmdet'``, ``'mmseg'`` or ``'mmpretrain'``).

    Raises:
        ConfigCheckError: If the scope is missing or not one of :data:`SCOPES`.
        ImportError: If the library is not installed (naming the install command).
    """
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ConfigCheckError(
            f'default_scope={scope!r}: the tools serve configs whose default_scope is one of '
            f'{sorted(SCOPES)}; inherit a config of mmdet/mmseg/mmpretrain (e.g. '
            "_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py') or set default_scope"
        )
    require(scope, SCOPES[scope])
    utils = require(f'{scope}.utils', SCOPES[scope])
    utils.register_all_modules(init_default_scope=False)
    import mlla_mm  # noqa: F401  (registers mlla_mm.MLLA and the checkpoint allow-list)

    return scope


# ------------------------------------------------------------------------------------------
# Checks before a run
# ------------------------------------------------------------------------------------------
def _is_remote(path: str) -> bool:
    return '://' in str(path)


def _leaf_datasets(ds: dict, where: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(config path, dataset cfg)`` of every real dataset under dataset wrappers."""
    if not isinstance(ds, dict):
        return
    if isinstance(ds.get('dataset'), dict):  # RepeatDataset, ClassBalancedDataset, ...
        yield from _leaf_datasets(ds['dataset'], f'{where}.dataset')
    elif isinstance(ds.get('datasets'), (list, tuple)):  # ConcatDataset
        for i, sub in enumerate(ds['datasets']):
            yield from _leaf_datasets(sub, f'{where}.datasets[{i}]')
    else:
        yield where, ds


def _join(root: str, path: str) -> str:
    return path if (not root or osp.isabs(path) or _is_remote(path)) else osp.join(root, path)


def check_coco_file(ann_file: str, classes: tuple | None = None, where: str = '') -> None:
    """Check that ``ann_file`` is a COCO instances file (and names ``classes`` if given).

    Files larger than 64 MB (the real COCO train split) are only sniffed: they must start with a
    JSON object.

    Raises:
        ConfigCheckError: naming the file, what is wrong and what is expected.
    """
    fix = (
        'expected a COCO instances JSON object with "images", "annotations" and "categories" '
        'lists (see tools/misc/make_toy_coco.py for a small one)'
    )
    if osp.getsize(ann_file) > _MAX_PARSE_BYTES:
        with open(ann_file, 'rb') as f:
            head = f.read(4096).lstrip()
        if not head.startswith(b'{'):
            raise ConfigCheckError(f'{where}: annotation file {ann_file} is not JSON; {fix}')
        return
    try:
        with open(ann_file, encoding='utf-8') as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigCheckError(
            f'{where}: annotation file {ann_file} is not JSON ({e}); {fix}'
        ) from e
    if not isinstance(coco, dict):
        raise ConfigCheckError(
            f'{where}: annotation file {ann_file} holds a {type(coco).__name__}, not an '
            f'object; {fix}'
        )
    missing = [
        k for k in ('images', 'annotations', 'categories') if not isinstance(coco.get(k), list)
    ]
    if missing:
        raise ConfigCheckError(
            f'{where}: annotation file {ann_file} has no list {missing} (keys: '
            f'{sorted(coco)}); {fix}'
        )
    for key, fields in _COCO_FIELDS.items():
        entry = coco[key][0] if coco[key] else {}
        lacking = [f for f in fields if not isinstance(entry, dict) or f not in entry]
        if coco[key] and lacking:
            raise ConfigCheckError(
                f'{where}: the first entry of "{key}" in {ann_file} lacks {lacking} '
                f'(got {str(entry)[:120]}); {fix}'
            )
    if classes:
        names = {c.get('name') for c in coco['categories'] if isinstance(c, dict)}
        if not names & set(classes):
            raise ConfigCheckError(
                f'{where}: none of the config classes {tuple(classes)} is a category of '
                f'{ann_file} (it has {sorted(names)[:10]}); set metainfo=dict(classes=...) in the '
                'dataset config to the category names of your annotation file'
            )


def _shown(path: str) -> str:
    """``path`` quoted, and for a relative path the absolute path it resolves to from here."""
    if _is_remote(path) or osp.isabs(path):
        return repr(path)
    return f'{path!r} (relative to the current folder: {osp.abspath(path)})'


def _dataset_problems(where: str, ds: dict) -> list[str]:
    """The problems of one dataset config: its data root, annotation file and image folders."""
    root = ds.get('data_root') or ''
    seg = isinstance(ds.get('data_prefix'), dict) and 'seg_map_path' in ds['data_prefix']
    toy = 'make_toy_ade20k.py data/toy_ade20k' if seg else 'make_toy_coco.py data/toy_coco'
    toy_hint = f'for the toy data run `python tools/misc/{toy}`'
    if root and not _is_remote(root) and not osp.isdir(root):
        # Everything else of this dataset lies under the root: one problem, not a cascade.
        return [
            f'{where}.data_root: folder {_shown(root)} does not exist; fix the path in the config '
            f'or pass --cfg-options {where}.data_root=PATH; {toy_hint}'
        ]
    problems = []
    under = f' (relative to {where}.data_root={root!r})' if root else ''
    ann = ds.get('ann_file') or ''
    if ann and not _is_remote(ann):
        path = _join(root, ann)
        if not osp.isfile(path):
            problems.append(
                f'{where}.ann_file: annotation file {_shown(path)} does not exist; pass '
                f'--cfg-options {where}.ann_file=FILE{under} or fix ann_file in the config; '
                f'{toy_hint}'
            )
        elif 'coco' in str(ds.get('type', '')).lower() or path.endswith('.json'):
            classes = (ds.get('metainfo') or {}).get('classes')
            try:
                check_coco_file(path, classes, f'{where}.ann_file')
            except ConfigCheckError as e:
                problems.extend(e.problems)
    prefix = ds.get('data_prefix') or {}
    items = prefix.items() if isinstance(prefix, dict) else [(None, prefix)]
    for key, p in items:
        if isinstance(p, str) and p and not _is_remote(p):
            path = _join(root, p)
            if not osp.isdir(path):
                name = f'{where}.data_prefix' + (f'.{key}' if key else '')
                problems.append(
                    f'{name}: folder {_shown(path)} does not exist; pass --cfg-options '
                    f'{name}=FOLDER{under} or fix data_prefix in the config; {toy_hint}'
                )
    return problems


def _find_mlla(node, where: str = 'model') -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get('type') in _MLLA_TYPES:
            yield where, node
        for k, v in node.items():
            yield from _find_mlla(v, f'{where}.{k}')
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _find_mlla(v, f'{where}[{i}]')


def _resolves_in_scope(scope: str | None, name: str) -> bool:
    """Whether ``type=name`` (no scope prefix) builds in the models registry of ``scope``."""
    if scope not in SCOPES:
        return False
    try:
        registry = importlib.import_module(f'{scope}.registry')
        return registry.MODELS.get(name) is not None
    except Exception:  # the library is missing or broken: setup_scope reports that
        return False


def _backbone_problems(cfg: Config, check_pretrained: bool) -> list[str]:
    from mlla_mm.models.backbones.mlla import MLLA, pretrained_checkpoints

    problems = []
    scope = cfg.get('default_scope')
    for where, bb in _find_mlla(cfg.get('model', {})):
        if bb['type'] == 'MLLA' and not _resolves_in_scope(scope, 'MLLA'):
            # mlla_mm registers MLLA in its own child registry, which mmdet/mmseg/mmpretrain's
            # registries do not search without the scope prefix.
            problems.append(
                f"{where}.type: 'MLLA' without a scope is not in the {scope} model registry, so "
                f"the {scope} model would fail to build; write type='mlla_mm.MLLA' (and keep "
                "custom_imports=dict(imports=['mlla_mm']))"
            )
        try:
            MLLA._parse_arch(bb.get('arch', 'tiny'))
        except (KeyError, TypeError, ValueError) as e:
            msg = e.args[0] if e.args else str(e)
            problems.append(f'{where}.arch: {msg}')
        checkpoints = pretrained_checkpoints(bb.get('init_cfg')) if check_pretrained else []
        for ckpt in checkpoints:
            ckpt = str(ckpt or '')
            if not _is_remote(ckpt) and not osp.isfile(ckpt):
                problems.append(
                    f'{where}.init_cfg.checkpoint: pretrained checkpoint {_shown(ckpt)} does not '
                    'exist; download the official MLLA ImageNet checkpoint (see README) and pass '
                    f'--cfg-options {where}.init_cfg.checkpoint=PATH, or train from scratch with '
                    f'--cfg-options {where}.init_cfg=None'
                )
    return problems


def config_problems(cfg: Config, phases: tuple = ('train', 'val', 'test')) -> list[str]:
    """Every problem :func:`validate_config` finds, one message each (empty if none).

    Args:
        cfg: A loaded config (after ``--cfg-options``).
        phases: Which dataloaders are used (``'train'``, ``'val'``, ``'test'``).

    Returns:
        list[str]: Messages with the config key, the value and the fix; relative paths are shown
        with the absolute path they resolve to from the current folder.
    """
    # Testing loads a whole trained checkpoint: the ImageNet one is only needed for training.
    problems = _backbone_problems(cfg, check_pretrained='train' in phases)
    for name in _DATALOADERS:
        phase = name.split('_')[0]
        loader = cfg.get(name)
        if phase not in phases or not loader:
            continue
        if phase == 'val' and cfg.get('val_cfg') is None:
            continue
        for where, ds in _leaf_datasets(loader.get('dataset'), f'{name}.dataset'):
            problems.extend(_dataset_problems(where, ds))
    for name in ('val_evaluator', 'test_evaluator'):
        if name.split('_')[0] not in phases:
            continue
        if name == 'val_evaluator' and cfg.get('val_cfg') is None:
            continue
        evaluators = cfg.get(name) or []
        for i, ev in enumerate(evaluators if isinstance(evaluators, list) else [evaluators]):
            ann = ev.get('ann_file') if isinstance(ev, dict) else None
            if ann and not _is_remote(ann) and not osp.isfile(ann):
                where = f'{name}[{i}]' if isinstance(evaluators, list) else name
                problems.append(
                    f'{where}.ann_file: annotation file {_shown(ann)} does not exist; set it to '
                    f'the same annotation file as the dataset (--cfg-options {where}.ann_file=FILE)'
                )
    return problems


def validate_config(cfg: Config, phases: tuple = ('train', 'val', 'test')) -> None:
    """Check a config before a run: datasets, annotation files, MLLA types/archs, pretrained files.

    Args:
        cfg: A loaded config (after ``--cfg-options``).
        phases: Which dataloaders are used (``'train'``, ``'val'``, ``'test'``).

    Raises:
        ConfigCheckError: Listing every problem found (:func:`config_problems`), each with the
            config key, the value and the fix.
    """
    problems = config_problems(cfg, phases)
    if problems:
        raise ConfigCheckError(problems)


# ------------------------------------------------------------------------------------------
# Command-line flags -> config
# ------------------------------------------------------------------------------------------
def _default_work_dir(cfg: Config) -> str:
    return osp.join('./work_dirs', osp.splitext(osp.basename(cfg.filename))[0])


def setup_cpu_distributed(cfg: Config, launcher: str) -> None:
    """Make ``--launcher pytorch`` work on machines without CUDA (gloo backend, CPU DDP).

    mmengine's launcher calls ``torch.cuda.set_device`` and wraps the model in DDP with
    ``device_ids=[LOCAL_RANK]``, both of which need a GPU. Without one we start PyTorch's
    ``env://`` process group (the variables ``torchrun`` sets) with gloo ourselves, and ask for DDP
    on the CPU (``device_ids=None``); mmengine's Runner then finds the process group initialised
    and runs as usual. With CUDA this does nothing.
    """
    if launcher == 'none':
        return
    with contextlib.suppress(ValueError, OSError, AttributeError):  # stderr without a file
        faulthandler.enable()  # a crashing rank prints its Python stack (torchrun: a signal)
    if torch.cuda.is_available():
        return
    import torch.distributed as dist

    dist_cfg = cfg.setdefault('env_cfg', ConfigDict()).setdefault('dist_cfg', ConfigDict())
    if dist_cfg.get('backend', 'gloo') != 'gloo':
        dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(type='MMDistributedDataParallel')
    wrapper.setdefault('device_ids', None)
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper
    if launcher != 'pytorch':
        raise ConfigCheckError(
            f'--launcher {launcher} needs CUDA here; on CPU-only machines use torchrun with '
            '--launcher pytorch (tools/dist_train.sh)'
        )
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo', init_method='env://')


def end_distributed_process() -> None:
    """End a distributed tool run's process once every rank is done (a no-op outside one).

    Called last in the tools' ``__main__`` block. The ranks meet at a barrier (none is still
    communicating), the exit handlers run (log files, data-loader workers), the console is
    flushed, and the process ends with ``os._exit(0)``, skipping the process group's teardown and
    the interpreter's finalisation: there gloo's threads, which outlive the Runner,
    intermittently aborted a finished rank (``terminate called without an active exception``,
    SIGABRT; seen in CI on rank 0 after ``tools/test.py`` had written every result, with and
    without an explicit ``destroy_process_group``), and torchrun reported the run as failed. The
    operating system closes the sockets.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    import atexit

    dist.barrier()
    atexit._run_exitfuncs()  # logging's shutdown (log files) is one of them
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def configure_train(cfg: Config, args) -> None:
    """Apply ``tools/train.py`` flags to the config (as mmdet's ``tools/train.py`` does).

    Args:
        cfg: The loaded config (modified in place).
        args: Parsed arguments with ``work_dir``, ``amp``, ``auto_scale_lr``, ``resume`` and
            ``launcher``.
    """
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or _default_work_dir(cfg)
    wrapper = cfg.optim_wrapper
    amp = wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper'
    if (args.amp or amp) and not torch.cuda.is_available():
        raise ConfigCheckError(
            f'{"--amp" if args.amp else "optim_wrapper.type=AmpOptimWrapper"}: mmengine mixed '
            'precision needs a CUDA device; on the CPU train without --amp (or the config '
            'without _amp)'
        )
    if args.amp and not amp:
        wrapper.type = 'AmpOptimWrapper'
        wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise ConfigCheckError(
                '--auto-scale-lr: the config has no auto_scale_lr=dict(base_batch_size=...)'
            )
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise ConfigCheckError(f'--resume: checkpoint {_shown(args.resume)} does not exist')
        cfg.resume = True
        cfg.load_from = args.resume


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
    if not osp.isfile(args.checkpoint) and not _is_remote(args.checkpoint):
        raise ConfigCheckError(f'checkpoint {_shown(args.checkpoint)} does not exist')
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
        for _, ds in _leaf_datasets(cfg.test_dataloader.dataset, 'test_dataloader.dataset'):
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


# ------------------------------------------------------------------------------------------
# Runner, console output, threads and errors of the tools
# ------------------------------------------------------------------------------------------
# Log records kept out of the console (they still go to the log file in the work dir): the
# environment report, the whole config, the hook order, and one line per parameter from the
# optimiser's paramwise settings (hundreds for MLLA-T).
_FILE_ONLY_PREFIXES = (
    '\n' + '-' * 60 + '\nSystem environment:',
    'Config:\n',
    'paramwise_options -- ',
    'Hooks will be executed in the following order',
    'Distributed training is not used, all SyncBatchNorm',
)
# Warnings of the installed libraries about their own internals, not about the run.
_FILE_ONLY_WARNINGS = (
    '"FileClient" will be deprecated',
    '"HardDiskBackend" is the alias of "LocalBackend"',
    'The prefix is not set in metric class',
)


class ConsoleFilter(logging.Filter):
    """Keep the details of a run (environment, config, hook order, paramwise lines) and the
    libraries' deprecation notes off the console.

    Other warnings and errors always pass; everything still reaches mmengine's log file.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if record.levelno >= logging.WARNING:
            return record.levelno >= logging.ERROR or not msg.startswith(_FILE_ONLY_WARNINGS)
        return not msg.startswith(_FILE_ONLY_PREFIXES)


class _LogFileStream(io.TextIOBase):
    """A text stream that writes into the file of a ``logging.FileHandler``."""

    def __init__(self, handler: logging.FileHandler) -> None:
        super().__init__()
        self.handler = handler

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.handler.acquire()
        try:
            if self.handler.stream is None:  # closed by the logger: nowhere to write
                return len(text)
            self.handler.stream.write(text)
        finally:
            self.handler.release()
        return len(text)

    def flush(self) -> None:
        self.handler.flush()


@contextlib.contextmanager
def prints_to_log_file(logger: logging.Logger, verbose: bool = False) -> Iterator[None]:
    """Send what libraries ``print`` during a run into the log file instead of the console.

    pycocotools prints its progress and a 12-line table per metric ("loading annotations into
    memory...", "Average Precision (AP) @[...]"); the metrics themselves reach the console
    through mmengine's log line. Logging is not affected: mmengine's console handler holds the
    real stdout.

    Args:
        logger: The runner's logger (its first file handler receives the output).
        verbose: Leave stdout alone.
    """
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    if verbose or not files:
        yield
        return
    with contextlib.redirect_stdout(_LogFileStream(files[0])):
        yield


def quiet_console(logger: logging.Logger) -> None:
    """Add :class:`ConsoleFilter` to the console handlers of ``logger`` (not its file handlers)."""
    for handler in logger.handlers:
        is_console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if is_console and not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter())


@functools.cache
def _quiet_runner_class() -> type:
    from mmengine.runner import Runner

    class QuietRunner(Runner):
        """mmengine's Runner whose console shows progress, metrics and where the results are."""

        def build_logger(self, log_level='INFO', log_file=None, **kwargs):
            logger = super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
            quiet_console(logger)
            path = log_file or osp.join(self._log_dir, f'{self.timestamp}.log')
            logger.info(f'Work dir: {self._work_dir}; full log (config, environment): {path}')
            return logger

    return QuietRunner


def build_runner(cfg: Config, verbose: bool = False):
    """Build the Runner the config asks for (``runner_type``) or mmengine's default.

    Args:
        cfg: The complete config.
        verbose: Also print the environment, the whole config and the paramwise settings to the
            console (they always go to the log file in the work dir).
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
        if not verbose:
            quiet_console(runner.logger)
        return runner
    return (Runner if verbose else _quiet_runner_class()).from_cfg(cfg)


def silence_library_warnings() -> None:
    """Hide warnings of the installed stack that say nothing about the user's run.

    setuptools >= 70 warns that ``pkg_resources`` is deprecated each time mmengine looks up an
    installed package with it (``mmdet::`` configs, scope checks): once per tool, or more.
    Warnings about the user's run itself are left alone.
    """
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
    # mmengine's visualizer, built without a save_dir by the image demo, and drawing a box or
    # mask outline that touches the image border (which it draws all the same)
    # mmseg 1.2's notes on its own API and defaults, printed for every model it builds
    for note in (
        'Failed to add <class',
        'Warning: The bbox is out of bounds',
        'Warning: The polygon is out of bounds',
        '``build_loss`` would be deprecated',
        'Default ``avg_non_ignore`` is False',
        'The draw is False',
        '`reduce_zero_label` will be deprecated',
    ):
        warnings.filterwarnings('ignore', message=note, category=UserWarning)


# Intra-op threads of the tools unless --threads or OMP_NUM_THREADS says otherwise. Chosen by
# measurement (docs/performance.md, "Threads of the tools"): on 2 cores busy with other jobs a
# toy training iteration took 2-4.5 times longer with 2 threads than with 1 (OpenMP threads
# wait for each other at every operator, and a thread without a free core stalls them all),
# while on an idle machine 2 threads gain at most their number (1.85x for MLLA-T inference at
# 1280x800). One thread is never far from the best and never a disaster.
DEFAULT_THREADS = 1


def setup_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, else OMP_NUM_THREADS's (torch reads it at
    start), else :data:`DEFAULT_THREADS`.

    Returns:
        int: The number of threads in use.
    """
    if threads is not None:
        if threads < 1:
            raise ConfigCheckError(f'--threads {threads}: give a number of threads >= 1')
        torch.set_num_threads(threads)
    elif not os.environ.get('OMP_NUM_THREADS'):
        torch.set_num_threads(DEFAULT_THREADS)
    return torch.get_num_threads()


def add_common_args(parser) -> None:
    """The flags every tool shares: ``--threads``, ``--verbose`` and ``--debug``."""
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help=f'CPU threads (default: OMP_NUM_THREADS if set, else {DEFAULT_THREADS})',
    )
    parser.add_argument(
        '--verbose',
        action='store_true',
        help='also print the environment, the whole config and the parameter groups (they are '
        'always in the log file of the work dir)',
    )
    parser.add_argument(
        '--debug',
        action='store_true',
        help='show the traceback of an error (also with MLLA_MM_DEBUG=1)',
    )


def _user_error_types() -> tuple:
    """Errors whose message is meant for the user: printed as they are, without a traceback."""
    from mlla_mm.utils import safe_load
    from mlla_mm.apis.inference import InputError

    found = [ConfigCheckError, InputError, FileNotFoundError, ImportError]
    corrupt = getattr(safe_load, 'CheckpointFileError', None)  # corrupt or truncated checkpoints
    if isinstance(corrupt, type) and issubclass(corrupt, BaseException):
        found.append(corrupt)
    return tuple(found)


@contextlib.contextmanager
def user_errors(tool: str, debug: bool = False) -> Iterator[None]:
    """Turn the package's user-facing errors into a message and exit status 2, no traceback.

    Any other exception (a bug) keeps its traceback. With ``debug`` (or ``MLLA_MM_DEBUG=1``)
    every error keeps its traceback.

    Args:
        tool: What to name in the message (e.g. ``'tools/test.py'``).
        debug: Re-raise instead.
    """
    try:
        yield
    except _user_error_types() as e:
        if debug or os.environ.get('MLLA_MM_DEBUG', '') not in ('', '0'):
            raise
        if isinstance(e, ImportError) and not str(e).startswith('mlla_mm needs'):
            raise  # not a missing optional library (mlla_mm.utils.require): a broken install
        print(f'{tool}: error: {str(e) or type(e).__name__}', file=sys.stderr)
        raise SystemExit(2) from None


# ------------------------------------------------------------------------------------------
# A checkpoint against the model it is loaded into
# ------------------------------------------------------------------------------------------
def _unwrap(model):
    from mmengine.model import BaseTTAModel, is_model_wrapper

    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


def _group(keys: list[str], limit: int = 6) -> str:
    """``'decode_head.* (12 keys, e.g. decode_head.conv_seg.weight), neck.* (...)'``."""
    groups: dict[str, list[str]] = {}
    for k in sorted(keys):
        groups.setdefault(k.split('.')[0], []).append(k)
    parts = [
        f'{top}.* ({len(ks)} key{"s" if len(ks) > 1 else ""}, e.g. {ks[0]})'
        if len(ks) > 1 or ks[0] != top
        else top
        for top, ks in groups.items()
    ]
    more = f' and {len(parts) - limit} more groups' if len(parts) > limit else ''
    return ', '.join(parts[:limit]) + more


def checkpoint_problems(model, state_dict: dict) -> list[str]:
    """What keeps ``state_dict`` from filling ``model``: missing weights and shape mismatches.

    Keys are compared as mmengine loads them: wrappers (DDP, test-time augmentation) are looked
    through, a leading ``module.`` is stripped, and BatchNorm's ``num_batches_tracked`` counters
    are not required. Keys the model does not have are only named (as a hint to the
    checkpoint's origin); they do not count as a problem by themselves.

    Args:
        model: The built model (``runner.model``).
        state_dict: The checkpoint's ``state_dict``.

    Returns:
        list[str]: Empty if every weight of the model is in the checkpoint with its shape.
    """
    own = {
        k: v.shape
        for k, v in _unwrap(model).state_dict().items()
        if not k.endswith('num_batches_tracked')
    }
    theirs = {re.sub(r'^module\.', '', k): getattr(v, 'shape', None) for k, v in state_dict.items()}
    missing = [k for k in own if k not in theirs]
    shapes = [
        f'{k}: {tuple(theirs[k])} in the checkpoint, {tuple(own[k])} in the model'
        for k in own
        if k in theirs and theirs[k] is not None and tuple(theirs[k]) != tuple(own[k])
    ]
    problems = []
    if missing:
        extra = [k for k in theirs if k not in own and not k.endswith('num_batches_tracked')]
        problems.append(
            f"it lacks {len(missing)} of the model's {len(own)} weights: {_group(missing)}"
            + (f'; it holds weights this model does not have: {_group(extra)}' if extra else '')
        )
    if shapes:
        more = f' and {len(shapes) - 5} more' if len(shapes) > 5 else ''
        problems.append(f'{len(shapes)} weights differ in shape: ' + '; '.join(shapes[:5]) + more)
    return problems


def check_checkpoint(model, checkpoint: str) -> None:
    """Refuse a checkpoint that would leave part of ``model`` untrained (e.g. another task's).

    mmengine loads checkpoints with ``strict=False`` and only logs missing keys, so a detector
    checkpoint on a segmentation config would be evaluated with a random decode head.

    Args:
        model: The built model.
        checkpoint: Path or URL of the checkpoint.

    Raises:
        CheckpointMismatchError: Naming the missing keys (grouped by module), the shape
            mismatches, and what to do.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    state_dict = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict):
        raise CheckpointMismatchError(
            f'checkpoint {_shown(checkpoint)} holds a {type(ckpt).__name__}, not a state dict'
        )
    problems = checkpoint_problems(model, state_dict)
    if problems:
        raise CheckpointMismatchError(
            f'checkpoint {_shown(checkpoint)} does not fit the model of this config: '
            + '; '.join(problems)
            + '. Test it with the config it was trained with (a detector, segmentor and '
            'classifier checkpoint each fit only their own kind of model), or pass '
            '--skip-checkpoint-check to evaluate anyway'
        )


def local_rank_env(local_rank: int | None) -> None:
    """Export ``LOCAL_RANK`` for launchers that pass ``--local_rank`` (torch.distributed.launch)."""
    if local_rank is not None and 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(local_rank)


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
