"""The mmdet Mask R-CNN configs: settings of the official recipe, and one training step each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mmengine.config import Config

pytest.importorskip('mmdet')

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / 'configs'
NARROW = [64, 128, 256, 512]
# config -> (arch, drop path, epochs, FPN input channels)
DET_CONFIGS = {
    'mask_rcnn_mlla_t.py': ('tiny', 0.1, 12, NARROW),
    'mask_rcnn_mlla_t_3x.py': ('tiny', 0.3, 36, NARROW),
    'mask_rcnn_mlla_t_amp.py': ('tiny', 0.1, 12, NARROW),
    'mask_rcnn_mlla_s.py': ('small', 0.1, 12, NARROW),
    'mask_rcnn_mlla_s_3x.py': ('small', 0.3, 36, NARROW),
    'mask_rcnn_mlla_b.py': ('base', 0.1, 12, [96, 192, 384, 768]),
}


@pytest.fixture
def mmdet_scope():
    """mmdet's registries as the default scope for one test, then whatever was there before."""
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmdet'):
        yield


def test_every_detection_config_is_tested():
    shipped = {p.name for p in CONFIGS.glob('mask_rcnn_*.py')}
    assert shipped == set(DET_CONFIGS)


def _pipeline_types(pipeline) -> list:
    return [t['type'] for t in pipeline]


@pytest.mark.parametrize('name', sorted(DET_CONFIGS))
def test_config_follows_the_official_recipe(name):
    arch, dpr, epochs, in_channels = DET_CONFIGS[name]
    cfg = Config.fromfile(str(CONFIGS / name))
    assert cfg.default_scope == 'mmdet' and cfg.model.type == 'MaskRCNN'
    bb = cfg.model.backbone
    assert (bb.type, bb.arch, bb.drop_path_rate) == ('mlla_mm.MLLA', arch, dpr)
    assert bb.out_indices == (0, 1, 2, 3) and 'depth' not in bb  # ResNet keys deleted
    assert bb.init_cfg.type == 'Pretrained' and bb.init_cfg.checkpoint.endswith('.pth')
    assert cfg.model.neck.in_channels == in_channels
    assert cfg.train_cfg.max_epochs == epochs
    milestones = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR'][0].milestones
    assert milestones == ([8, 11] if epochs == 12 else [27, 33])

    opt = cfg.optim_wrapper
    assert opt.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    assert opt.type == ('AmpOptimWrapper' if name.endswith('_amp.py') else 'OptimWrapper')
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16

    train = cfg.train_dataloader.dataset.pipeline
    assert _pipeline_types(train) == [
        'LoadImageFromFile',
        'LoadAnnotations',
        'RandomFlip',
        'RandomChoice',
        'PackDetInputs',
    ]
    multi_scale, crop = train[3].transforms
    scales = multi_scale[0].scales
    assert [min(s) for s in scales] == list(range(480, 801, 32))  # shorter side 480..800
    assert {max(s) for s in scales} == {1333}
    assert _pipeline_types(crop) == ['RandomChoiceResize', 'RandomCrop', 'RandomChoiceResize']
    assert crop[1].crop_size == (384, 600) and crop[1].crop_type == 'absolute_range'
    test = cfg.test_dataloader.dataset.pipeline
    assert [t for t in test if t.type == 'Resize'][0].scale == (1333, 800)


def weight_decays(cfg: Config) -> dict:
    """{parameter name: weight decay} of a tiny-MLLA Mask R-CNN under ``cfg.optim_wrapper``."""
    from mmdet.registry import MODELS
    from mmengine.optim import build_optim_wrapper

    cfg.model.backbone.update(
        init_cfg=None, arch=dict(embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    )
    cfg.model.neck.in_channels = [32, 64, 128, 256]
    model = MODELS.build(cfg.model)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    ids = {id(p): n for n, p in model.named_parameters()}
    decay = {
        ids[id(p)]: g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']
    }
    assert set(decay) == set(ids.values())
    norms = {
        f'{m}.{p}'
        for m, mod in model.named_modules()
        if isinstance(mod, (torch.nn.LayerNorm, torch.nn.BatchNorm2d))
        for p in ('weight', 'bias')
    }
    # MLLA names every norm layer '...norm...', so the official name rule is the type rule.
    assert norms == {n for n in decay if 'norm' in n}
    return decay


@pytest.mark.parametrize('name', ['mask_rcnn_mlla_t.py', 'mask_rcnn_mlla_b.py'])
def test_weight_decay_spares_only_norms_as_official(name, mmdet_scope):
    """Official custom_keys: no decay where the name contains 'norm' (its other keys are Swin's)."""
    decay = weight_decays(Config.fromfile(str(CONFIGS / name)))
    no_decay = {n for n, wd in decay.items() if wd == 0}
    assert no_decay == {n for n in decay if 'norm' in n} and len(no_decay) > 20
    assert {decay[n] for n in decay if n not in no_decay} == {0.05}
    for decayed in (
        'backbone.layers.0.blocks.0.cpe1.weight',
        'backbone.layers.0.blocks.0.cpe2.weight',
        'backbone.layers.0.blocks.0.attn.lepe.weight',
        'backbone.layers.0.blocks.0.attn.qk.bias',
        'neck.fpn_convs.0.conv.bias',
    ):
        assert decay[decayed] == 0.05, decayed


@pytest.mark.parametrize('name', sorted(DET_CONFIGS))
def test_downstream_configs_start_the_output_norms_fresh(name):
    cfg = Config.fromfile(str(CONFIGS / name))
    assert cfg.model.backbone.map_cls_norm is False
    assert cfg.optim_wrapper.paramwise_cfg == dict(custom_keys={'norm': dict(decay_mult=0.0)})


def _demo_batch(model, with_mask=True):
    from mmdet.testing import demo_mm_inputs

    # Two odd-sized images (the data preprocessor pads to 32), three objects each.
    data = demo_mm_inputs(
        2, [(3, 67, 93), (3, 75, 64)], num_items=[3, 3], num_classes=80, with_mask=with_mask
    )
    return model.data_preprocessor(data, training=True)


@pytest.mark.parametrize('name', sorted(DET_CONFIGS))
def test_config_builds_and_trains_a_step(name, mmdet_scope):
    from mmdet.registry import MODELS

    cfg = Config.fromfile(str(CONFIGS / name))
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    losses = model(**_demo_batch(model), mode='loss')
    loss, _ = model.parse_losses(losses)
    loss.backward()
    assert torch.isfinite(loss) and 'loss_mask' in losses and 'loss_rpn_cls' in losses
    grads = [p.grad for n, p in model.backbone.named_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_toy_config_inherits_the_coco_config():
    cfg = Config.fromfile(str(CONFIGS / 'toy' / 'mask_rcnn_mlla_t_toy.py'))
    base = Config.fromfile(str(CONFIGS / 'mask_rcnn_mlla_t.py'))
    assert cfg.model.backbone.type == base.model.backbone.type and cfg.model.backbone.arch == 'tiny'
    assert cfg.model.backbone.init_cfg is None  # trained from scratch: no download
    assert cfg.model.roi_head.bbox_head.num_classes == cfg.model.roi_head.mask_head.num_classes == 3
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    assert cfg.optim_wrapper.paramwise_cfg == base.optim_wrapper.paramwise_cfg
    assert cfg.train_cfg.type == 'IterBasedTrainLoop'


def test_a_user_config_inherits_ours(tmp_path):
    """The README's recipe: a user's config with their own data, classes and schedule."""
    user = tmp_path / 'my_mask_rcnn.py'
    user.write_text(
        f'_base_ = [{str(CONFIGS / "mask_rcnn_mlla_t.py")!r}]\n'
        "data_root = '/data/my_coco/'\n"
        "metainfo = dict(classes=('cat', 'dog'))\n"
        'model = dict(\n'
        '    roi_head=dict(bbox_head=dict(num_classes=2), mask_head=dict(num_classes=2)))\n'
        'train_dataloader = dict(dataset=dict(data_root=data_root, metainfo=metainfo))\n'
        'val_dataloader = dict(dataset=dict(data_root=data_root, metainfo=metainfo))\n'
        'test_dataloader = val_dataloader\n'
        "val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')\n"
        'test_evaluator = val_evaluator\n'
        'train_cfg = dict(max_epochs=24)\n'
    )
    cfg = Config.fromfile(str(user))
    ds = cfg.train_dataloader.dataset
    assert ds.data_root == '/data/my_coco/' and ds.metainfo.classes == ('cat', 'dog')
    assert ds.pipeline[3].type == 'RandomChoice'  # our augmentation is kept
    assert cfg.model.backbone.type == 'mlla_mm.MLLA' and cfg.train_cfg.max_epochs == 24
    assert cfg.test_evaluator.ann_file == '/data/my_coco/annotations/instances_val2017.json'
