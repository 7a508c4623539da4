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

import re
from collections import OrderedDict
from pathlib import Path

import torch

from mlla_mm.models.backbones.mlla import MLLA

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
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {str(path)!r} does not exist')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and the fix
        raise ValueError(
            f'{str(path)!r} is not a checkpoint that loads safely with weights_only=True: {e}'
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


def infer_arch(backbone_sd: dict) -> str:
    """Name of the official variant (``tiny``/``small``/``base``) that matches these weights."""
    try:
        embed = backbone_sd['patch_embed.conv3.1.conv.weight'].shape[0]
    except KeyError as e:
        raise ValueError(
            'Not an MLLA state dict: patch_embed.conv3.1.conv.weight is missing'
        ) from e
    depths = []
    for i in range(4):
        blocks = {
            int(m.group(1))
            for k in backbone_sd
            if (m := re.match(rf'layers\.{i}\.blocks\.(\d+)\.', k))
        }
        depths.append(len(blocks))
    for name in ('tiny', 'small', 'base'):
        arch = MLLA.arch_zoo[name]
        if arch['embed_dims'] == embed and tuple(arch['depths']) == tuple(depths):
            return name
    raise ValueError(
        f'Weights with embed_dims={embed}, depths={tuple(depths)} match no official MLLA variant; '
        'pass --arch with a dict of embed_dims/depths/num_heads'
    )


def _check_backbone(sd: dict, arch: str | dict, where: str) -> None:
    model_sd = MLLA(arch=arch, drop_path_rate=0.0).state_dict()
    unknown = sorted(set(sd) - set(model_sd))
    if unknown:
        raise KeyError(f'{where}: keys not understood (not MLLA-{arch} keys): {unknown[:10]}')
    for k, v in sd.items():
        if tuple(v.shape) != tuple(model_sd[k].shape):
            raise ValueError(
                f'{where}: {k} has shape {tuple(v.shape)}, '
                f'MLLA-{arch} expects {tuple(model_sd[k].shape)}'
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
    ckpt = {
        'state_dict': converted,
        'meta': {'converted_from': str(src), 'task': task, 'converter': 'mlla_mm.convert'},
    }
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return ckpt
