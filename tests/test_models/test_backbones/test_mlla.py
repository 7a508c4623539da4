"""Tests of ``mlla_mm.MLLA``: shapes, numerics against the plain transcription, RoPE, options,
mixed precision, checkpoints and bad input."""

import collections
import math

import pytest
import torch
import torch.nn as nn

from mlla_mm import MLLA, MODELS
from mlla_mm.models.backbones import fast_path
from mlla_mm.models.backbones.mlla import _ROPE_CACHE, apply_rope, rope_tables
from mlla_mm.testing import (
    TINY_ARCH,
    PlainMLLA,
    fake_official_state_dict,
    randomise_bn,
    rel_err,
)

TINY = TINY_ARCH


def tiny_pair(**kwargs):
    torch.manual_seed(0)
    model = MLLA(arch=TINY, drop_path_rate=0.0, **kwargs)
    model.init_weights()
    randomise_bn(model)
    ref = PlainMLLA(**TINY, out_indices=model.out_indices)
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


# ---------------------------------------------------------------------------------------------
# Variants and shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch,dims', [('t', 64), ('small', 64), ('b', 96)])
def test_variants_shapes(arch, dims):
    model = MLLA(arch=arch).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 67, 93))
    assert [tuple(o.shape) for o in outs] == [
        (1, dims * 2**i, math.ceil(67 / 2 ** (i + 2)), math.ceil(93 / 2 ** (i + 2)))
        for i in range(4)
    ]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_state_dict_is_the_official_downstream_layout(layouts, arch):
    own = {k: list(v.shape) for k, v in MLLA(arch=arch).state_dict().items()}
    official = {k: v for k, v in layouts[f'downstream_{arch}'].items() if 'rope' not in k}
    assert own == official


def test_official_variant_sizes():
    counts = {a: sum(p.numel() for p in MLLA(arch=a).parameters()) / 1e6 for a in 'tsb'}
    # The paper's classifiers: 25M, 43M, 96M parameters with the 1000-class head (which adds
    # 0.51M/0.51M/0.77M); the backbone adds norm0..norm2 (0.9k-1.3k parameters).
    assert counts['t'] == pytest.approx(23.88, abs=0.01)
    assert counts['s'] == pytest.approx(42.50, abs=0.01)
    assert counts['b'] == pytest.approx(95.22, abs=0.01)


def test_unknown_arch_lists_valid_names():
    with pytest.raises(KeyError, match=r"'b', 'base', 's', 'small', 't', 'tiny'"):
        MLLA(arch='huge')
    with pytest.raises(KeyError, match='num_heads'):
        MLLA(arch=dict(embed_dims=32, depths=(1, 1, 1, 1)))


def test_registry_builds_from_any_scope():
    from mmengine.registry import MODELS as ROOT

    model = ROOT.build(dict(type='mlla_mm.MLLA', arch=TINY, out_indices=(1, 3)))
    assert isinstance(model, MLLA)
    assert MODELS.get('MLLA') is MLLA
    outs = model(torch.randn(2, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 256]
    assert hasattr(model, 'norm1') and not hasattr(model, 'norm0')


# ---------------------------------------------------------------------------------------------
# Numerics
# ---------------------------------------------------------------------------------------------
def official_rope_complex(x: torch.Tensor) -> torch.Tensor:
    """The official classification RoPE, with complex numbers, for a (B, H, W, C) tensor."""
    h, w, c = x.shape[1:]
    k_max = c // 4
    theta = 1 / (10000 ** (torch.arange(k_max) / k_max))
    grid = torch.meshgrid([torch.arange(h), torch.arange(w)], indexing='ij')
    angles = torch.cat([t.unsqueeze(-1) * theta for t in grid], dim=-1)
    rot = torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(rot * torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))).flatten(
        -2
    )


@pytest.mark.parametrize('hw', [(7, 11), (14, 14), (1, 5)])
def test_rope_matches_official_complex_formulation(hw):
    x = torch.randn(2, *hw, 32)
    cos, sin = rope_tables(*hw, 32, x.device, x.dtype)
    assert rel_err(apply_rope(x, cos, sin), official_rope_complex(x)) < 1e-6


def test_rope_cache_is_keyed_and_not_in_state_dict():
    _ROPE_CACHE.clear()
    a = rope_tables(5, 7, 64, 'cpu', torch.float32)
    assert rope_tables(5, 7, 64, torch.device('cpu'), torch.float32) is a
    b = rope_tables(5, 7, 64, 'cpu', torch.float64)
    c = rope_tables(7, 5, 64, 'cpu', torch.float32)
    assert b[0].dtype == torch.float64 and c[0].shape == (7, 5, 32) and len(_ROPE_CACHE) == 3
    assert not any('rope' in k for k in MLLA(arch=TINY).state_dict())


def test_fast_path_elu_plus_one_in_place():
    """The fast path's ``exp(min(x, 0)) + max(x, 0)`` equals ``ELU(x) + 1``, in place, chunk by
    chunk (and converting bf16 chunks into a float32 output)."""
    specials = torch.tensor([0.0, -0.0, -100.0, 100.0, 1e-8, -1e-8])
    x = torch.cat([torch.randn(2**19 + 1000) * 4, specials])  # several in-place chunks
    expected = torch.nn.functional.elu(x) + 1.0
    with torch.no_grad():
        y = x.clone()
        assert fast_path.elu_plus_one_(y, y) is y
        converted = fast_path.elu_plus_one_(x.bfloat16(), torch.empty_like(x))
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        converted, torch.nn.functional.elu(x.bfloat16().float()) + 1, rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize('hw', [(67, 93), (64, 64), (97, 131), (35, 200)])
def test_matches_plain_transcription_eval(hw):
    model, ref = tiny_pair()
    model.eval(), ref.eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        outs, refs = model(x), ref(x)
    assert len(outs) == 4
    for o, r in zip(outs, refs):
        assert o.shape == r.shape
        assert rel_err(o, r) <= 1e-5


def test_matches_plain_transcription_training_with_gradients():
    """Training outputs, every parameter's gradient and the BatchNorm statistics equal the plain
    transcription's."""
    model, ref = tiny_pair()
    model.train(), ref.train()
    x = torch.randn(2, 3, 45, 61)
    loss = sum((o * torch.linspace(0, 1, o.numel()).view_as(o)).sum() for o in model(x))
    loss_ref = sum((o * torch.linspace(0, 1, o.numel()).view_as(o)).sum() for o in ref(x))
    loss.backward(), loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    grads_ref = {name: p.grad for name, p in ref.named_parameters()}
    scale = torch.stack([g.norm() for g in grads_ref.values()]).median()
    for name, p in model.named_parameters():
        if name.endswith('downsample.conv.2.conv.bias'):
            # A conv bias right before a training-mode BatchNorm has an exactly zero gradient in
            # real arithmetic: both sides must be round-off on the scale of the typical gradient.
            assert p.grad.norm() <= 1e-4 * scale and grads_ref[name].norm() <= 1e-4 * scale
            continue
        err = (p.grad - grads_ref[name]).norm()
        assert err <= 1e-4 * grads_ref[name].norm() + 1e-6 * scale, name
    # BatchNorm statistics were updated identically in training mode.
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.allclose(b.float(), b_ref.float(), rtol=1e-5, atol=1e-6), name


def test_with_cp_same_output_gradients_and_batchnorm_statistics():
    """with_cp checkpoints the blocks, the stem and the patch mergings (each runs twice per
    step); outputs, gradients and the BatchNorm running statistics (updated once, not again by
    the recomputation) equal those without it."""
    torch.manual_seed(0)
    model = MLLA(arch=TINY, drop_path_rate=0.0)
    model_cp = MLLA(arch=TINY, drop_path_rate=0.0, with_cp=True)
    model_cp.load_state_dict(model.state_dict())
    calls = collections.Counter()
    for name in ('patch_embed', 'layers.0.downsample', 'layers.1.blocks.0'):
        model_cp.get_submodule(name).register_forward_pre_hook(lambda *_, n=name: calls.update([n]))
    x = torch.randn(2, 3, 50, 70)
    outs, outs_cp = model(x), model_cp(x)
    sum(o.square().mean() for o in outs).backward()
    sum(o.square().mean() for o in outs_cp).backward()
    assert set(calls.values()) == {2}, calls
    # the hooked block takes the module forward (the reference attention ops), the others the
    # training unit (the fused C core where built): the same sums, rounded in another order
    for o, o_cp in zip(outs, outs_cp):
        assert (o - o_cp).abs().max() <= 1e-5 * o.abs().max()
    for (name, p), p_cp in zip(model.named_parameters(), model_cp.parameters()):
        assert torch.allclose(p.grad, p_cp.grad, rtol=1e-4, atol=1e-7), name
    for (name, b), b_cp in zip(model.named_buffers(), model_cp.buffers()):
        # counters exactly; statistics to rounding (a second update would move them ~10 %)
        torch.testing.assert_close(b, b_cp, rtol=1e-4, atol=1e-7, msg=name)
    assert model_cp.patch_embed.conv1.norm.num_batches_tracked.item() == 1


def test_drop_path_only_in_training():
    model = MLLA(arch=TINY, drop_path_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a, b = model(x)[-1], model(x)[-1]
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = model(x)[-1]
    torch.manual_seed(1)
    d = model(x)[-1]
    assert not torch.allclose(c, d)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('frozen', [0, 1, 3])
def test_frozen_stages(frozen):
    model = MLLA(arch=TINY, frozen_stages=frozen)
    model.train()
    frozen_mods = [model.patch_embed] + [model.layers[i] for i in range(frozen)]
    frozen_mods += [getattr(model, f'norm{i}') for i in range(frozen)]
    for m in frozen_mods:
        assert not any(p.requires_grad for p in m.parameters())
        assert not any(sub.training for sub in m.modules())
    for i in range(frozen, 4):
        assert all(p.requires_grad for p in model.layers[i].parameters())
        assert model.layers[i].training
    # A training step leaves the frozen BatchNorm statistics untouched.
    before = model.patch_embed.conv1.norm.running_mean.clone()
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
    assert torch.equal(before, model.patch_embed.conv1.norm.running_mean)
    assert all(p.grad is None for p in model.patch_embed.parameters())


def test_norm_eval():
    model = MLLA(arch=TINY, norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.layers[0].blocks[0].training


def test_get_layer_depth_with_mmpretrain_lr_decay():
    pytest.importorskip('mmpretrain')
    from mmpretrain.engine.optimizers import LearningRateDecayOptimWrapperConstructor

    model = MLLA(arch=TINY)
    n = sum(TINY['depths']) + 2
    assert model.get_layer_depth('backbone.patch_embed.conv1.conv.weight', 'backbone.') == (0, n)
    assert model.get_layer_depth('backbone.layers.1.blocks.0.attn.qk.weight', 'backbone.') == (2, n)
    assert model.get_layer_depth('backbone.layers.1.blocks.1.attn.qk.weight', 'backbone.') == (3, n)
    assert model.get_layer_depth(
        'backbone.layers.1.downsample.conv.0.conv.weight', 'backbone.'
    ) == (
        3,
        n,
    )
    assert model.get_layer_depth('backbone.norm3.weight', 'backbone.') == (n - 1, n)
    assert model.get_layer_depth('head.fc.weight', 'backbone.') == (n - 1, n)

    from mmengine.registry import DefaultScope
    from mmpretrain.models import ImageClassifier

    with DefaultScope.overwrite_default_scope('mmpretrain'):  # whatever scope other tests left
        classifier = ImageClassifier(
            backbone=dict(type='mlla_mm.MLLA', arch=TINY, out_indices=(3,)),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=10, in_channels=256),
        )
    model = classifier.backbone
    constructor = LearningRateDecayOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.05)),
        dict(layer_decay_rate=0.5),
    )
    optim = constructor(classifier).optimizer
    lrs = {}
    for group in optim.param_groups:
        for p in group['params']:
            lrs[id(p)] = group['lr']
    assert lrs[id(model.patch_embed.conv1.conv.weight)] == pytest.approx(0.5 ** (n - 1))
    assert lrs[id(model.norm3.weight)] == pytest.approx(1.0)
    assert lrs[id(model.layers[1].blocks[1].attn.qk.weight)] == pytest.approx(0.5 ** (n - 1 - 3))


# ---------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_training_step_is_finite(dtype):
    torch.manual_seed(0)
    model = MLLA(arch=TINY, drop_path_rate=0.1)
    model.init_weights()
    head = nn.Linear(256, 5)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    x = torch.randn(2, 3, 64, 96) * 4  # large activations: the half-precision overflow regime
    with torch.autocast('cpu', dtype=dtype):
        feats = model(x)
        logits = head(feats[-1].mean((2, 3)))
        loss = nn.functional.cross_entropy(logits, torch.tensor([1, 3]))
    assert all(f.dtype == dtype for f in feats)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()


def test_attention_core_runs_in_float32_under_autocast():
    """Under bf16 autocast only the q/k projection runs in bf16 inside the attention module;
    the KV product, the normaliser and the query product all run in float32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    matmuls = {'mm', 'addmm', 'addmm_', 'bmm', 'baddbmm', 'baddbmm_', 'matmul', 'einsum'}
    matmuls |= {'_linear_pointwise'}  # the fused oneDNN linear (bf16 under autocast)

    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in matmuls:
                dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor)}
                self.seen.append(dtypes)
            return func(*args, **(kwargs or {}))

    model = MLLA(arch=TINY).eval()
    attn = model.layers[1].blocks[0].attn
    spy = Spy()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(torch.randn(1, 3, 32, 32))
        with spy:
            attn(torch.randn(1, 4, 4, attn.dim).bfloat16())
    assert outs[1].dtype == torch.bfloat16
    half = [d for d in spy.seen if d != {torch.float32}]
    assert half == [{torch.bfloat16}], 'only the q/k projection may run in bf16'
    assert len(spy.seen) - len(half) >= 2  # k^T v and the query product, at least


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
@pytest.mark.parametrize('kind', ['cls', 'downstream'])
def test_official_checkpoints_load_through_init_cfg(layouts, tmp_path, arch, kind):
    layout = layouts[f'{kind}_{arch}']
    sd = fake_official_state_dict(layout)
    path = tmp_path / 'official.pth'
    torch.save({'model': sd} if kind == 'cls' else sd, path)
    model = MLLA(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    own = model.state_dict()
    for key, value in sd.items():
        if key.endswith('rope.rotations') or key.startswith('head.'):
            assert key not in own
            continue
        target = 'norm3.' + key[5:] if key.startswith('norm.') else key
        assert torch.equal(own[target], value), key
    covered = {('norm3.' + k[5:] if k.startswith('norm.') else k) for k in sd}
    # Everything came from the checkpoint, except the new output norms of stages 0-2 when the
    # source is the classifier (it has one final norm), which loading reports as missing.
    new = {f'norm{i}.{p}' for i in range(3) for p in ('weight', 'bias')} if kind == 'cls' else set()
    assert set(own) - covered == new


@pytest.mark.parametrize('key', ['model_ema', 'state_dict_ema'])
def test_ema_entry_on_request(tmp_path, key):
    model = MLLA(arch=TINY)
    sd = model.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / 'ema.pth'
    torch.save({'model': sd, key: ema, 'epoch': 3}, path)
    init_cfg = dict(type='Pretrained', checkpoint=str(path))
    loaded = MLLA(arch=TINY, checkpoint_key=key, init_cfg=init_cfg)
    loaded.init_weights()
    assert torch.equal(loaded.norm0.weight, ema['norm0.weight'])
    default = MLLA(arch=TINY, init_cfg=init_cfg)
    default.init_weights()
    assert torch.equal(default.norm0.weight, sd['norm0.weight'])
    missing = MLLA(arch=TINY, checkpoint_key='ema', init_cfg=init_cfg)
    with pytest.raises(KeyError, match=rf"no such entry; its entries are \['model', '{key}'\]"):
        missing.init_weights()


def test_detector_checkpoint_with_prefix(tmp_path):
    model = MLLA(arch=TINY)
    path = tmp_path / 'det.pth'
    state = {
        'backbone.' + k: v + 0.5 if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    torch.save({'state_dict': state, 'meta': {}}, path)
    for init_cfg in (
        dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'),
        dict(type='Pretrained', checkpoint=str(path)),
    ):
        loaded = MLLA(arch=TINY, init_cfg=init_cfg)
        loaded.init_weights()
        assert torch.equal(
            loaded.layers[2].blocks[1].attn.qk.weight,
            state['backbone.layers.2.blocks.1.attn.qk.weight'],
        )


def test_checkpoint_of_another_variant_is_rejected(layouts, tmp_path):
    path = tmp_path / 'base.pth'
    torch.save({'model': fake_official_state_dict(layouts['cls_base'])}, path)
    model = MLLA(arch='tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match=r"another variant: set arch='base'"):
        model.init_weights()


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('these are not weights')
    model = MLLA(arch=TINY, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(ValueError, match='is not a PyTorch checkpoint'):
        model.init_weights()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_problem():
    model = MLLA(arch=TINY)
    with pytest.raises(ValueError, match='3 channels.*NHWC'):
        model(torch.randn(1, 64, 64, 3))
    with pytest.raises(ValueError, match='3 channels'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r'4-D NCHW.*x\[None\]'):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match='smaller than the output stride 32'):
        model(torch.randn(1, 3, 20, 64))
    assert MLLA(arch=TINY, out_indices=(0,))(torch.randn(1, 3, 20, 9))[0].shape == (1, 32, 5, 3)
    with pytest.raises(ValueError, match='out_indices'):
        MLLA(arch=TINY, out_indices=(4,))


# ---------------------------------------------------------------------------------------------
# Code paths of the optimised forward
# ---------------------------------------------------------------------------------------------
def test_every_code_path_matches_the_plain_transcription():
    """The inference path (in-place attention, oneDNN fused linears, complex RoPE), the autograd
    path (4-D products), the traced path (real-arithmetic RoPE, as ONNX export and torch.compile
    take it) and float64 (no fused kernels) all give the plain transcription's outputs."""
    model, ref = tiny_pair()
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        refs = ref(x)
        outs = {'inference': model(x)}
        traced = torch.jit.trace(model, x, check_trace=False)
        outs['traced'] = traced(x)
        outs['traced, other batch'] = tuple(torch.cat(o) for o in zip(traced(x[:1]), traced(x[1:])))
    outs['autograd'] = model(x)
    assert outs['autograd'][0].requires_grad
    for path, got in outs.items():
        for o, r in zip(got, refs):
            assert rel_err(o.detach(), r) <= 1e-5, path
    with torch.no_grad():
        got64 = model.double()(x.double())
        ref64 = ref.double()(x.double())
    assert all(rel_err(o, r) <= 1e-12 for o, r in zip(got64, ref64))


def test_chunked_inference_matches(monkeypatch):
    """The fast path's MLP runs over chunks of tokens and the patch merging over bands of rows;
    many small chunks (one output row per band) give the same outputs."""
    model, ref = tiny_pair()
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 37, 45)
    monkeypatch.setattr(fast_path, 'CHUNK_ELEMENTS', 1000)  # 7 tokens per chunk at stage 0
    with torch.no_grad():
        for o, r in zip(model(x), ref(x)):
            assert rel_err(o, r) <= 1e-5
