"""Kill a training run, resume it, and check that it continues exactly from its last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from det_helpers import ROOT, assert_same_state, run_tool, tool_env, write_det_config

pytestmark = pytest.mark.slow


def _wait_for(path, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f'training ended (rc={proc.returncode}) before {path.name} appeared')
        if time.monotonic() > deadline:
            pytest.fail(f'{path.name} did not appear within {timeout} s')
        time.sleep(0.2)


def test_killed_training_resumes_from_its_last_checkpoint(toy_coco, tmp_path):
    import mlla_mm  # noqa: F401  (weights_only allow-list for the checkpoints)

    probe = tmp_path / 'probe'
    probe.mkdir()
    work = tmp_path / 'work'
    # Checkpoints after iterations 3 and 6 of 8; the first run stalls after iteration 5 and is
    # killed there (SIGKILL: no handler, no cleanup), so iterations 4 and 5 are lost.
    cfg = dict(data_root=toy_coco, max_iters=8, ckpt_interval=3)
    first = write_det_config(
        tmp_path / 'first.py', **cfg, probe=dict(out_dir=str(probe), stall_at_iter=5)
    )
    with open(tmp_path / 'first.log', 'w') as log:
        proc = subprocess.Popen(
            [sys.executable, 'tools/train.py', str(first), '--work-dir', str(work)],
            cwd=ROOT,
            env=tool_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_for(probe / 'stalled', proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = (work / 'last_checkpoint').read_text().strip()
    assert last.endswith('iter_3.pth')
    saved = torch.load(last, weights_only=True)

    second = write_det_config(tmp_path / 'second.py', **cfg, probe=dict(out_dir=str(probe)))
    proc = run_tool('tools/train.py', second, '--work-dir', work, '--resume')
    assert 'resumed epoch: 0, iter: 3' in proc.stdout + proc.stderr

    # What the resumed run started from (after the Runner's resume) is the checkpoint's state:
    # iteration counter, weights, AdamW moments and step counts, lr schedule.
    start = torch.load(probe / 'start_rank0.pth', weights_only=True)
    assert start['iter'] == saved['meta']['iter'] == 3
    assert_same_state(start['params'], {k: saved['state_dict'][k] for k in start['params']})
    assert_same_state(start['optimizer'], saved['optimizer'], 'optimizer')
    assert_same_state(start['param_schedulers'], saved['param_schedulers'], 'param_schedulers')
    steps = {float(s['step']) for s in saved['optimizer']['state'].values()}
    assert steps == {3.0}  # AdamW's bias correction continues from step 3, not from 0
    assert start['param_schedulers'][0]['last_step'] == 3

    # ... and it trained the remaining iterations 4..8 (not 8 more, not from 0).
    end = torch.load(probe / 'end_rank0.pth', weights_only=True)
    assert end['iter'] == 8
    final = torch.load(work / 'iter_8.pth', weights_only=True)
    assert final['meta']['iter'] == 8
    assert {float(s['step']) for s in final['optimizer']['state'].values()} == {8.0}
