"""A checkpoint against the model of a config (mlla_mm.utils.checkpoint_check)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mmengine.config import Config

pytest.importorskip('mmdet')

from mlla_mm.utils.checkpoint_check import checkpoint_problems  # noqa: E402
from mlla_mm.utils.scope import setup_scope  # noqa: E402

ROOT = Path(__file__).parents[2]
TOY = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'


def _tiny_model(config: str):
    cfg = Config.fromfile(str(ROOT / 'configs' / 'toy' / config))
    scope = setup_scope(cfg)
    cfg.model.backbone.arch = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    if scope == 'mmdet':
        cfg.model.neck.in_channels = [16, 32, 64, 128]
    else:
        cfg.model.decode_head.in_channels = [16, 32, 64, 128]
        cfg.model.auxiliary_head.in_channels = 64
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    return registry.build(cfg.model)


def test_checkpoint_problems_name_the_missing_heads():
    pytest.importorskip('mmseg')
    det, seg = _tiny_model('mask_rcnn_mlla_t_toy.py'), _tiny_model('upernet_mlla_t_toy.py')
    assert checkpoint_problems(seg, seg.state_dict()) == []
    # DDP / runner checkpoints may prefix every key with 'module.'
    assert checkpoint_problems(seg, {f'module.{k}': v for k, v in seg.state_dict().items()}) == []
    (problem,) = checkpoint_problems(seg, det.state_dict())
    assert 'decode_head.* (' in problem and 'auxiliary_head.* (' in problem
    assert 'backbone' not in problem.split('; it holds')[0]  # the backbone is there
    assert 'roi_head.*' in problem.split('; it holds')[1]  # a hint to the checkpoint's origin
    state = seg.state_dict()
    state['decode_head.conv_seg.weight'] = state['decode_head.conv_seg.weight'][:2]
    (problem,) = checkpoint_problems(seg, state)
    assert 'decode_head.conv_seg.weight: (2, 128, 1, 1) in the checkpoint, (4, 128' in problem
