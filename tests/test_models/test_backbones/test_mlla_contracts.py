"""The backbone contracts of mmengine / mmdet / mmseg / timm that peer test suites hold MLLA to:
every ``init_cfg`` form, caches under ``torch.inference_mode``, pure half/bf16 weights,
checkpoints of another variant, the deprecated ``pretrained=``, corrupt checkpoint files."""

import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.runner import load_checkpoint

from mlla_mm import MLLA, CheckpointFileError
from mlla_mm.testing import TINY_ARCH, fake_official_state_dict, rel_err

TINY = TINY_ARCH


def save_tiny(path: Path, shift: float = 0.5) -> dict:
    sd = {
        k: v + shift if v.is_floating_point() else v
        for k, v in MLLA(arch=TINY).state_dict().items()
    }
    torch.save(sd, path)
    return sd


# ---------------------------------------------------------------------------------------------
# init_cfg: every mmengine form
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'init_cfg',
    [
        dict(type='Pretrained', checkpoint='nope.pth'),
        [dict(type='Pretrained', checkpoint='nope.pth')],
        [
            dict(type='Constant', val=0.1, layer='Conv2d'),
            dict(type='Pretrained', checkpoint='nope.pth'),
        ],
        dict(type='Pretrained', checkpoint='nope.pth', prefix='backbone.'),
    ],
)
def test_missing_pretrained_checkpoint_fails_in_every_form(init_cfg):
    model = MLLA(arch=TINY, init_cfg=init_cfg)
    with pytest.raises(FileNotFoundError, match="'nope.pth' does not exist"):
        model.init_weights()


@pytest.mark.parametrize('as_list', [False, True])
def test_constant_init_cfg_is_applied(as_list):
    cfg = dict(type='Constant', val=0.1, bias=0.0, layer='Conv2d')
    model = MLLA(arch=TINY, init_cfg=[cfg] if as_list else cfg)
    model.init_weights()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) > 20  # stem, patch merging, cpe1/cpe2/dwc/lepe of every block
    for m in convs:
        assert torch.all(m.weight == 0.1)
        assert m.bias is None or torch.all(m.bias == 0)
    # layers not named by the init_cfg get the official initialisation
    linear = model.layers[2].blocks[0].mlp.fc1
    assert linear.weight.std().item() == pytest.approx(0.02, rel=0.2) and torch.all(
        linear.bias == 0
    )


def test_kaiming_init_cfg_changes_the_named_layers():
    torch.manual_seed(0)
    default = MLLA(arch=TINY)
    default.init_weights()
    torch.manual_seed(0)
    kaiming = MLLA(arch=TINY, init_cfg=dict(type='Kaiming', layer='Linear', distribution='normal'))
    kaiming.init_weights()
    w_default = default.layers[2].blocks[0].mlp.fc1.weight
    w_kaiming = kaiming.layers[2].blocks[0].mlp.fc1.weight
    assert w_default.std().item() == pytest.approx(0.02, rel=0.2)  # truncated normal, std 0.02
    # Kaiming normal (fan_out of a 128 x 512 layer, ReLU gain): std sqrt(2 / 512) = 0.0625
    assert w_kaiming.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.2)


def test_pretrained_is_applied_after_other_initialisers(tmp_path):
    path = tmp_path / 'w.pth'
    sd = save_tiny(path)
    model = MLLA(
        arch=TINY,
        init_cfg=[
            dict(type='Pretrained', checkpoint=str(path)),
            dict(type='Constant', val=0.1, layer='Conv2d'),
        ],
    )
    model.init_weights()
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_init_weights_twice_keeps_the_weights(tmp_path):
    path = tmp_path / 'w.pth'
    sd = save_tiny(path)
    model = MLLA(arch=TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    model.init_weights()  # mmengine warns and does nothing, as for any BaseModule
    assert torch.equal(model.norm3.weight, sd['norm3.weight'])


# ---------------------------------------------------------------------------------------------
# Caches: inference mode, no_grad, autograd, threads
# ---------------------------------------------------------------------------------------------
def test_inference_mode_does_not_poison_the_rope_cache():
    x = torch.randn(1, 3, 44, 60)
    first = MLLA(arch=TINY, drop_path_rate=0.0).eval()
    with torch.inference_mode():
        first(x)
    for model in (first, MLLA(arch=TINY, drop_path_rate=0.0)):  # this and any other instance
        model.train()
        outs = model(x)
        sum(o.sum() for o in outs).backward()
        assert model.layers[0].blocks[0].attn.qk.weight.grad is not None
        with torch.no_grad():
            model(x)
        with torch.inference_mode():
            model.eval()(x)


def test_threads_share_the_caches_safely():
    model = MLLA(arch=TINY, drop_path_rate=0.0).eval()
    sizes = [(36 + 8 * i, 52 + 4 * i) for i in range(6)]
    inputs = [
        torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(i))
        for i, (h, w) in enumerate(sizes)
    ]
    with torch.no_grad():
        expected = [model(x)[-1] for x in inputs]
    from mlla_mm.models.backbones import mlla as module

    module._ROPE_CACHE.clear()
    results, errors = {}, []

    def run(i):
        try:
            with torch.inference_mode() if i % 2 else torch.no_grad():
                results[i] = model(inputs[i])[-1].clone()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, exp in enumerate(expected):
        assert torch.equal(results[i], exp)


# ---------------------------------------------------------------------------------------------
# Pure half / bf16 weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dtype,tol', [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_and_bf16_models_match_float32(dtype, tol):
    torch.manual_seed(0)
    model = MLLA(arch=TINY, drop_path_rate=0.0)
    model.init_weights()
    model.eval()
    x = torch.randn(2, 3, 61, 83)
    with torch.no_grad():
        ref = model(x)
        half = model.to(dtype)
        outs = half(x.to(dtype))
        outs_from_float = half(x)  # an mmengine data preprocessor hands over float32 images
    for o, r, f in zip(outs, ref, outs_from_float):
        assert o.dtype == dtype and torch.isfinite(o).all()
        assert rel_err(o, r) <= tol
        assert torch.equal(o, f)


def test_bf16_model_trains(monkeypatch):
    torch.manual_seed(0)
    model = MLLA(arch=TINY, drop_path_rate=0.1).to(torch.bfloat16).train()
    seen = []
    from mlla_mm.models.backbones import mlla as module

    original = module.linear_attention
    monkeypatch.setattr(
        module, 'linear_attention', lambda q, k, *a: seen.append(q.dtype) or original(q, k, *a)
    )
    outs = model(torch.randn(2, 3, 40, 56, dtype=torch.bfloat16))
    loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    assert seen and set(seen) == {torch.float32}  # the attention core runs in float32
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(
        g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints of another variant with the same widths (T vs S)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'src,arch,extra,missing,fits',
    [
        ('cls_small', 'tiny', 'extra blocks: layers.0.blocks.2', None, "arch='small'"),
        ('downstream_tiny', 'small', None, 'missing blocks: layers.0.blocks.2', "arch='tiny'"),
    ],
)
def test_checkpoint_with_other_blocks_is_rejected(
    layouts, tmp_path, src, arch, extra, missing, fits
):
    path = tmp_path / 'other.pth'
    sd = fake_official_state_dict(layouts[src])
    torch.save({'model': sd} if src.startswith('cls') else sd, path)
    model = MLLA(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match=fits) as info:
        model.init_weights()
    assert (extra or missing) in str(info.value)
    # the same through deploy's loader (tools/deployment/export_onnx.py --checkpoint)
    from mlla_mm.deploy import load_backbone_weights

    with pytest.raises(ValueError, match=fits):
        load_backbone_weights(MLLA(arch=arch), str(path))


def test_checkpoint_tolerances_are_kept(layouts, tmp_path):
    """RoPE buffers dropped, a classifier head and missing norm0..2 only reported, output norms
    of stages that are not returned only reported."""
    path = tmp_path / 'cls.pth'
    torch.save({'model': fake_official_state_dict(layouts['cls_tiny'])}, path)
    MLLA(arch='tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()
    down = tmp_path / 'down.pth'
    torch.save(fake_official_state_dict(layouts['downstream_tiny']), down)
    model = MLLA(
        arch='tiny', out_indices=(3,), init_cfg=dict(type='Pretrained', checkpoint=str(down))
    )
    model.init_weights()


@pytest.mark.parametrize('map_cls_norm', [True, False])
def test_map_cls_norm(layouts, tmp_path, map_cls_norm):
    path = tmp_path / 'cls.pth'
    sd = fake_official_state_dict(layouts['cls_tiny'])
    torch.save({'model': sd}, path)
    model = MLLA(
        arch='tiny',
        map_cls_norm=map_cls_norm,
        init_cfg=dict(type='Pretrained', checkpoint=str(path)),
    )
    model.init_weights()
    if map_cls_norm:
        assert torch.equal(model.norm3.weight, sd['norm.weight'])
    else:  # the official downstream start: norm3 as initialised (LayerNorm 1 / 0)
        assert torch.all(model.norm3.weight == 1) and torch.all(model.norm3.bias == 0)
    assert torch.equal(
        model.layers[3].blocks[3].mlp.fc2.weight, sd['layers.3.blocks.3.mlp.fc2.weight']
    )


# ---------------------------------------------------------------------------------------------
# Deprecated pretrained=
# ---------------------------------------------------------------------------------------------
def test_deprecated_pretrained_argument(tmp_path):
    path = tmp_path / 'w.pth'
    sd = save_tiny(path)
    with pytest.warns(DeprecationWarning, match='pretrained= is deprecated'):
        model = MLLA(arch=TINY, pretrained=str(path))
    model.init_weights()
    assert torch.equal(model.norm0.weight, sd['norm0.weight'])
    with pytest.raises(ValueError, match='both pretrained= and init_cfg='):
        MLLA(arch=TINY, pretrained=str(path), init_cfg=dict(type='Pretrained', checkpoint='x'))


def test_segmentor_level_pretrained(tmp_path):
    """mmseg's EncoderDecoder passes its ``pretrained=`` down to the backbone."""
    pytest.importorskip('mmseg')
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS as SEG_MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)  # leave the default scope to other tests
    path = tmp_path / 'w.pth'
    sd = save_tiny(path)
    cfg = Config.fromfile(Path(__file__).parents[3] / 'configs' / 'toy' / 'upernet_mlla_t_toy.py')
    cfg.model.backbone.arch = TINY
    cfg.model.decode_head.in_channels = [32, 64, 128, 256]
    cfg.model.auxiliary_head.in_channels = 128
    cfg.model.pretrained = str(path)
    with warnings.catch_warnings(), DefaultScope.overwrite_default_scope('mmseg'):
        warnings.simplefilter('ignore', DeprecationWarning)
        segmentor = SEG_MODELS.build(cfg.model)
    segmentor.init_weights()
    assert torch.equal(segmentor.backbone.norm2.weight, sd['norm2.weight'])


# ---------------------------------------------------------------------------------------------
# Truncated and corrupt files: one clear message wherever they are loaded
# ---------------------------------------------------------------------------------------------
def _damaged(tmp_path, how: str) -> Path:
    path = tmp_path / f'{how}.pth'
    save_tiny(path)
    data = bytearray(path.read_bytes())
    if how == 'truncated':
        data = data[: len(data) // 2]
    elif how == 'corrupt':
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(64)  # zeroed bytes inside a tensor's record
    elif how == 'legacy_truncated':
        torch.save(MLLA(arch=TINY).state_dict(), path, _use_new_zipfile_serialization=False)
        data = bytearray(path.read_bytes())[:5000]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize('how', ['truncated', 'corrupt', 'legacy_truncated'])
def test_damaged_checkpoint_gives_one_clear_message(tmp_path, how):
    from mlla_mm.convert import load_official

    path = _damaged(tmp_path, how)
    pattern = rf"{how}\.pth' is corrupt or truncated"
    loaders = [
        lambda: MLLA(
            arch=TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path))
        ).init_weights(),
        lambda: load_checkpoint(MLLA(arch=TINY), str(path)),
        lambda: load_official(path),
    ]
    if how == 'legacy_truncated':
        loaders = loaders[1:]  # the backbone's pre-check cannot see inside a legacy pickle
    for load in loaders:
        with pytest.raises(CheckpointFileError, match=pattern):
            load()


def test_not_a_checkpoint_and_empty_file(tmp_path):
    text = tmp_path / 'notes.pth'
    text.write_text('these are not weights')
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(CheckpointFileError, match='is not a PyTorch checkpoint'):
        load_checkpoint(MLLA(arch=TINY), str(text))
    with pytest.raises(CheckpointFileError, match='corrupt or truncated.*empty'):
        load_checkpoint(MLLA(arch=TINY), str(empty))


def test_init_weights_alone_does_not_flood_the_console(tmp_path):
    """mmengine logs each parameter's initialisation; without a log file that went to the console
    (3,000 lines for MLLA-T). It goes to the log file only."""
    import subprocess
    import sys

    path = tmp_path / 'w.pth'
    save_tiny(path)
    code = (
        'import sys, mlla_mm; '
        f'm = mlla_mm.MLLA(arch={TINY!r}, '
        'init_cfg=dict(type="Pretrained", checkpoint=sys.argv[1])); '
        'm.init_weights(); mlla_mm.MLLA(arch="tiny").init_weights()'
    )
    out = subprocess.run([sys.executable, '-c', code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).splitlines()
    assert len(lines) < 10, lines[:20]
