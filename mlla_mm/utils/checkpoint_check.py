"""A checkpoint against the model it is loaded into: refuse one that leaves part of it untrained."""

from __future__ import annotations

import re

from mlla_mm.utils.errors import CheckpointMismatchError
from mlla_mm.utils.paths import shown

__all__ = ['check_checkpoint', 'checkpoint_problems']


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


def check_checkpoint(
    model,
    checkpoint: str,
    skip_hint: str = 'pass --skip-checkpoint-check to evaluate anyway',
) -> None:
    """Refuse a checkpoint that would leave part of ``model`` untrained (e.g. another task's).

    mmengine loads checkpoints with ``strict=False`` and only logs missing keys, so a detector
    checkpoint on a segmentation config would be evaluated with a random decode head.

    Args:
        model: The built model.
        checkpoint: Path or URL of the checkpoint.
        skip_hint: The end of the message: how to go on with this checkpoint anyway.

    Raises:
        CheckpointMismatchError: Naming the missing keys (grouped by module), the shape
            mismatches, and what to do.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    state_dict = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state_dict, dict):
        raise CheckpointMismatchError(
            f'checkpoint {shown(checkpoint)} holds a {type(ckpt).__name__}, not a state dict'
        )
    problems = checkpoint_problems(model, state_dict)
    if problems:
        raise CheckpointMismatchError(
            f'checkpoint {shown(checkpoint)} does not fit the model of this config: '
            + '; '.join(problems)
            + '. Use it with the config it was trained with (a detector, segmentor and '
            f'classifier checkpoint each fit only their own kind of model), or {skip_hint}'
        )
