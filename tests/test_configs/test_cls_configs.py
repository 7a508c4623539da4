"""The mmpretrain ImageNet configs build and train a step."""

from pathlib import Path

import pytest
import torch
from mmengine.config import Config

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize('arch,dims,dpr', [('t', 512, 0.2), ('s', 512, 0.3), ('b', 768, 0.5)])
def test_cls_config_builds_and_trains_a_step(arch, dims, dpr):
    pytest.importorskip('mmpretrain')
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample
    from mmpretrain.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(str(ROOT / 'configs' / f'mlla_{arch}_in1k.py'))
    assert cfg.model.backbone.drop_path_rate == dpr and cfg.model.head.in_channels == dims
    assert cfg.train_cfg.max_epochs == 300 and cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 1024
    cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)  # as the Runner does
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    data = {
        'inputs': [torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8) for _ in range(2)],
        'data_samples': [DataSample().set_gt_label(i) for i in (3, 7)],
    }
    data = model.data_preprocessor(data, training=True)
    losses = model(**data, mode='loss')
    losses['loss'].backward()
    assert torch.isfinite(losses['loss'])
    assert model.backbone.layers[0].blocks[0].attn.qk.weight.grad is not None
