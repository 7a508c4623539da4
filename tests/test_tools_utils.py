"""The checks tools/train.py and tools/test.py run before building anything (tools_utils)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
from mmengine.config import Config

pytest.importorskip('mmdet')

from mlla_mm.tools_utils import (  # noqa: E402
    ConfigCheckError,
    configure_train,
    setup_scope,
    validate_config,
)
from mlla_mm.toy_coco import make_toy_coco  # noqa: E402

ROOT = Path(__file__).parents[1]
TOY = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'


@pytest.fixture(scope='module')
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('toy')
    make_toy_coco(root, num_train=2, num_val=2, size=64)
    return root


def _toy_cfg(root: Path) -> Config:
    """The toy config pointed at ``root``, as a user would with --cfg-options."""
    cfg = Config.fromfile(str(TOY))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = f'{root}/'
    for ev in ('val_evaluator', 'test_evaluator'):
        cfg[ev].ann_file = f'{root}/annotations/instances_val.json'
    return cfg


def test_a_good_config_passes(toy_root):
    cfg = _toy_cfg(toy_root)
    assert setup_scope(cfg) == 'mmdet'
    validate_config(cfg)


def test_missing_dataset_folder(toy_root, tmp_path):
    cfg = _toy_cfg(toy_root)
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'no_such_coco')
    with pytest.raises(
        ConfigCheckError,
        match=r'train_dataloader\.dataset\.data_root.*no_such_coco.*does not exist',
    ):
        validate_config(cfg)
    # The val split is not checked when training without validation
    cfg = _toy_cfg(toy_root)
    cfg.val_dataloader.dataset.data_root = str(tmp_path / 'no_such_coco')
    with pytest.raises(ConfigCheckError, match='val_dataloader'):
        validate_config(cfg, phases=('train', 'val'))
    validate_config(cfg, phases=('train', 'test'))


@pytest.mark.parametrize(
    'content,match',
    [
        ('not json at all', 'is not JSON'),
        ('[1, 2, 3]', 'holds a list, not an object'),
        (json.dumps({'images': [], 'annotations': []}), r"no list \['categories'\]"),
        (
            json.dumps(
                {'images': [{'id': 1, 'path': 'a.png'}], 'annotations': [], 'categories': []}
            ),
            r"first entry of \"images\".*lacks \['file_name', 'height', 'width'\]",
        ),
        (
            json.dumps({'images': [], 'annotations': [], 'categories': [{'id': 1, 'name': 'cat'}]}),
            r"none of the config classes \('circle', 'square', 'triangle'\)",
        ),
    ],
)
def test_malformed_annotation_file(toy_root, tmp_path, content, match):
    bad = tmp_path / 'instances_bad.json'
    bad.write_text(content)
    cfg = _toy_cfg(toy_root)
    cfg.train_dataloader.dataset.ann_file = str(bad)
    with pytest.raises(ConfigCheckError, match=match) as err:
        validate_config(cfg)
    assert 'train_dataloader.dataset.ann_file' in str(err.value) and str(bad) in str(err.value)


def test_dataset_wrappers_are_looked_into(toy_root, tmp_path):
    cfg = _toy_cfg(toy_root)
    inner = cfg.train_dataloader.dataset
    inner.ann_file = str(tmp_path / 'missing.json')
    cfg.train_dataloader.dataset = dict(type='RepeatDataset', times=3, dataset=inner)
    with pytest.raises(ConfigCheckError, match=r'train_dataloader\.dataset\.dataset\.ann_file'):
        validate_config(cfg)


def test_unknown_arch_and_missing_pretrained_file(toy_root):
    cfg = _toy_cfg(toy_root)
    cfg.model.backbone.arch = 'huge'
    with pytest.raises(
        ConfigCheckError, match=r"model\.backbone\.arch: Unknown MLLA arch 'huge'.*'tiny'"
    ):
        validate_config(cfg)
    cfg.model.backbone.arch = dict(embed_dims=32, depths=(1, 1, 1))
    with pytest.raises(ConfigCheckError, match='num_heads'):
        validate_config(cfg)
    cfg = _toy_cfg(toy_root)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint='checkpoints/nothing.pth')
    with pytest.raises(
        ConfigCheckError, match=r'init_cfg\.checkpoint.*nothing\.pth.*does not exist'
    ):
        validate_config(cfg)


def test_amp_needs_cuda_and_resume_needs_a_file(toy_root, tmp_path):
    import torch

    args = Namespace(
        launcher='none', work_dir=str(tmp_path), amp=True, auto_scale_lr=False, resume=None
    )
    cfg = _toy_cfg(toy_root)
    if torch.cuda.is_available():
        configure_train(cfg, args)
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    else:
        with pytest.raises(ConfigCheckError, match='--amp'):
            configure_train(cfg, args)
    args.amp, args.resume = False, str(tmp_path / 'iter_9.pth')
    with pytest.raises(ConfigCheckError, match='iter_9.pth'):
        configure_train(cfg, args)
    args.resume = 'auto'
    configure_train(cfg, args)
    assert cfg.resume is True and cfg.load_from is None and cfg.work_dir == str(tmp_path)


def test_amp_config_on_the_cpu_fails_before_building(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip('checks the CPU message')
    cfg = Config.fromfile(str(ROOT / 'configs' / 'mask_rcnn_mlla_t_amp.py'))
    args = Namespace(
        launcher='none', work_dir=str(tmp_path), amp=False, auto_scale_lr=False, resume=None
    )
    with pytest.raises(ConfigCheckError, match='optim_wrapper.type=AmpOptimWrapper.*CUDA'):
        configure_train(cfg, args)


@pytest.mark.slow
def test_train_tool_fails_fast_with_the_config_key(toy_root, tmp_path):
    """Through tools/train.py: a clear message and exit status before any model is built."""
    work = tmp_path / 'work'
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            'tools/train.py',
            str(TOY),
            '--work-dir',
            str(work),
            '--cfg-options',
            'model.backbone.arch=huge',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "model.backbone.arch: Unknown MLLA arch 'huge'" in proc.stderr
    assert 'Traceback' not in proc.stderr and not work.exists()
    assert time.monotonic() - start < 60
