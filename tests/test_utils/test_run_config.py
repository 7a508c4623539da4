"""The flags of tools/train.py applied to a config (mlla_mm.utils.run_config)."""

from __future__ import annotations

import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

pytest.importorskip('mmdet')

from utils_helpers import toy_cfg  # noqa: E402

from mlla_mm.utils.run_config import configure_train  # noqa: E402

ROOT = Path(__file__).parents[2]
TOY = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'


def _train_args(tmp_path, **kw) -> Namespace:
    args = dict(launcher='none', work_dir=str(tmp_path), amp=False, auto_scale_lr=False)
    return Namespace(**{**args, 'resume': None, **kw})


def test_amp_needs_cuda_and_resume_needs_a_file(toy_root, tmp_path):
    cfg = toy_cfg(toy_root)
    problems = configure_train(cfg, _train_args(tmp_path, amp=True))
    if torch.cuda.is_available():
        assert problems == [] and cfg.optim_wrapper.type == 'AmpOptimWrapper'
    else:
        assert len(problems) == 1 and problems[0].startswith('--amp: ')
        assert 'train without --amp' in problems[0]
    (problem,) = configure_train(cfg, _train_args(tmp_path, resume=str(tmp_path / 'iter_9.pth')))
    assert 'iter_9.pth' in problem
    assert configure_train(cfg, _train_args(tmp_path, resume='auto')) == []
    assert cfg.resume is True and cfg.load_from is None and cfg.work_dir == str(tmp_path)


@pytest.mark.parametrize(
    'config, fix',
    [
        # an _amp variant: its float32 sibling is the fix
        ('mask_rcnn_mlla_t_amp.py', 'train .*mask_rcnn_mlla_t.py instead'),
        # AMP in the recipe itself (the official ImageNet run): switch the wrapper type
        ('mlla_t_in1k.py', '--cfg-options optim_wrapper.type=OptimWrapper'),
    ],
)
def test_amp_config_on_the_cpu_names_a_fix_that_applies(tmp_path, config, fix):
    if torch.cuda.is_available():
        pytest.skip('checks the CPU message')
    cfg = Config.fromfile(str(ROOT / 'configs' / config))
    (problem,) = configure_train(cfg, _train_args(tmp_path))
    assert re.search(f'optim_wrapper.type=AmpOptimWrapper: .*CUDA.*{fix}', problem), problem
    assert '_amp' not in problem.split('CUDA')[1] or config.endswith('_amp.py')
    if config == 'mlla_t_in1k.py':  # the fix given works: float32 training config
        cfg.merge_from_dict({'optim_wrapper.type': 'OptimWrapper'})
        assert configure_train(cfg, _train_args(tmp_path)) == []


@pytest.mark.slow
def test_in1k_config_on_the_cpu_lists_every_problem_with_its_fix(tmp_path):
    """``mlla-train mlla_mm::mlla_t_in1k.py`` without ImageNet and CUDA: mixed precision and
    both missing data folders in one message, exit 2, each fix about ImageNet (not COCO)."""
    pytest.importorskip('mmpretrain')
    if torch.cuda.is_available():
        pytest.skip('checks the CPU message')
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'train.py'), 'mlla_mm::mlla_t_in1k.py'],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert '3 problems:' in err, err
    assert 'optim_wrapper.type=OptimWrapper' in err
    assert 'train_dataloader.dataset.data_root' in err and 'val_dataloader.dataset' in err
    assert 'ImageNet' in err and 'COCO' not in err and 'make_toy' not in err
    assert 'Traceback' not in err
