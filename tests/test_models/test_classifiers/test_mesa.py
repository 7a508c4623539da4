"""MESA: the loss term against the official formula, the hook's schedule, a toy training run."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip('mmpretrain')

from mmengine.config import Config  # noqa: E402
from mmengine.hooks import EMAHook, Hook  # noqa: E402
from mmengine.model import ExponentialMovingAverage  # noqa: E402
from mmengine.registry import HOOKS  # noqa: E402
from mmpretrain.models import ImageClassifier  # noqa: E402
from mmpretrain.registry import MODELS  # noqa: E402
from mmpretrain.structures import DataSample  # noqa: E402

from mlla_mm.engine import MESAHook, MESAImageClassifier, mesa_loss  # noqa: E402

ROOT = Path(__file__).parents[3]
TINY_ARCH = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def _mmpretrain_scope():
    """mmpretrain's registries as the default scope for each test, then the previous one."""
    from mmengine.registry import DefaultScope
    from mmpretrain.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        yield


def tiny_classifier() -> MESAImageClassifier:
    """The classification config's model with a tiny MLLA and no drop path (deterministic)."""
    torch.manual_seed(0)
    model = MODELS.build(
        dict(
            type='mlla_mm.MESAImageClassifier',
            backbone=dict(type='mlla_mm.MLLA', arch=TINY_ARCH, drop_path_rate=0.0, out_indices=3),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(
                type='LinearClsHead',
                num_classes=NUM_CLASSES,
                in_channels=128,
                loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
            ),
            data_preprocessor=dict(
                type='ClsDataPreprocessor',
                num_classes=NUM_CLASSES,
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                to_rgb=True,
                batch_augments=dict(
                    augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]
                ),
            ),
        )
    )
    model.init_weights()
    return model


def mixed_batch(model, seed: int = 0) -> dict:
    """Three uint8 images through the data preprocessor in training mode (Mixup/CutMix)."""
    g = torch.Generator().manual_seed(seed)
    data = {
        'inputs': [
            torch.randint(0, 256, (3, 40, 56), generator=g, dtype=torch.uint8) for _ in range(3)
        ],
        'data_samples': [DataSample().set_gt_label(i) for i in (0, 3, 4)],
    }
    torch.manual_seed(seed)  # the Mixup/CutMix draw
    return model.data_preprocessor(data, training=True)


def test_mesa_loss_is_the_soft_target_cross_entropy():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    s, t = student.double().numpy(), teacher.double().numpy()
    p = np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    log_q = s - np.log(np.exp(s).sum(-1, keepdims=True))
    want = 1.5 * np.mean(np.sum(-p * log_q, axis=-1))
    got = mesa_loss(student, teacher, 1.5)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # Cross-entropy, not KL: it does not vanish when the student equals the teacher.
    assert mesa_loss(teacher, teacher, 1.0) > 0.5


def test_classifier_adds_the_term_only_with_a_teacher():
    model = tiny_classifier().train()
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a teacher that disagrees with the student
        teacher.head.fc.weight.add_(torch.randn_like(teacher.head.fc.weight))
    data = mixed_batch(model)
    inputs, samples = data['inputs'], data['data_samples']
    assert samples[0].gt_score.shape == (NUM_CLASSES,)  # mixed soft targets

    plain = model.loss(inputs, samples)
    assert set(plain) == {'loss_cls'} and model.mesa_ratio == 0.0
    # Without a teacher it is mmpretrain's ImageClassifier loss.
    reference = ImageClassifier.loss(model, inputs, samples)['loss']
    torch.testing.assert_close(plain['loss_cls'], reference)

    seen = []
    teacher.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.set_mesa(teacher, 1.5)
    assert not teacher.training and model.mesa_ratio == 1.5
    losses = model.loss(inputs, samples)
    assert set(losses) == {'loss_cls', 'loss_mesa'}
    # The label term is unchanged; the teacher saw the same (mixed) inputs as the student.
    torch.testing.assert_close(losses['loss_cls'], plain['loss_cls'])
    assert len(seen) == 1 and torch.equal(seen[0], inputs)

    # The official formula, computed here from the two models' logits.
    with torch.no_grad():
        s = model(inputs, mode='tensor').double()
        t = teacher(inputs, mode='tensor').double()
    p = torch.exp(t) / torch.exp(t).sum(-1, keepdim=True)
    log_q = s - torch.log(torch.exp(s).sum(-1, keepdim=True))
    want = 1.5 * (-(p * log_q).sum(-1)).mean()
    assert losses['loss_mesa'].item() == pytest.approx(want.item(), rel=1e-5)

    # The gradient reaches the student only; the teacher stays out of the state dict.
    (losses['loss_cls'] + losses['loss_mesa']).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.backbone.layers[0].blocks[0].attn.qk.weight.grad is not None
    assert set(model.state_dict()) == set(teacher.state_dict())

    model.set_mesa(None)
    assert set(model.loss(inputs, samples)) == {'loss_cls'}


def test_hook_starts_at_a_quarter_of_the_epochs_by_default():
    hook = HOOKS.build(dict(type='mlla_mm.MESAHook', ratio=1.0))
    assert isinstance(hook, MESAHook)
    assert hook.start_epoch(300) == 75 and hook.start_epoch(10) == 2
    assert MESAHook(ratio=2.0, begin_epoch=3).start_epoch(300) == 3
    with pytest.raises(ValueError, match='ratio must be >= 0'):
        MESAHook(ratio=-1.0)


def test_hook_switches_at_the_start_epoch_and_the_documented_option_turns_it_off():
    cfg = Config.fromfile(str(ROOT / 'configs' / 'mlla_t_in1k.py'))
    hook = HOOKS.build(cfg.custom_hooks[1])
    model = tiny_classifier()
    hook._teacher = copy.deepcopy(model)
    runner = types.SimpleNamespace(model=model, epoch=74, max_epochs=300)
    hook.before_train_epoch(runner)
    assert model.mesa_ratio == 0.0
    runner.epoch = 75
    hook.before_train_epoch(runner)
    assert model.mesa_ratio == 1.0 and model._mesa[0] is hook._teacher
    hook.after_train(runner)
    assert model.mesa_ratio == 0.0
    # docs/recipes.md: --cfg-options custom_hooks.1.ratio=0 keeps the EMA and drops MESA.
    cfg.merge_from_dict({'custom_hooks.1.ratio': 0})
    off = HOOKS.build(cfg.custom_hooks[1])
    off._teacher = hook._teacher
    off.before_train_epoch(runner)
    assert model.mesa_ratio == 0.0 and cfg.custom_hooks[0].type == 'EMAHook'


def test_hook_explains_what_it_needs():
    model = tiny_classifier()
    runner = types.SimpleNamespace(model=torch.nn.Linear(2, 2), hooks=[], max_epochs=4)
    with pytest.raises(TypeError, match='MESAImageClassifier'):
        MESAHook(ratio=1.0).before_train(runner)
    runner.model = model
    with pytest.raises(RuntimeError, match='EMAHook'):
        MESAHook(ratio=1.0).before_train(runner)
    ema = EMAHook()
    ema.ema_model = ExponentialMovingAverage(model, momentum=1e-4, update_buffers=False)
    runner.hooks = [ema]
    with pytest.raises(ValueError, match='update_buffers=True'):
        MESAHook(ratio=1.0).before_train(runner)


class _RecordLosses(Hook):
    """Keeps the logged loss names and values of every training iteration."""

    def __init__(self) -> None:
        self.seen = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.seen.append((runner.epoch, {k: float(v) for k, v in outputs.items()}))


def _toy_image_folder(root: Path) -> None:
    """Two classes of four 36x44 PNG images each, in mmpretrain's CustomDataset layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(('cat', 'dog')):
        (root / name).mkdir(parents=True)
        for i in range(4):
            img = rng.integers(0, 128, (36, 44, 3), dtype=np.uint8) + 100 * c
            Image.fromarray(img.astype(np.uint8)).save(root / name / f'{i}.png')


def test_mesa_trains_through_the_runner(tmp_path):
    """The shipped MLLA-T config, shrunk: MESA is off in epoch 0, on (and logged) in epoch 1."""
    from mmengine.runner import Runner

    _toy_image_folder(tmp_path / 'train')
    cfg = Config.fromfile(str(ROOT / 'configs' / 'mlla_t_in1k.py'))
    cfg.work_dir = str(tmp_path / 'work')
    cfg.model.backbone.arch = TINY_ARCH
    cfg.model.head.in_channels = 128
    cfg.model.head.num_classes = 2
    cfg.data_preprocessor.num_classes = 2
    cfg.train_dataloader = dict(
        batch_size=4,
        num_workers=0,
        drop_last=True,
        sampler=dict(type='DefaultSampler', shuffle=True),
        dataset=dict(
            type='CustomDataset',
            data_root=str(tmp_path / 'train'),
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='RandomResizedCrop', scale=32, backend='pillow'),
                dict(type='PackInputs'),
            ],
        ),
    )
    for key in ('val_dataloader', 'val_evaluator', 'val_cfg'):
        cfg[key] = None
    for key in ('test_dataloader', 'test_evaluator', 'test_cfg'):
        cfg[key] = None
    cfg.train_cfg = dict(by_epoch=True, max_epochs=2)
    cfg.optim_wrapper.type = 'OptimWrapper'  # AmpOptimWrapper needs a GPU
    cfg.param_scheduler[0].warmup = 1
    assert cfg.custom_hooks[1].type == 'mlla_mm.MESAHook'
    cfg.custom_hooks[1].begin_epoch = 1
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2)
    cfg.env_cfg.cudnn_benchmark = False

    runner = Runner.from_cfg(cfg)
    record = _RecordLosses()
    runner.register_hook(record, priority='LOWEST')
    runner.train()

    assert [epoch for epoch, _ in record.seen] == [0, 0, 1, 1]
    for epoch, losses in record.seen:
        assert ('loss_mesa' in losses) == (epoch >= 1), (epoch, losses)
    on = [losses for epoch, losses in record.seen if epoch == 1]
    assert all(np.isfinite(x['loss_mesa']) and x['loss_mesa'] > 0 for x in on)
    # The logged 'loss' is the optimised total.
    assert all(x['loss'] == pytest.approx(x['loss_cls'] + x['loss_mesa']) for x in on)
    logs = list((tmp_path / 'work').rglob('*.log'))
    assert logs and 'loss_mesa' in logs[0].read_text()
    assert runner.model.mesa_ratio == 0.0  # detached after training
    ckpt = torch.load(tmp_path / 'work' / 'epoch_2.pth', map_location='cpu', weights_only=False)
    assert 'ema_state_dict' in ckpt and not any('teacher' in k for k in ckpt['state_dict'])
