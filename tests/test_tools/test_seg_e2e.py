"""Segmentation end to end through tools/: the toy ADE20K set, training, testing (also with --tta).

A user config inherits configs/toy/upernet_mlla_t_toy.py, as the README tells users to, with a
tiny MLLA and a few iterations, so the whole module runs in well under a minute on two cores.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).parents[2]
TOY_CONFIG = ROOT / 'configs' / 'toy' / 'upernet_mlla_t_toy.py'
ITERS = 4
pytestmark = pytest.mark.slow


def run(*args, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` from the repository root on one thread; fail with its output."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(ROOT), env.get('PYTHONPATH', '')) if p)
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f'{args} exited with {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}'
        )
    return proc


def miou(proc: subprocess.CompletedProcess) -> float:
    """The mIoU (percent) mmseg's IoUMetric logged last."""
    found = re.findall(r'mIoU: (\d+\.\d+)', proc.stdout + proc.stderr)
    assert found, f'no mIoU in the output:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return float(found[-1])


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> dict:
    """Make the toy set with the tool, write a user config and train it through tools/train.py."""
    pytest.importorskip('mmseg')
    tmp = tmp_path_factory.mktemp('seg_e2e')
    data = tmp / 'toy_ade20k'
    run('tools/misc/make_toy_ade20k.py', data, '--num-train', 8, '--num-val', 3, '--size', 64)
    config = tmp / 'upernet_tiny_toy.py'
    config.write_text(
        f'_base_ = [{str(TOY_CONFIG)!r}]\n'
        f'data_root = {str(data) + "/"!r}\n'
        'model = dict(\n'
        '    backbone=dict(arch=dict(_delete_=True, embed_dims=32, depths=(1, 1, 1, 1), '
        'num_heads=(1, 2, 4, 8))),\n'
        '    decode_head=dict(in_channels=[32, 64, 128, 256], channels=32),\n'
        '    auxiliary_head=dict(in_channels=128, channels=16),\n'
        ')\n'
        'loader = dict(\n'
        '    num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root)\n'
        ')\n'
        'train_dataloader = dict(batch_size=4, **loader)\n'
        'val_dataloader = dict(**loader)\n'
        'test_dataloader = val_dataloader\n'
        'default_hooks = dict(logger=dict(interval=1))\n'
        'randomness = dict(seed=0)\n'
    )
    work = tmp / 'work'
    proc = run(
        'tools/train.py', config, '--work-dir', work, '--cfg-options',
        f'train_cfg.max_iters={ITERS}', f'train_cfg.val_interval={ITERS}',
        f'default_hooks.checkpoint.interval={ITERS}',
    )  # fmt: skip
    return dict(tmp=tmp, data=data, config=config, work=work, train=proc)


def test_train_saves_a_checkpoint_and_validates(trained):
    import torch

    import mlla_mm  # noqa: F401  (allow-lists the checkpoint's types)

    ckpt = trained['work'] / f'iter_{ITERS}.pth'
    assert ckpt.is_file(), sorted(p.name for p in trained['work'].iterdir())
    state = torch.load(ckpt, map_location='cpu', weights_only=True)
    assert state['meta']['iter'] == ITERS
    weights = state['state_dict']
    assert any(k.startswith('backbone.layers.3.blocks.0.') for k in weights)
    assert weights['decode_head.conv_seg.weight'].shape == (4, 32, 1, 1)  # 4 toy classes
    assert 0.0 <= miou(trained['train']) <= 100.0  # validation ran after the last iteration


def test_test_reports_miou_and_full_size_predictions(trained):
    out = trained['tmp'] / 'preds.pkl'
    ckpt = trained['work'] / f'iter_{ITERS}.pth'
    work = trained['tmp'] / 'test'
    proc = run('tools/test.py', trained['config'], ckpt, '--work-dir', work, '--out', out)
    assert 0.0 <= miou(proc) <= 100.0
    with open(out, 'rb') as f:
        preds = pickle.load(f)
    assert len(preds) == 3
    for pred in preds:
        w, h = Image.open(pred['img_path']).size  # predictions come back at the image's own size
        assert tuple(pred['pred_sem_seg']['data'].shape) == (1, h, w)
        assert tuple(pred['seg_logits']['data'].shape) == (4, h, w)


def test_test_with_tta(trained):
    ckpt = trained['work'] / f'iter_{ITERS}.pth'
    proc = run(
        'tools/test.py', trained['config'], ckpt, '--tta', '--work-dir', trained['tmp'] / 'tta'
    )
    assert 0.0 <= miou(proc) <= 100.0


def test_missing_dataset_fails_before_building(trained, tmp_path):
    proc = run(
        'tools/train.py', trained['config'], '--work-dir', tmp_path, '--cfg-options',
        f'train_dataloader.dataset.data_root={tmp_path / "nowhere"}',
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert 'does not exist' in proc.stderr, proc.stderr[-2000:]
    assert '`mlla-make-toy ade20k ' in proc.stderr, proc.stderr[-2000:]


def test_test_refuses_a_checkpoint_without_the_models_heads(trained, tmp_path):
    """Issue 11.5: a detector checkpoint on a segmentation config was evaluated (mIoU 2.07, exit
    0) with a random decode head; tools/test.py now refuses it and names what is missing."""
    import torch
    from mmengine.config import Config

    from mlla_mm.utils.scope import setup_scope

    det_cfg = Config.fromfile(str(ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'))
    setup_scope(det_cfg)
    det_cfg.model.backbone.arch = dict(embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    det_cfg.model.neck.in_channels = [32, 64, 128, 256]
    from mmdet.registry import MODELS

    detector = MODELS.build(det_cfg.model)  # random weights: only the keys matter
    ckpt = tmp_path / 'detector.pth'
    torch.save(dict(state_dict=detector.state_dict(), meta=dict()), ckpt)
    proc = run('tools/test.py', trained['config'], ckpt, '--work-dir', tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert 'Traceback' not in err and 'mIoU' not in proc.stdout
    assert 'does not fit the model of this config' in err
    assert 'decode_head.* (' in err and 'auxiliary_head.* (' in err  # the missing keys, by prefix
    assert 'roi_head.*' in err  # and what the checkpoint holds instead
    # The escape hatch evaluates anyway (the heads stay random).
    proc = run(
        'tools/test.py', trained['config'], ckpt, '--work-dir', tmp_path,
        '--skip-checkpoint-check',
    )  # fmt: skip
    assert 0.0 <= miou(proc) <= 100.0
