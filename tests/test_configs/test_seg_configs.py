"""The mmseg UperNet configs: the ADE20K recipe, a training step each, slide inference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mmengine.config import Config, ConfigDict

ROOT = Path(__file__).parents[2]
MAIN = {'t': 'upernet_mlla_t.py', 's': 'upernet_mlla_s.py', 'b': 'upernet_mlla_b.py'}
SHIPPED = [
    *MAIN.values(),
    *(f'upernet_mlla_{a}_slide.py' for a in MAIN),
    'toy/upernet_mlla_t_toy.py',
]
# A tiny MLLA (the real stages, one block each) keeps a step of each config at a second on a CPU.
TINY_ARCH = dict(embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
TINY_CHANNELS = [32, 64, 128, 256]


@pytest.fixture(scope='module', autouse=True)
def _mmseg():
    pytest.importorskip('mmseg')
    from mmseg.utils import register_all_modules

    import mlla_mm  # noqa: F401

    register_all_modules(init_default_scope=True)


def load(name: str, tiny: bool = True) -> Config:
    """Load a shipped config; ``tiny`` swaps in the tiny MLLA, random init and matching heads."""
    cfg = Config.fromfile(str(ROOT / 'configs' / name))
    if tiny:
        cfg.model.backbone.arch = TINY_ARCH
        cfg.model.backbone.init_cfg = None
        cfg.model.decode_head.in_channels = TINY_CHANNELS
        cfg.model.auxiliary_head.in_channels = TINY_CHANNELS[2]
    return cfg


def build(cfg: Config) -> torch.nn.Module:
    from mmseg.registry import MODELS

    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def seg_batch(sizes, num_classes: int, seed: int = 0) -> dict:
    """A raw batch as the dataloader gives it: uint8 images and ``SegDataSample`` labels."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for h, w in sizes:
        inputs.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        sample = SegDataSample(metainfo=dict(ori_shape=(h, w), img_shape=(h, w), pad_shape=(h, w)))
        labels = torch.randint(0, num_classes, (1, h, w), generator=g)
        labels[:, :3] = 255  # a few ignored pixels, as reduce_zero_label makes them
        sample.gt_sem_seg = PixelData(data=labels)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


# ------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'arch,dpr,channels', [('t', 0.2, 64), ('s', 0.3, 64), ('b', 0.5, 96)], ids=list(MAIN)
)
def test_ade20k_recipe(arch, dpr, channels):
    cfg = load(MAIN[arch], tiny=False)
    bb = cfg.model.backbone
    assert (bb.type, bb.arch, bb.drop_path_rate) == ('mlla_mm.MLLA', arch_name(arch), dpr)
    assert bb.out_indices == (0, 1, 2, 3)
    assert bb.init_cfg == dict(type='Pretrained', checkpoint=f'checkpoints/MLLA_{arch.upper()}.pth')
    assert 'pretrained' not in cfg.model or cfg.model.pretrained is None
    assert cfg.model.decode_head.in_channels == [channels * 2**i for i in range(4)]
    assert cfg.model.auxiliary_head.in_channels == channels * 4  # stage 3
    assert cfg.model.auxiliary_head.in_index == 2
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 150
    # 512x512 crops, 2 images per GPU x 8 GPUs, 160k iterations.
    assert cfg.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.train_cfg.type == 'IterBasedTrainLoop' and cfg.train_cfg.max_iters == 160000
    crop = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomCrop']
    assert crop[0].crop_size == (512, 512)
    # AdamW lr 6e-5, wd 0.01, linear warm-up over 1500 iterations, then poly decay to 0.
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.weight_decay, opt.betas) == ('AdamW', 6e-5, 0.01, (0.9, 0.999))
    assert cfg.optim_wrapper.paramwise_cfg == dict(custom_keys={'norm': dict(decay_mult=0.0)})
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.begin, warmup.end, warmup.by_epoch) == ('LinearLR', 0, 1500, False)
    assert (poly.type, poly.begin, poly.end, poly.power, poly.eta_min) == (
        'PolyLR',
        1500,
        160000,
        1.0,
        0.0,
    )
    # The official test: whole image resized to 2048x512; multi-scale + flip via --tta.
    assert cfg.model.test_cfg.mode == 'whole'
    resize = [t for t in cfg.test_dataloader.dataset.pipeline if t.type == 'Resize']
    assert resize[0].scale == (2048, 512) and resize[0].keep_ratio
    assert cfg.tta_model.type == 'SegTTAModel'
    aug = cfg.tta_pipeline[1].transforms
    assert len(aug[0]) == 6 and {t.prob for t in aug[1]} == {0.0, 1.0}  # 6 scales x 2 flips
    assert cfg.test_dataloader.dataset.type == 'ADE20KDataset'
    assert cfg.test_evaluator.type == 'IoUMetric'

    slide = load(f'upernet_mlla_{arch}_slide.py', tiny=False)
    assert slide.model.test_cfg == dict(mode='slide', crop_size=(512, 512), stride=(341, 341))
    slide.model.test_cfg = cfg.model.test_cfg
    assert slide.to_dict() == cfg.to_dict()


def arch_name(a: str) -> str:
    return {'t': 'tiny', 's': 'small', 'b': 'base'}[a]


def test_no_weight_decay_on_norms():
    """Every MLLA norm (LayerNorms, stem/merging BatchNorms, output norms) gets no decay."""
    from mmengine.optim import build_optim_wrapper

    cfg = load(MAIN['t'])
    model = build(cfg)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            decay[id(p)] = group['weight_decay']
    norms = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.LayerNorm,))}
    norms |= {n for n, m in model.backbone.named_modules() if 'BatchNorm' in type(m).__name__}
    for name, p in model.named_parameters():
        module = name.rsplit('.', 1)[0]
        in_backbone_norm = module.startswith('backbone.') and module[9:] in norms
        if module in norms or in_backbone_norm:
            assert decay[id(p)] == 0.0, name
        elif p.dim() > 1:
            assert decay[id(p)] == 0.01, name
    assert sum(d == 0.0 for d in decay.values()) > 20


# ------------------------------------------------------------------------------------------
# Every shipped config trains a step
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', SHIPPED)
def test_config_trains_a_step(name):
    cfg = load(name)
    cfg.model.data_preprocessor.size = (64, 96)  # pad the crops to this (512x512 in the configs)
    num_classes = cfg.model.decode_head.num_classes
    model = build(cfg)
    model.train()
    data = model.data_preprocessor(seg_batch([(61, 93), (64, 80)], num_classes), training=True)
    assert data['inputs'].shape == (2, 3, 64, 96)
    losses = model(**data, mode='loss')
    assert {'decode.loss_ce', 'aux.loss_ce'} <= set(losses)
    loss, _ = model.parse_losses(losses)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for module in (
        model.backbone.patch_embed,
        model.backbone.layers[3],
        model.backbone.norm0,
        model.decode_head.conv_seg,
        model.auxiliary_head.conv_seg,
    ):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), module
        assert any(g.abs().sum() > 0 for g in grads), module


# ------------------------------------------------------------------------------------------
# Sliding-window inference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', list(MAIN))
def test_slide_inference_gives_full_size_logits(arch):
    """A 100x150 image in 64x64 windows with stride 43 (2 x 3 windows): full-size logits."""
    cfg = load(f'upernet_mlla_{arch}_slide.py')
    cfg.model.test_cfg.crop_size, cfg.model.test_cfg.stride = (64, 64), (43, 43)
    cfg.model.decode_head.num_classes = cfg.model.auxiliary_head.num_classes = 5
    model = build(cfg).eval()
    windows = []
    model.backbone.register_forward_hook(lambda m, args, out: windows.append(args[0].shape[-2:]))
    with torch.no_grad():
        (out,) = model.test_step(seg_batch([(100, 150)], 5))
    assert windows == [(64, 64)] * 6
    assert out.seg_logits.data.shape == (5, 100, 150)
    assert out.pred_sem_seg.data.shape == (1, 100, 150)
    assert torch.isfinite(out.seg_logits.data).all()
    assert torch.equal(out.pred_sem_seg.data[0], out.seg_logits.data.argmax(0))


def test_slide_window_as_large_as_the_image_equals_whole_inference():
    cfg = load('upernet_mlla_t_slide.py')
    cfg.model.test_cfg.crop_size, cfg.model.test_cfg.stride = (80, 112), (53, 75)
    model = build(cfg).eval()
    data = seg_batch([(77, 109)], 150)
    with torch.no_grad():
        (slide,) = model.test_step(data)
        model.test_cfg = ConfigDict(mode='whole')
        (whole,) = model.test_step(data)
    assert slide.seg_logits.data.shape == (150, 77, 109)
    torch.testing.assert_close(slide.seg_logits.data, whole.seg_logits.data)
