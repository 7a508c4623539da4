"""Helpers of the detection tool tests: user configs that inherit ours, and tool subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
HERE = Path(__file__).parent
TOY_CONFIG = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'
# A tiny MLLA (the real stages, one block each, 32 channels) keeps each iteration well under a
# second on one CPU core; the toy config is otherwise used as it is.
TINY_ARCH = 'dict(_delete_=True, embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))'


def write_det_config(
    path: Path,
    data_root: Path,
    max_iters: int = 4,
    ckpt_interval: int = 4,
    probe: dict | None = None,
) -> Path:
    """Write a user config that inherits the toy config, as the README tells users to.

    Args:
        path: Config file to write.
        data_root: The toy COCO folder.
        max_iters: Training iterations (validation after the last one).
        ckpt_interval: Checkpoint every this many iterations.
        probe: Arguments of ``probe_hooks.StateProbeHook``, which is then added.
    """
    root = f'{data_root}/'
    hooks = ''
    if probe is not None:
        hooks = (
            "custom_imports = dict(imports=['mlla_mm', 'probe_hooks'], "
            'allow_failed_imports=False)\n'
            f"custom_hooks = [dict(type='StateProbeHook', **{probe!r})]\n"
        )
    loader = 'num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root)'
    path.write_text(
        f'_base_ = [{str(TOY_CONFIG)!r}]\n'
        f'data_root = {root!r}\n'
        f'model = dict(backbone=dict(arch={TINY_ARCH}),\n'
        '             neck=dict(in_channels=[32, 64, 128, 256]))\n'
        f'train_dataloader = dict(batch_size=2, {loader})\n'
        f'val_dataloader = dict(batch_size=2, {loader})\n'
        'test_dataloader = val_dataloader\n'
        "val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')\n"
        'test_evaluator = val_evaluator\n'
        f'train_cfg = dict(max_iters={max_iters}, val_interval={max_iters})\n'
        'default_hooks = dict(logger=dict(interval=1), '
        f'checkpoint=dict(interval={ckpt_interval}, max_keep_ckpts=-1))\n' + hooks
    )
    return path


def tool_env() -> dict:
    """Environment of a tool subprocess: one thread, and this folder importable (probe hooks)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(ROOT), str(HERE), env.get('PYTHONPATH', '')) if p
    )
    return env


def run_tool(*args, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python tools/<args>`` from the repository root and return the finished process."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f'{" ".join(map(str, args))} exited with {proc.returncode}:\n'
            f'{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}'
        )
    return proc


def assert_same_state(a, b, where: str = 'state') -> None:
    """Assert that two nested containers of tensors and numbers are equal; name a difference."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.shape == b.shape and torch.equal(a, b), f'{where} differs'
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f'{where}: keys {set(a) ^ set(b)}'
        for k in a:
            assert_same_state(a[k], b[k], f'{where}[{k!r}]')
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f'{where}: lengths differ'
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


def read_test_metrics(work_dir: Path) -> dict:
    """The metrics ``tools/test.py`` logged into ``work_dir`` (mmengine's ``<timestamp>.json``)."""
    from mlla_mm.utils.run_config import read_logged_metrics

    return read_logged_metrics(work_dir)
