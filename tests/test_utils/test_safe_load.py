"""Runner-written checkpoints load with ``weights_only=True`` after ``import mlla_mm``; a pickle
that smuggles in a callable is still refused."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.runner import Runner, load_checkpoint

import mlla_mm  # noqa: F401  (registers the safe globals)


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.bn(self.linear(inputs))  # default_collate stacks the batch
        if mode == 'loss':
            return {'loss': ((out - labels) ** 2).mean()}
        return out


class ToyDataset(torch.utils.data.Dataset):
    metainfo = {'classes': ('a', 'b'), 'palette': [(0, 0, 0), (1, 1, 1)]}

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {'inputs': torch.randn(4, generator=g), 'labels': torch.randn(2, generator=g)}


def _runner(work_dir, max_iters, resume=False):
    return Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=ToyDataset(),
            sampler=dict(type='DefaultSampler', shuffle=True),
            batch_size=2,
            collate_fn=dict(type='default_collate'),
        ),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-2)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=4),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False)),
        randomness=dict(seed=0),
        resume=resume,
        default_scope='mmengine',
    )


@pytest.fixture(scope='module')
def runner_ckpt(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('runner')
    _runner(work_dir, 2).train()
    return work_dir, work_dir / 'iter_2.pth'


def test_runner_checkpoint_has_the_awkward_types(runner_ckpt):
    _, path = runner_ckpt
    ckpt = torch.load(path, weights_only=True)  # would raise without the allow-list
    hub = ckpt['message_hub']
    assert type(hub['log_scalars']['train/loss']).__name__ == 'HistoryBuffer'
    assert isinstance(hub['log_scalars']['train/loss'].data[0], np.ndarray)
    assert ckpt['meta']['iter'] == 2 and 'optimizer' in ckpt and 'param_schedulers' in ckpt


def test_load_checkpoint_and_resume(runner_ckpt):
    work_dir, path = runner_ckpt
    model = ToyModel()
    load_checkpoint(model, str(path), map_location='cpu')
    saved = torch.load(path, weights_only=True)['state_dict']
    assert torch.equal(model.linear.weight, saved['linear.weight'])
    runner = _runner(work_dir, 4, resume=True)  # resumes from the last checkpoint (iter_2)
    runner.train()
    assert runner.iter == 4
    assert (work_dir / 'iter_4.pth').exists()


def test_default_torch_load_is_still_weights_only(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': {}, 'meta': Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match='Weights only load failed'):
        torch.load(path)
    with pytest.raises(Exception, match='Weights only load failed'):
        load_checkpoint(ToyModel(), str(path))
    assert not marker.exists()


def test_fresh_process_loads_runner_checkpoint(runner_ckpt):
    """The statistics methods are resolved before any HistoryBuffer exists (as in tools/test.py)."""
    _, path = runner_ckpt
    code = (
        'import mlla_mm, sys, torch; '
        'hub = torch.load(sys.argv[1], weights_only=True)["message_hub"]; '
        'print(hub["log_scalars"]["train/loss"].mean())'
    )
    out = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 0


def test_pickled_getattr_resolves_nothing_but_history_buffer_statistics(tmp_path):
    from mmengine.logging import HistoryBuffer

    class Sneaky:
        def __reduce__(self):
            return (getattr, (HistoryBuffer, '__init__'))

    class Evil:
        def __reduce__(self):
            return (getattr, (np.ndarray, 'tofile'))

    for payload in (Sneaky(), Evil()):
        path = tmp_path / 'getattr.pth'
        torch.save({'state_dict': {}, 'meta': payload}, path)
        with pytest.raises(pickle.UnpicklingError, match='Refusing getattr'):
            torch.load(path)


def test_safety_switches_are_not_flipped():
    assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD' not in os.environ
    code = 'import mlla_mm, os; print(os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'None'
    allowed = {
        f'{g.__module__}.{g.__qualname__}'
        for g in torch.serialization.get_safe_globals()
        if not isinstance(g, tuple)
    }
    assert 'posix.system' not in allowed and 'builtins.eval' not in allowed


def test_empty_numpy_arrays_and_history_buffers_load(tmp_path):
    """torch.save's protocol 2 writes the empty data of an empty array as ``bytes()``."""
    from mmengine.logging import HistoryBuffer, MessageHub

    hub = MessageHub.get_instance('empty_buffers')
    hub.update_scalar('train/loss', 1.0)
    state = hub.state_dict()
    state['log_scalars']['val/never_logged'] = HistoryBuffer()  # an empty buffer
    ckpt = {
        'state_dict': {'w': torch.ones(2)},
        'message_hub': state,
        'meta': {'empty': np.array([]), 'empty_int': np.zeros((0, 3), dtype=np.int64)},
    }
    path = tmp_path / 'empty.pth'
    torch.save(ckpt, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded['meta']['empty'].shape == (0,)
    assert loaded['meta']['empty_int'].shape == (0, 3)
    assert loaded['meta']['empty_int'].dtype == np.int64
    assert len(loaded['message_hub']['log_scalars']['val/never_logged'].data[0]) == 0
    load_checkpoint(nn.Linear(2, 2), str(path))  # mmengine's loader too (w is unexpected)


def test_pickled_bytes_only_makes_empty_bytes(tmp_path):
    marker = tmp_path / 'pwned'

    class Huge:
        def __reduce__(self):
            return (bytes, (10**6,))

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    for payload in (Huge(), Evil()):
        path = tmp_path / 'bytes.pth'
        torch.save({'state_dict': {}, 'meta': payload}, path)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)
    assert not marker.exists()
