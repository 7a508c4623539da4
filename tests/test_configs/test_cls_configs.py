"""The mmpretrain ImageNet configs: every value of the official recipe, and a training step."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

pytest.importorskip('mmpretrain')

ROOT = Path(__file__).parents[2]
GPUS = 8  # the official README: python -m torch.distributed.launch --nproc_per_node=8 ... --amp
# LeapLabTHU/MLLA config.py defaults.
BASE_LR, WARMUP_LR, MIN_LR = 5e-4, 5e-7, 5e-6
EPOCHS, WARMUP_EPOCHS, WEIGHT_DECAY, CLIP_GRAD = 300, 20, 0.05, 5.0
MODEL_EMA_DECAY = 0.9996  # main.py --model-ema-decay default (--model-ema is always on)
# cfgs/mlla_{t,s,b}.yaml: arch, DROP_PATH_RATE, DATA.BATCH_SIZE (per GPU), AUG.MESA; head width.
OFFICIAL = {
    't': ('tiny', 0.2, 128, 1.0, 512),
    's': ('small', 0.3, 64, 1.5, 512),
    'b': ('base', 0.5, 64, 2.0, 768),
}


@pytest.fixture(autouse=True)
def _mmpretrain_scope():
    """mmpretrain's registries as the default scope for each test, then the previous one."""
    from mmengine.registry import DefaultScope
    from mmpretrain.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        yield


def official(arch: str) -> dict:
    """What main.py derives from the yaml: lrs scaled by total batch / 512, EMA decay by / 4096."""
    name, dpr, batch, mesa, width = OFFICIAL[arch]
    total = batch * GPUS
    return dict(
        name=name,
        dpr=dpr,
        batch=batch,
        total=total,
        mesa=mesa,
        width=width,
        lr=BASE_LR * total / 512,
        warmup_lr=WARMUP_LR * total / 512,
        min_lr=MIN_LR * total / 512,
        ema_decay=MODEL_EMA_DECAY ** (total / 4096),
    )


def load(arch: str) -> Config:
    return Config.fromfile(str(ROOT / 'configs' / f'mlla_{arch}_in1k.py'))


def timm_cosine_lr(t: int, base: float, warmup_lr: float, min_lr: float, W: int, T: int) -> float:
    """timm's CosineLRScheduler._get_lr as the official lr_scheduler.py builds it."""
    if t < W:
        return warmup_lr + t * (base - warmup_lr) / W
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / T))


@pytest.mark.parametrize('arch', list(OFFICIAL))
def test_recipe_values_are_the_official_ones(arch):
    want = official(arch)
    cfg = load(arch)
    # Model.
    assert cfg.model.type == 'mlla_mm.MESAImageClassifier'
    bb = cfg.model.backbone
    assert (bb.type, bb.arch, bb.drop_path_rate) == ('mlla_mm.MLLA', want['name'], want['dpr'])
    assert bb.out_indices == (3,) and bb.get('map_cls_norm', True)  # classifier's norm -> norm3
    assert cfg.model.head.in_channels == want['width'] and cfg.model.head.num_classes == 1000
    assert cfg.model.head.loss == dict(
        type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'
    )
    # Batch: per GPU as the yaml, total for auto_scale_lr, incomplete last batch dropped.
    assert cfg.train_dataloader.batch_size == want['batch']
    assert cfg.auto_scale_lr.base_batch_size == want['total']
    assert cfg.train_dataloader.drop_last is True
    # Optimiser: AdamW at the scaled lr, AMP with a dynamic loss scale, clipping before the step.
    opt = cfg.optim_wrapper
    assert opt.type == 'AmpOptimWrapper' and 'loss_scale' not in opt
    from mmengine.optim import AmpOptimWrapper

    assert inspect.signature(AmpOptimWrapper).parameters['loss_scale'].default == 'dynamic'
    assert opt.optimizer.type == 'AdamW'
    assert opt.optimizer.lr == pytest.approx(want['lr'], rel=1e-12)
    assert opt.optimizer.weight_decay == WEIGHT_DECAY
    assert tuple(opt.optimizer.betas) == (0.9, 0.999) and opt.optimizer.eps == 1e-8
    assert opt.clip_grad == dict(max_norm=CLIP_GRAD)
    assert cfg.train_cfg.max_epochs == EPOCHS and cfg.train_cfg.val_interval == 1
    # EMA of every iteration, buffers too, with the batch-scaled decay; MESA from epoch 75.
    ema, mesa = cfg.custom_hooks
    assert ema.type == 'EMAHook' and ema.update_buffers is True
    assert 1 - ema.momentum == pytest.approx(want['ema_decay'], rel=1e-12)
    assert ema.get('begin_iter', 0) == 0 and ema.get('begin_epoch', 0) == 0
    from mmengine.registry import HOOKS

    hook = HOOKS.build(mesa)
    assert hook.ratio == want['mesa'] and hook.start_epoch(EPOCHS) == int(0.25 * EPOCHS) == 75
    # Augmentation: Mixup 0.8 / CutMix 1.0, RandAugment m9 mstd0.5, random erasing 0.25.
    augments = cfg.model.train_cfg.augments
    assert [(a.type, a.alpha) for a in augments] == [('Mixup', 0.8), ('CutMix', 1.0)]
    pipeline = {t.type: t for t in cfg.train_dataloader.dataset.pipeline}
    assert pipeline['RandomResizedCrop'].scale == 224
    assert pipeline['RandomResizedCrop'].interpolation == 'bicubic'
    ra = pipeline['RandAugment']
    assert (ra.policies, ra.num_policies, ra.magnitude_level, ra.magnitude_std) == (
        'timm_increasing',
        2,
        9,
        0.5,
    )
    assert pipeline['RandomErasing'].erase_prob == 0.25
    assert pipeline['RandomErasing'].mode == 'rand'
    test = {t.type: t for t in cfg.test_dataloader.dataset.pipeline}
    assert test['ResizeEdge'].scale == 256 and test['CenterCrop'].crop_size == 224
    assert cfg.randomness.seed == 0 and cfg.randomness.diff_rank_seed


@pytest.mark.parametrize('arch', list(OFFICIAL))
def test_lr_schedule_is_the_official_one_at_every_iteration(arch):
    """Built as the Runner builds it (end = max_epochs, 7 iterations per epoch)."""
    from mmengine.registry import PARAM_SCHEDULERS

    want = official(arch)
    cfg = load(arch)
    (sched_cfg,) = cfg.param_scheduler
    assert sched_cfg.convert_to_iter_based and sched_cfg.by_epoch
    n = 7
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.optim_wrapper.optimizer.lr)
    sched_cfg = dict(sched_cfg, end=cfg.train_cfg.max_epochs)
    sched = PARAM_SCHEDULERS.build(sched_cfg, default_args=dict(optimizer=opt, epoch_length=n))
    W, T = WARMUP_EPOCHS * n, EPOCHS * n
    for t in range(T):
        expected = timm_cosine_lr(t, want['lr'], want['warmup_lr'], want['min_lr'], W, T)
        assert opt.param_groups[0]['lr'] == pytest.approx(expected, rel=1e-9), t
        opt.step()
        sched.step()
    assert want['warmup_lr'] == pytest.approx(1e-6 if arch == 't' else 5e-7)
    assert want['min_lr'] == pytest.approx(1e-5 if arch == 't' else 5e-6)


def test_weight_decay_spares_exactly_the_official_parameters():
    """Official optimizer.py: no decay on 1-D parameters and names ending in '.bias'."""
    from mmengine.optim import build_optim_wrapper
    from mmpretrain.registry import MODELS

    cfg = load('t')
    cfg.model.backbone.arch = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    cfg.model.head.in_channels = 128
    cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = MODELS.build(cfg.model)
    cfg.optim_wrapper.type = 'OptimWrapper'  # AmpOptimWrapper needs a GPU; the groups are alike
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {
        names[id(p)]: g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']
    }
    assert set(decay) == set(names.values())
    no_decay = {n for n, wd in decay.items() if wd == 0}
    official_skip = {n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith('.bias')}
    assert no_decay == official_skip
    assert {wd for n, wd in decay.items() if n not in no_decay} == {WEIGHT_DECAY}
    assert 'backbone.layers.0.blocks.0.cpe1.weight' not in no_decay


@pytest.mark.parametrize('arch', list(OFFICIAL))
def test_cls_config_builds_and_trains_a_step(arch):
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample

    cfg = load(arch)
    cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)  # as the Runner does
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    data = {
        'inputs': [torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8) for _ in range(2)],
        'data_samples': [DataSample().set_gt_label(i) for i in (3, 7)],
    }
    data = model.data_preprocessor(data, training=True)
    loss, log_vars = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    assert torch.isfinite(loss) and set(log_vars) == {'loss', 'loss_cls'}
    assert model.backbone.layers[0].blocks[0].attn.qk.weight.grad is not None
