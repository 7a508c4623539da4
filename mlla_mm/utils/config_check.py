"""Checks of a config before a run (``tools/train.py``, ``tools/test.py``), which stay thin.

Everything that can be checked before a run starts is checked here (:func:`validate_config`), so
that a wrong dataset path, a malformed annotation file, an unknown MLLA arch or a missing
pretrained checkpoint fails in a second with a message naming the fix, not after minutes of
model building or in the middle of the first epoch.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os.path as osp
from collections.abc import Iterator

from mmengine.config import Config

from mlla_mm.utils.errors import ConfigCheckError
from mlla_mm.utils.paths import is_remote, join_root, shown
from mlla_mm.utils.scope import SCOPES

__all__ = ['check_coco_file', 'config_problems', 'leaf_datasets', 'validate_config']


_MLLA_TYPES = ('mlla_mm.MLLA', 'MLLA')

_DATALOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')

# The fields mmdet's CocoDataset reads, checked on the first entry of each list.
_COCO_FIELDS = {
    'images': ('id', 'file_name', 'height', 'width'),
    'annotations': ('id', 'image_id', 'category_id', 'bbox'),
    'categories': ('id', 'name'),
}

# The loop configs of each phase, and what mmengine's Runner passes to the loop itself.
_LOOPS = {'train': ('train_cfg',), 'val': ('val_cfg',), 'test': ('test_cfg',)}
_RUNNER_ARGS = ('self', 'runner', 'dataloader', 'evaluator')

# Annotation files larger than this are only sniffed, not parsed (COCO train2017 is ~450 MB).
_MAX_PARSE_BYTES = 64 * 2**20


def leaf_datasets(ds: dict, where: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(config path, dataset cfg)`` of every real dataset under dataset wrappers."""
    if not isinstance(ds, dict):
        return
    if isinstance(ds.get('dataset'), dict):  # RepeatDataset, ClassBalancedDataset, ...
        yield from leaf_datasets(ds['dataset'], f'{where}.dataset')
    elif isinstance(ds.get('datasets'), (list, tuple)):  # ConcatDataset
        for i, sub in enumerate(ds['datasets']):
            yield from leaf_datasets(sub, f'{where}.datasets[{i}]')
    else:
        yield where, ds


def check_coco_file(ann_file: str, classes: tuple | None = None, where: str = '') -> None:
    """Check that ``ann_file`` is a COCO instances file (and names ``classes`` if given).

    Files larger than 64 MB (the real COCO train split) are only sniffed: they must start with a
    JSON object.

    Raises:
        ConfigCheckError: naming the file, what is wrong and what is expected.
    """
    fix = (
        'expected a COCO instances JSON object with "images", "annotations" and "categories" '
        'lists (`mlla-make-toy coco DIR` writes a small one)'
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


def _data_hint(ds: dict) -> str:
    """Where the data of a dataset config comes from: the toy set's command, or the real set."""
    kind = str(ds.get('type', ''))
    seg = isinstance(ds.get('data_prefix'), dict) and 'seg_map_path' in ds['data_prefix']
    if 'ImageNet' in kind:
        return (
            'ImageNet-1k is not downloadable by script: get it from image-net.org (train/ and '
            "val/ folders, mmpretrain's layout: docs/classification.md) and point data_root at it"
        )
    root = ds.get('data_root') or ''
    for name, toy in (('ade20k', seg or 'ADE20K' in kind), ('coco', 'coco' in kind.lower())):
        if toy:
            folder = root if 'toy' in root else f'data/toy_{name}'
            return f'for the toy set run `mlla-make-toy {name} {folder}`'
    return f'put the {kind or "dataset"} data there'


def _dataset_problems(where: str, ds: dict) -> list[str]:
    """The problems of one dataset config: its data root, annotation file and image folders."""
    root = ds.get('data_root') or ''
    toy_hint = _data_hint(ds)
    if root and not is_remote(root) and not osp.isdir(root):
        # Everything else of this dataset lies under the root: one problem, not a cascade.
        return [
            f'{where}.data_root: folder {shown(root)} does not exist; fix the path in the config '
            f'or pass --cfg-options {where}.data_root=PATH; {toy_hint}'
        ]
    problems = []
    under = f' (relative to {where}.data_root={root!r})' if root else ''
    ann = ds.get('ann_file') or ''
    if ann and not is_remote(ann):
        path = join_root(root, ann)
        if not osp.isfile(path):
            problems.append(
                f'{where}.ann_file: annotation file {shown(path)} does not exist; pass '
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
        if isinstance(p, str) and p and not is_remote(p):
            path = join_root(root, p)
            if not osp.isdir(path):
                name = f'{where}.data_prefix' + (f'.{key}' if key else '')
                problems.append(
                    f'{name}: folder {shown(path)} does not exist; pass --cfg-options '
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
            if not is_remote(ckpt) and not osp.isfile(ckpt):
                problems.append(
                    f'{where}.init_cfg.checkpoint: pretrained checkpoint {shown(ckpt)} does not '
                    'exist; download the official MLLA ImageNet checkpoint (see README) and pass '
                    f'--cfg-options {where}.init_cfg.checkpoint=PATH, or train from scratch with '
                    f'--cfg-options {where}.init_cfg=None'
                )
    return problems


def _loop_class(cfg: Config, name: str, loop: dict):
    """The class mmengine's Runner builds for ``cfg[name]`` (None when it cannot be told)."""
    from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop, TestLoop, ValLoop

    kind = loop.get('type')
    if kind is None:
        if name == 'train_cfg':
            return EpochBasedTrainLoop if loop.get('by_epoch', True) else IterBasedTrainLoop
        return ValLoop if name == 'val_cfg' else TestLoop
    if not isinstance(kind, str):
        return kind if inspect.isclass(kind) else None
    scope = cfg.get('default_scope')
    try:
        registry = importlib.import_module(f'{scope}.registry' if scope in SCOPES else 'mmengine')
        return registry.LOOPS.get(kind)
    except Exception:  # the library is missing, or an unknown type: mmengine reports that
        return None


def _loop_problems(cfg: Config, phases: tuple) -> list[str]:
    """Keys of ``train_cfg`` / ``val_cfg`` / ``test_cfg`` that their loop does not take.

    mmengine passes them to the loop's constructor only when the run starts, after the model is
    built, and a typo (``train_cfg.max_iter=2``) ends there in a TypeError traceback.
    """
    problems = []
    for phase in phases:
        for name in _LOOPS[phase]:
            loop = cfg.get(name)
            if not isinstance(loop, dict):
                continue
            cls = _loop_class(cfg, name, loop)
            try:
                params = inspect.signature(cls.__init__).parameters if cls else {}
            except (TypeError, ValueError):
                continue
            if not params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
                continue
            valid = [p for p in params if p not in _RUNNER_ARGS]
            taken = {'type', 'by_epoch'} if name == 'train_cfg' else {'type'}
            for key in loop:
                if key in taken or key in valid or key.startswith('_'):  # _scope_: mmengine's
                    continue
                close = difflib.get_close_matches(key, valid, n=1, cutoff=0.7)
                fix = f'did you mean {name}.{close[0]}? ' if close else ''
                problems.append(
                    f'{name}.{key}: {cls.__name__} takes no argument {key!r}; {fix}'
                    f'it takes {", ".join(valid)} (--cfg-options {name}.KEY=VALUE)'
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
    problems.extend(_loop_problems(cfg, phases))
    for name in _DATALOADERS:
        phase = name.split('_')[0]
        loader = cfg.get(name)
        if phase not in phases or not loader:
            continue
        if phase == 'val' and cfg.get('val_cfg') is None:
            continue
        for where, ds in leaf_datasets(loader.get('dataset'), f'{name}.dataset'):
            problems.extend(_dataset_problems(where, ds))
    for name in ('val_evaluator', 'test_evaluator'):
        if name.split('_')[0] not in phases:
            continue
        if name == 'val_evaluator' and cfg.get('val_cfg') is None:
            continue
        evaluators = cfg.get(name) or []
        for i, ev in enumerate(evaluators if isinstance(evaluators, list) else [evaluators]):
            ann = ev.get('ann_file') if isinstance(ev, dict) else None
            if ann and not is_remote(ann) and not osp.isfile(ann):
                where = f'{name}[{i}]' if isinstance(evaluators, list) else name
                problems.append(
                    f'{where}.ann_file: annotation file {shown(ann)} does not exist; set it to '
                    f'the same annotation file as the dataset (--cfg-options {where}.ann_file=FILE)'
                )
    return problems


def validate_config(
    cfg: Config, phases: tuple = ('train', 'val', 'test'), problems: list[str] | tuple = ()
) -> None:
    """Check a config before a run: datasets, annotation files, MLLA types/archs, pretrained files.

    Args:
        cfg: A loaded config (after ``--cfg-options``).
        phases: Which dataloaders are used (``'train'``, ``'val'``, ``'test'``).
        problems: Problems found before (e.g. of the command-line flags), reported first.

    Raises:
        ConfigCheckError: Listing every problem found (:func:`config_problems`), each with the
            config key, the value and the fix.
    """
    problems = [*problems, *config_problems(cfg, phases)]
    if problems:
        raise ConfigCheckError(problems)
