"""Shared logic of ``tools/train.py`` and ``tools/test.py`` (which stay thin).

One pair of tools serves mmdet, mmseg and mmpretrain configs: the library is picked from the
config's ``default_scope``. Everything that can be checked before a run starts is checked here
(:func:`validate_config`), so that a wrong dataset path, a malformed annotation file, an unknown
MLLA arch or a missing pretrained checkpoint fails in a second with a message naming the fix,
not after minutes of model building or in the middle of the first epoch.
"""

from __future__ import annotations

import json
import os
import os.path as osp
from collections.abc import Iterator

import torch
from mmengine.config import Config, ConfigDict

from mlla_mm.utils import require

__all__ = [
    'SCOPES',
    'ConfigCheckError',
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
    """A config that cannot run; the message names the problem and the fix."""


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


def _check_dataset(where: str, ds: dict) -> None:
    root = ds.get('data_root') or ''
    seg = isinstance(ds.get('data_prefix'), dict) and 'seg_map_path' in ds['data_prefix']
    toy = 'make_toy_ade20k.py data/toy_ade20k' if seg else 'make_toy_coco.py data/toy_coco'
    how = (
        f'fix the path in the config or pass --cfg-options {where}.data_root=PATH; for the toy '
        f'data run `python tools/misc/{toy}`'
    )
    if root and not _is_remote(root) and not osp.isdir(root):
        raise ConfigCheckError(f'{where}.data_root: folder {root!r} does not exist; {how}')
    ann = ds.get('ann_file') or ''
    if ann and not _is_remote(ann):
        path = _join(root, ann)
        if not osp.isfile(path):
            raise ConfigCheckError(f'{where}.ann_file: file {path!r} does not exist; {how}')
        if 'coco' in str(ds.get('type', '')).lower() or path.endswith('.json'):
            classes = (ds.get('metainfo') or {}).get('classes')
            check_coco_file(path, classes, f'{where}.ann_file')
    prefix = ds.get('data_prefix') or {}
    prefixes = prefix.values() if isinstance(prefix, dict) else [prefix]
    for p in prefixes:
        if isinstance(p, str) and p and not _is_remote(p):
            path = _join(root, p)
            if not osp.isdir(path):
                raise ConfigCheckError(
                    f'{where}.data_prefix: folder {path!r} does not exist; {how}'
                )


def _find_mlla(node, where: str = 'model') -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get('type') in _MLLA_TYPES:
            yield where, node
        for k, v in node.items():
            yield from _find_mlla(v, f'{where}.{k}')
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _find_mlla(v, f'{where}[{i}]')


def _check_backbones(cfg: Config, check_pretrained: bool) -> None:
    from mlla_mm.models.backbones.mlla import MLLA

    for where, bb in _find_mlla(cfg.get('model', {})):
        try:
            MLLA._parse_arch(bb.get('arch', 'tiny'))
        except (KeyError, TypeError, ValueError) as e:
            msg = e.args[0] if e.args else str(e)
            raise ConfigCheckError(f'{where}.arch: {msg}') from e
        init = bb.get('init_cfg')
        if check_pretrained and isinstance(init, dict) and init.get('type') == 'Pretrained':
            ckpt = str(init.get('checkpoint', ''))
            if not _is_remote(ckpt) and not osp.isfile(ckpt):
                raise ConfigCheckError(
                    f'{where}.init_cfg.checkpoint: pretrained checkpoint {ckpt!r} does not exist; '
                    'download the official MLLA ImageNet checkpoint (see README) and pass '
                    f'--cfg-options {where}.init_cfg.checkpoint=PATH, or train from scratch with '
                    f'--cfg-options {where}.init_cfg=None'
                )


def validate_config(cfg: Config, phases: tuple = ('train', 'val', 'test')) -> None:
    """Check a config before a run: datasets, annotation files, MLLA archs, pretrained files.

    Args:
        cfg: A loaded config (after ``--cfg-options``).
        phases: Which dataloaders are used (``'train'``, ``'val'``, ``'test'``).

    Raises:
        ConfigCheckError: The first problem found, with the config key, the value and the fix.
    """
    # Testing loads a whole trained checkpoint: the ImageNet one is only needed for training.
    _check_backbones(cfg, check_pretrained='train' in phases)
    for name in _DATALOADERS:
        phase = name.split('_')[0]
        loader = cfg.get(name)
        if phase not in phases or not loader:
            continue
        if phase == 'val' and cfg.get('val_cfg') is None:
            continue
        for where, ds in _leaf_datasets(loader.get('dataset'), f'{name}.dataset'):
            _check_dataset(where, ds)
    for name in ('val_evaluator', 'test_evaluator'):
        if name.split('_')[0] not in phases:
            continue
        evaluators = cfg.get(name) or []
        for i, ev in enumerate(evaluators if isinstance(evaluators, list) else [evaluators]):
            ann = ev.get('ann_file') if isinstance(ev, dict) else None
            if ann and not _is_remote(ann) and not osp.isfile(ann):
                where = f'{name}[{i}]' if isinstance(evaluators, list) else name
                raise ConfigCheckError(
                    f'{where}.ann_file: file {ann!r} does not exist; set it to the same annotation '
                    f'file as the dataset (--cfg-options {where}.ann_file=PATH)'
                )


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
    if launcher == 'none' or torch.cuda.is_available():
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
            raise ConfigCheckError(f'--resume: checkpoint {args.resume!r} does not exist')
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
        raise ConfigCheckError(f'checkpoint {args.checkpoint!r} does not exist')
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


def build_runner(cfg: Config):
    """Build the Runner the config asks for (``runner_type``) or mmengine's default."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    return RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)


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
