"""Convert official MLLA checkpoints (LeapLabTHU/MLLA) to mmpretrain / mmdet 3 / mmseg 1 layouts.

* ``cls``: the official ImageNet checkpoint (its ``model`` entry, or ``model_ema``/
  ``state_dict_ema`` on request) becomes an mmpretrain ``ImageClassifier`` state dict: backbone
  keys under ``backbone.``, the final ``norm`` becoming ``backbone.norm3`` and ``head`` becoming
  ``head.fc``.
* ``det``: an official mmdet 2 Mask R-CNN checkpoint becomes mmdet 3 keys.
* ``seg``: an official mmseg 0 UperNet checkpoint becomes mmseg 1 keys.

In every case the recomputable ``attn.rope.rotations`` buffers are dropped, and any key that is
not understood stops the conversion with an error that lists it: no weight is dropped silently.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch

from mlla_mm.models.backbones.mlla import MLLA, checkpoint_arch, official_arch_name
from mlla_mm.utils.safe_load import CheckpointFileError, load_file

__all__ = ['convert_checkpoint', 'convert_state_dict', 'infer_arch', 'load_official']

ROPE = re.compile(r'(^|\.)attn\.rope\.rotations$')
# Heads of the official downstream models: the mmdet 2 -> 3 and mmseg 0 -> 1 key names of Mask
# R-CNN (FPN, RPN, shared 2-fc bbox head, FCN mask head) and UperNet (+ FCN auxiliary head) are
# unchanged, so these pass through; anything else is unknown.
TASK_PREFIXES = {
    'det': ('backbone.', 'neck.', 'rpn_head.', 'roi_head.'),
    'seg': ('backbone.', 'decode_head.', 'auxiliary_head.'),
}
CKPT_KEYS = ('state_dict', 'model', 'model_ema', 'state_dict_ema')


def load_official(path: str | Path, key: str | None = None) -> dict:
    """Load a checkpoint with ``weights_only=True`` and return its state dict.

    Args:
        path: The ``.pth`` file.
        key: The entry that holds the weights (``model``, ``model_ema``, ``state_dict_ema``,
            ``state_dict``); by default the first of those present, else the file itself.
    """
    path = Path(path)
    try:
        ckpt = load_file(path)
    except (FileNotFoundError, CheckpointFileError):
        raise
    except pickle.UnpicklingError as e:  # readable, but refused by weights_only
        raise ValueError(
            f'{str(path)!r} pickles objects that torch.load(weights_only=True) refuses, so it is '
            f'not loaded (it could run code): {e}'
        ) from e
    if not isinstance(ckpt, dict):
        raise ValueError(f'{str(path)!r} holds a {type(ckpt).__name__}, not a state dict')
    if key is not None:
        if key not in ckpt:
            raise KeyError(f'{str(path)!r} has no entry {key!r}; it has {sorted(ckpt)}')
        return ckpt[key]
    for k in CKPT_KEYS:
        if isinstance(ckpt.get(k), dict):
            return ckpt[k]
    return ckpt


def infer_arch(backbone_sd: dict) -> str | dict:
    """The architecture of MLLA backbone weights, read from the tensors.

    Returns:
        str | dict: The official variant's name (``'tiny'``/``'small'``/``'base'``) when the
        widths and depths are one of them, else a dict with ``embed_dims``, ``depths`` (and
        ``mlp_ratio`` if it is not 4). ``num_heads`` changes no tensor shape, so it is not part
        of it: conversion does not need it, the model config does.
    """
    found = checkpoint_arch(backbone_sd)
    if found is None:
        raise ValueError('Not an MLLA state dict: patch_embed.conv3.1.conv.weight is missing')
    name = official_arch_name(found)
    if name is not None:
        return name
    arch = dict(embed_dims=found['embed_dims'], depths=found['depths'])
    if found['mlp_ratio'] != 4.0:
        arch['mlp_ratio'] = found['mlp_ratio']
    return arch


def _describe(arch: str | dict) -> str:
    if isinstance(arch, str):
        return f'MLLA-{arch}'
    return 'MLLA(' + ', '.join(f'{k}={v}' for k, v in arch.items() if k != 'num_heads') + ')'


def _check_backbone(sd: dict, arch: str | dict, where: str) -> None:
    """Every backbone key of ``sd`` is one of ``arch`` with its shape, and none is missing (but
    the output norms ``norm0..norm2``, which an ImageNet checkpoint does not have)."""
    found = infer_arch(sd)
    if isinstance(arch, str):
        arch = arch.lower()
        if arch not in MLLA.arch_zoo:
            raise ValueError(
                f'{where}: unknown arch {arch!r}; give tiny, small, base or a JSON dict such as '
                '\'{"embed_dims": 64, "depths": [2, 4, 8, 4], "num_heads": [2, 4, 8, 16]}\''
            )
        spec = dict(MLLA.arch_zoo[arch])
    else:
        spec = dict(arch)
    mlp_ratio = spec.pop('mlp_ratio', 4.0)
    spec.setdefault('num_heads', (1,) * MLLA.num_stages)  # shapes do not depend on it
    try:
        model = MLLA(arch=spec, mlp_ratio=mlp_ratio, drop_path_rate=0.0)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f'{where}: arch {arch!r} is not a valid MLLA arch: {e}') from e
    model_sd = model.state_dict()
    wanted = (spec['embed_dims'], tuple(spec['depths']))
    if isinstance(found, str):
        have = (MLLA.arch_zoo[found]['embed_dims'], tuple(MLLA.arch_zoo[found]['depths']))
    else:
        have = (found['embed_dims'], tuple(found['depths']))
    if wanted != have or (not isinstance(found, str) and found.get('mlp_ratio', 4.0) != mlp_ratio):
        raise ValueError(
            f'{where}: the weights are {_describe(found)}, not {_describe(arch)}; '
            f"drop --arch to use the weights' own, or pass the arch of this checkpoint"
        )
    unknown = sorted(set(sd) - set(model_sd))
    if unknown:
        raise KeyError(f'{where}: keys not understood (not {_describe(arch)} keys): {unknown[:10]}')
    missing = sorted(
        k for k in set(model_sd) - set(sd) if not k.startswith(('norm0.', 'norm1.', 'norm2.'))
    )
    if missing:
        raise KeyError(
            f'{where}: the checkpoint lacks {len(missing)} weights of {_describe(arch)}: '
            f'{missing[:10]}'
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(model_sd[k].shape):
            raise ValueError(
                f'{where}: {k} has shape {tuple(v.shape)}, '
                f'{_describe(arch)} expects {tuple(model_sd[k].shape)}'
            )


def convert_state_dict(sd: dict, task: str, arch: str | dict | None = None) -> OrderedDict:
    """Convert an official state dict for ``task`` in ``{'cls', 'det', 'seg'}``.

    Returns:
        OrderedDict: The converted state dict (mmpretrain/mmdet 3/mmseg 1 keys).

    Raises:
        KeyError: A key the conversion does not understand (listed in the message).
    """
    if task not in ('cls', 'det', 'seg'):
        raise ValueError(f"task must be 'cls', 'det' or 'seg', got {task!r}")
    sd = {k[len('module.') :] if k.startswith('module.') else k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not ROPE.search(k)}
    out = OrderedDict()
    if task == 'cls':
        backbone = {}
        for k, v in sd.items():
            if k.startswith(('patch_embed.', 'layers.')):
                backbone[k] = v
            elif k.startswith('norm.'):
                backbone['norm3.' + k[len('norm.') :]] = v
            elif k.startswith('head.'):
                out['head.fc.' + k[len('head.') :]] = v
            else:
                raise KeyError(f'cls conversion: key not understood: {k!r}')
        arch = arch or infer_arch(backbone)
        _check_backbone(backbone, arch, 'cls conversion')
        return OrderedDict([*(('backbone.' + k, v) for k, v in backbone.items()), *out.items()])
    unknown = [k for k in sd if not k.startswith(TASK_PREFIXES[task])]
    if unknown:
        raise KeyError(
            f'{task} conversion: keys not understood (expected prefixes '
            f'{TASK_PREFIXES[task]}): {unknown[:10]}'
        )
    backbone = {k[len('backbone.') :]: v for k, v in sd.items() if k.startswith('backbone.')}
    if not backbone:
        raise KeyError(f'{task} conversion: the checkpoint has no backbone.* keys')
    arch = arch or infer_arch(backbone)
    _check_backbone(backbone, arch, f'{task} conversion')
    return OrderedDict(sd)


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    task: str,
    arch: str | dict | None = None,
    key: str | None = None,
) -> dict:
    """Convert the official checkpoint ``src`` and save ``{'state_dict', 'meta'}`` to ``dst``.

    Returns:
        dict: What was saved.
    """
    sd = load_official(src, key)
    converted = convert_state_dict(sd, task, arch)
    backbone = {k[len('backbone.') :]: v for k, v in converted.items() if k.startswith('backbone.')}
    ckpt = {
        'state_dict': converted,
        'meta': {
            'converted_from': str(src),
            'task': task,
            'arch': infer_arch(backbone),
            'converter': 'mlla_mm.apis.conversion',
        },
    }
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return ckpt
