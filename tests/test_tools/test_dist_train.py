"""Distributed data-parallel training for real: 2 CPU processes (gloo) via tools/dist_train.sh."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from det_helpers import ROOT, read_test_metrics, tool_env, write_det_config

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(script: str, *args) -> str:
    """Run ``bash tools/dist_*.sh ARGS`` (torchrun, 2 CPU processes); return its output."""
    env = dict(tool_env(), PYTHON=sys.executable, PORT=str(_free_port()))
    proc = subprocess.run(
        ['bash', script, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def _log_file_text(work_dir) -> str:
    """mmengine's log file(s) of the runs in ``work_dir`` (``<timestamp>/<timestamp>.log``)."""
    files = sorted(work_dir.glob('*/*.log'))
    assert files, f'no log file in {work_dir}'
    return ''.join(f.read_text() for f in files)


def test_two_cpu_processes_train_identical_replicas_then_test(toy_coco, tmp_path):
    probe = tmp_path / 'probe'
    probe.mkdir()
    cfg = write_det_config(
        tmp_path / 'toy_tiny.py',
        toy_coco,
        max_iters=3,
        ckpt_interval=3,
        probe=dict(out_dir=str(probe)),
    )
    _torchrun('tools/dist_train.sh', cfg, '2', '--work-dir', tmp_path / 'work')
    # the runtime environment is in rank 0's log file (the console shows only the progress)
    env = _log_file_text(tmp_path / 'work')
    assert 'Distributed launcher: pytorch' in env and 'GPU number: 2' in env  # = processes

    start = [torch.load(probe / f'start_rank{r}.pth', weights_only=True) for r in (0, 1)]
    end = [torch.load(probe / f'end_rank{r}.pth', weights_only=True) for r in (0, 1)]
    assert start[0]['iter'] == start[1]['iter'] == 0 and end[0]['iter'] == end[1]['iter'] == 3
    names = list(end[0]['params'])
    assert names == list(end[1]['params'])
    # Same start (DDP broadcasts rank 0's weights), same end (all-reduced gradients) ...
    for name in names:
        assert torch.equal(start[0]['params'][name], start[1]['params'][name]), name
        assert torch.equal(end[0]['params'][name], end[1]['params'][name]), name
    # ... and they trained: every backbone weight moved.
    moved = [n for n in names if not torch.equal(start[0]['params'][n], end[0]['params'][n])]
    backbone = [n for n in names if n.startswith('backbone.')]
    assert set(backbone) <= set(moved), sorted(set(backbone) - set(moved))[:5]
    assert (tmp_path / 'work' / 'iter_3.pth').is_file()  # written once, by rank 0

    # The 2-process test splits the 4 val images between the ranks and gathers the results.
    _torchrun('tools/dist_test.sh', cfg, tmp_path / 'work' / 'iter_3.pth', '2',
              '--work-dir', tmp_path / 'test')  # fmt: skip
    metrics = read_test_metrics(tmp_path / 'test')
    assert 'coco/bbox_mAP_50' in metrics and 'GPU number: 2' in _log_file_text(tmp_path / 'test')
