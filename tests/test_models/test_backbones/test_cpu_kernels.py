"""Tests of the fused C kernels of the attention core (``mlla_mm.models.backbones.cpu_kernels``):
they build once per machine and are reused from the cache, a missing or broken compiler gives one
clear warning and the ATen path, and the kernels give the ATen path's results (float32, bf16,
NaN, any thread count) inside the model too."""

import dataclasses
import os
import platform
import shutil
import stat
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mlla_mm import MLLA
from mlla_mm.models.backbones import cpu_kernels, mlla
from mlla_mm.models.backbones import fast_path as ops
from mlla_mm.testing import TINY_ARCH, PlainMLLA, rel_err

REFERENCE = (mlla.rope_tables, mlla.linear_attention)
needs_cc = pytest.mark.skipif(
    shutil.which(os.environ.get('CC') or 'cc') is None, reason='no C compiler here'
)


@pytest.fixture
def aten_core(monkeypatch):
    """The attention core on ATen ops (the kernels switched off)."""
    monkeypatch.setattr(ops, 'CAPS', dataclasses.replace(ops.CAPS, cpu_kernels=False))


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader that has not tried to build yet, with its own cache folder."""
    monkeypatch.setattr(cpu_kernels, '_LIB', None)
    monkeypatch.setattr(cpu_kernels, '_TRIED', False)
    monkeypatch.setenv('MLLA_MM_KERNEL_CACHE', str(tmp_path / 'cache'))
    return tmp_path


def core(qk, v, lepe, h, w, heads):
    """The fast path's attention core on copies, so that both paths see the same inputs."""
    with torch.no_grad():
        return ops.attention_core_(qk.clone(), v, lepe.clone(), h, w, heads, *REFERENCE)


def core_inputs(b=2, h=7, w=9, c=24, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(b, h * w, 2, c, generator=g).to(dtype)
    v, lepe = torch.randn(b, h * w, c, generator=g), torch.randn(b, h * w, c, generator=g)
    return qk, v, lepe


@needs_cc
def test_kernels_build_once_and_come_from_the_cache(tmp_path):
    path = cpu_kernels.build(cache_dir=tmp_path)
    assert path.exists() and path.parent == tmp_path
    mtime = path.stat().st_mtime_ns
    assert cpu_kernels.build(cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == mtime  # not compiled again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    assert cpu_kernels.library() is not None
    assert 'attention core: fused C kernels' in ops.CAPS.describe()


@needs_cc
def test_unwritable_cache_falls_back_to_the_temporary_folder(monkeypatch, tmp_path):
    blocker = tmp_path / 'a-file'
    blocker.write_text('')  # a cache folder inside a file cannot be made, even by root
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    path = cpu_kernels.build(cache_dir=blocker / 'cache')
    assert path.exists() and path.parent == tmp_path / f'mlla_mm_kernels_{os.getuid()}'


def test_missing_or_broken_compiler_is_named(tmp_path):
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C compiler 'no-such-cc'"):
        cpu_kernels.build(cc='no-such-cc', cache_dir=tmp_path)
    broken = tmp_path / 'broken-cc'
    broken.write_text('#!/bin/sh\necho "broken-cc: cannot compile" >&2\nexit 1\n')
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(cpu_kernels.KernelBuildError, match='broken-cc: cannot compile'):
        cpu_kernels.build(cc=str(broken), cache_dir=tmp_path / 'cache')
    assert not list((tmp_path / 'cache').iterdir())  # failed attempts leave nothing


def test_without_a_compiler_the_model_warns_once_and_runs_on_aten(fresh_loader, monkeypatch):
    monkeypatch.setenv('CC', 'no-such-cc')
    model = MLLA(arch=TINY_ARCH).eval()
    ref = PlainMLLA(**TINY_ARCH, out_indices=model.out_indices).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 40, 56)
    warning = pytest.warns(RuntimeWarning, match='fused CPU kernels unavailable.*no-such-cc')
    with warning, torch.no_grad():
        outs = model(x)
    assert cpu_kernels.library() is None  # tried once, not again
    with torch.no_grad():
        assert all(rel_err(o, r) <= 1e-5 for o, r in zip(outs, ref(x)))


def test_environment_turns_the_kernels_off(fresh_loader, monkeypatch):
    monkeypatch.setenv('MLLA_MM_CPU_KERNELS', '0')
    assert not cpu_kernels.enabled() and cpu_kernels.library() is None
    caps = ops.Capabilities.detect()
    assert not caps.cpu_kernels and 'attention core: ATen ops' in caps.describe()
    assert not (fresh_loader / 'cache').exists()  # nothing was compiled


@needs_cc
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('c, heads', [(24, 2), (12, 3), (16, 1)])
def test_fused_core_matches_aten(monkeypatch, dtype, c, heads):
    """ELU + 1, RoPE, the per-head normaliser: the same result as the reference core on ATen
    ops, for float32 and bf16 q/k, even and odd head widths."""
    qk, v, lepe = core_inputs(c=c, dtype=dtype)
    calls = []
    real = cpu_kernels.attention_features
    monkeypatch.setattr(cpu_kernels, 'attention_features', lambda *a: calls.append(1) or real(*a))
    fused = core(qk, v, lepe, 7, 9, heads)
    assert calls
    monkeypatch.setattr(ops, 'CAPS', dataclasses.replace(ops.CAPS, cpu_kernels=False))
    assert rel_err(fused, core(qk, v, lepe, 7, 9, heads)) <= 2e-6


@needs_cc
@pytest.mark.skipif(platform.machine() != 'x86_64', reason='x86-64 baseline build')
def test_kernels_built_for_a_cpu_without_avx_match_aten(monkeypatch, tmp_path):
    """The kernels as a CPU without AVX/AVX-512 (or a different compiler's vector choices)
    would run them: built for the x86-64 baseline (SSE2), same results as ATen."""
    baseline = cpu_kernels.build(cache_dir=tmp_path, march='x86-64')
    assert baseline != cpu_kernels.build(cache_dir=tmp_path)  # its own cache entry
    monkeypatch.setattr(cpu_kernels, '_LIB', cpu_kernels.load(baseline))
    monkeypatch.setattr(cpu_kernels, '_TRIED', True)
    for dtype in (torch.float32, torch.bfloat16):
        qk, v, lepe = core_inputs(c=40, dtype=dtype)
        fused = core(qk, v, lepe, 7, 9, 5)
        with monkeypatch.context() as m:
            m.setattr(ops, 'CAPS', dataclasses.replace(ops.CAPS, cpu_kernels=False))
            assert rel_err(fused, core(qk, v, lepe, 7, 9, 5)) <= 2e-6
    y, g = torch.randn(4, 999), torch.randn(4, 999).bfloat16()
    assert torch.equal(cpu_kernels.gate_(y, g.clone()), (g.float() * y).bfloat16())


@needs_cc
def test_kernels_are_custom_ops_the_dispatcher_sees():
    """The kernels are torch custom operators: a TorchDispatchMode sees them by name
    (``mlla::...``), their schemas and fake implementations pass ``torch.library.opcheck``, and
    they run on FakeTensors (shape propagation, as torch.compile does) without touching memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    qk, v, lepe = core_inputs()
    with Watch():
        core(qk, v, lepe, 7, 9, 2)
    assert 'mlla.attention_features' in seen and 'aten.baddbmm_' in seen
    table = ops._rope_table(mlla.rope_tables, 7, 9, 24, 'cpu')
    y, g = torch.randn(4, 24), torch.randn(4, 24)
    cases = [
        (torch.ops.mlla.attention_features.default, (qk, torch.empty(qk.shape), table, 2)),
        (torch.ops.mlla.gate_.default, (y, g.clone())),
        (torch.ops.mlla.bias_act_.default, (g.clone(), torch.randn(24), 1)),
        (torch.ops.mlla.layer_norm.default, (y, torch.ones(24), torch.zeros(24), 1e-5, g.clone())),
        (
            torch.ops.mlla.features.default,
            (qk[0], torch.empty(qk[0].shape), torch.empty(qk[0].shape), table),
        ),
        (
            torch.ops.mlla.features_grad.default,
            (
                torch.randn(qk[0].shape),
                torch.rand(qk[0].shape),
                table,
                torch.randn(63, 2),
                torch.rand(24),
                torch.randn(24),
                torch.empty(qk[0].shape),
            ),
        ),
        (torch.ops.mlla.silu_gate.default, (y, g, torch.empty(4, 24))),
        (torch.ops.mlla.silu_gate_backward_.default, (g.clone(), y.clone(), torch.randn(4, 24))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=('test_schema', 'test_faketensor'))
    counter = FlopCounterMode(display=False)
    with counter:  # the formula of the normaliser's (1 x C) @ (C x N) products and the mean
        cpu_kernels.attention_features(qk, torch.empty(qk.shape), table, 2)
    assert counter.get_total_flops() == 3 * qk.shape[0] * qk.shape[1] * qk.shape[3]
    with FakeTensorMode() as mode:
        fake, fake_table = mode.from_tensor(qk), mode.from_tensor(table)
        out = cpu_kernels.attention_features(fake, torch.empty(qk.shape), fake_table, 2)
        assert out.shape == qk.shape


@needs_cc
def test_profiler_names_the_kernels_and_the_units():
    """The fast path's custom operators and units appear as named profiler events."""
    model = MLLA(arch=TINY_ARCH).eval()
    with (
        torch.no_grad(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
    ):
        model(torch.randn(1, 3, 64, 64))
    names = {e.name for e in prof.events()}
    assert 'mlla::attention_features' in names and 'mlla::gate_' in names
    assert {
        'mlla.fast_path.Stem',
        'mlla.fast_path.MLLABlock',
        'mlla.fast_path.PatchMerging',
    } <= names


@needs_cc
def test_fused_core_propagates_nan_and_inf(aten_core):
    qk, v, lepe = core_inputs(b=1)
    qk[0, 5, 0, 3] = float('nan')  # a query: that token's output
    qk[0, 11, 1, 2] = float('inf')  # a key: poisons the whole map via K^T V
    aten = core(qk, v, lepe, 7, 9, 2)
    ops.CAPS = dataclasses.replace(ops.CAPS, cpu_kernels=True)
    fused = core(qk, v, lepe, 7, 9, 2)
    assert torch.equal(fused.isnan(), aten.isnan()) and aten.isnan().any()


@needs_cc
def test_gate_rounds_once_like_aten():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 1000, generator=g) * 10
    y[0, :4] = torch.tensor([float('nan'), float('inf'), -float('inf'), 3e38])
    for dtype in (torch.float32, torch.bfloat16):
        gate = torch.randn(3, 1000, generator=g).to(dtype)
        expected = (gate.float() * y).to(dtype)
        out = cpu_kernels.gate_(y, gate.clone())
        assert torch.equal(out.isnan(), expected.isnan())
        assert torch.equal(out.nan_to_num(), expected.nan_to_num())  # bit for bit


@needs_cc
def test_threads_split_the_work_with_the_same_result():
    n = cpu_kernels.MIN_SPLIT  # enough tokens to split
    qk, v, lepe = core_inputs(b=1, h=n // 64, w=64, c=32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = core(qk, v, lepe, n // 64, 64, 2)
        torch.set_num_threads(3)
        assert cpu_kernels._threads(n * 64) == 3
        three = core(qk, v, lepe, n // 64, 64, 2)
    finally:
        torch.set_num_threads(threads)
    assert rel_err(three, one) <= 1e-6


@needs_cc
@pytest.mark.parametrize('autocast', [False, True])
def test_model_with_fused_core_matches_plain_transcription(autocast):
    torch.manual_seed(0)
    model = MLLA(arch=TINY_ARCH).eval()
    ref = PlainMLLA(**TINY_ARCH, out_indices=model.out_indices).eval()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        refs = ref(x)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            outs = model(x)
    assert cpu_kernels.library() is not None
    tolerance = 3e-2 if autocast else 1e-5  # bf16: as test_mlla_strategies.BF16_TOLERANCE
    assert all(rel_err(o.float(), r) <= tolerance for o, r in zip(outs, refs))


@needs_cc
@pytest.mark.parametrize('act', [None, 'silu', 'gelu'])
def test_bias_and_activation_epilogue_matches_aten(act):
    g = torch.Generator().manual_seed(0)
    y, bias = torch.randn(37, 48, generator=g) * 4, torch.randn(48, generator=g)
    fns = {None: lambda t: t, 'silu': F.silu, 'gelu': F.gelu}
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 4e-3)):
        yd = y.to(dtype)
        expected = fns[act](yd.float() + bias)
        assert rel_err(cpu_kernels.bias_act_(yd.clone(), bias, act), expected) <= tolerance


@needs_cc
def test_layer_norm_matches_aten():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 40, generator=g) * 3 + 1
    weight, bias = torch.randn(40, generator=g), torch.randn(40, generator=g)
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 4e-3)):
        xd = x.to(dtype)
        out = cpu_kernels.layer_norm(xd, weight, bias, 1e-5, torch.empty_like(xd))
        assert out.dtype == dtype
        assert rel_err(out, F.layer_norm(xd.float(), (40,), weight, bias)) <= tolerance


@needs_cc
@pytest.mark.parametrize('autocast', [False, True])
def test_scratch_buffers_hold_large_results_and_never_escape(monkeypatch, autocast):
    """Results that the allocator would map afresh (SCRATCH_MIN_BYTES; here every size) go to
    reused buffers: the model still matches the plain transcription, its outputs are fresh
    tensors that the next call does not overwrite, and LinearAttention called on its own
    returns a fresh tensor too."""
    monkeypatch.setattr(ops, 'SCRATCH_MIN_BYTES', 0)
    torch.manual_seed(0)
    model = MLLA(arch=TINY_ARCH).eval()
    ref = PlainMLLA(**TINY_ARCH, out_indices=model.out_indices).eval()
    ref.load_state_dict(model.state_dict())
    x1, x2 = torch.randn(1, 3, 45, 61), torch.randn(1, 3, 45, 61)
    ops.release_workspace()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        first = model(x1)
        kept = [o.clone() for o in first]
        second = model(x2)
        attn = model.layers[0].blocks[0].attn
        tokens = torch.randn(1, 12, 16, attn.dim)
        a = attn(tokens)
        a_kept = a.clone()
        attn(torch.randn_like(tokens))
    scratch = {'cpe1', 'norm1', 'gate', 'in_proj', 'dwc', 'qk', 'attn', 'mlp_norm', 'mlp_hidden'}
    assert scratch <= set(ops._WORKSPACE.__dict__)
    assert all(torch.equal(o, k) for o, k in zip(first, kept)) and torch.equal(a, a_kept)
    tolerance = 3e-2 if autocast else 1e-5
    with torch.no_grad():
        for outs, x in ((first, x1), (second, x2)):
            assert all(rel_err(o.float(), r) <= tolerance for o, r in zip(outs, ref(x)))
    ops.release_workspace()


def _attention_backward(qk, v, grad, h, w, heads, aten):
    """The block unit's attention backward (the gradients of qk and v, and the recomputed
    output plus a LePE in ``grad``'s dtype), on the kernels or, with ``aten``, on the
    reference's ATen ops."""
    from mlla_mm.models.backbones import train_path

    layer = mlla.LinearAttention
    spec = train_path._Spec(
        *[None] * 4, 1e-5, 1e-5, heads, qk.dtype, layer.attend, layer.attend_backward,
        layer.rope_tables,
    )  # fmt: skip
    lepe = torch.cos(torch.arange(v.numel(), dtype=torch.float32)).view(v.shape).to(grad.dtype)
    caps = dataclasses.replace(ops.CAPS, cpu_kernels=not aten)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ops, 'CAPS', caps)
        return train_path._attention_backward(qk, v, grad, h, w, spec, torch.float32, lepe)


@needs_cc
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('c, heads', [(24, 2), (12, 3), (16, 1), (64, 2), (96, 3)])
def test_attention_backward_kernels_match_aten(monkeypatch, dtype, c, heads):
    """The training units' attention backward on the kernels (features and rotations in one
    pass; the products in three; RoPE's transpose, the normaliser's terms and ELU's derivative
    in another): the
    gradients of q/k and v and the recomputed output of the reference's ATen backward, for
    float32 and bf16 inputs (gradients in their dtypes; a bf16 output gradient cast and the
    output plus LePE rounded one image at a time), even and odd head widths, MLLA's 32-channel
    heads (the register-blocked products, over several token blocks and a part block), and NaN
    propagated."""
    g = torch.Generator().manual_seed(0)
    h, w = (15, 9) if c // heads == 32 else (7, 9)  # 32-channel heads: 64-token blocks, a rest
    qk = (torch.randn(2, h * w, 2 * c, generator=g) * 2).to(dtype)
    v = torch.randn(2, h * w, c, generator=g).to(dtype)
    grad = torch.randn(2, h * w, c, generator=g).to(dtype)
    calls = []
    for name in ('features', 'attention_core_backward', 'features_grad'):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, r=real: calls.append(r) or r(*a))
    fused = _attention_backward(qk, v, grad, h, w, heads, aten=False)
    assert len(calls) == 6  # three kernels per image
    ref = _attention_backward(qk, v, grad, h, w, heads, aten=True)
    tol = 2e-6 if dtype == torch.float32 else 2**-7  # bf16: one rounding of the result
    for a, b in zip(fused, ref, strict=True):
        assert a.dtype == b.dtype and rel_err(a.float(), b.float()) <= tol
    qk[1, 5, 3] = qk[0, 7, c + 1] = float('nan')  # a query's and a key's feature
    fused = _attention_backward(qk, v, grad, h, w, heads, aten=False)
    ref = _attention_backward(qk, v, grad, h, w, heads, aten=True)
    for a, b in zip(fused, ref, strict=True):
        assert a.isnan().any() and torch.equal(a.isnan(), b.isnan())


@needs_cc
@pytest.mark.skipif(platform.machine() != 'x86_64', reason='x86-64 baseline build')
def test_attention_backward_kernels_built_without_avx_match_aten(monkeypatch, tmp_path):
    """The backward kernels built for the x86-64 baseline (SSE2): the same gradients (the
    attention's, and the depthwise conv's, whose 16-lane vector blocks become SSE registers)."""
    baseline = cpu_kernels.build(cache_dir=tmp_path, march='x86-64')
    monkeypatch.setattr(cpu_kernels, '_LIB', cpu_kernels.load(baseline))
    monkeypatch.setattr(cpu_kernels, '_TRIED', True)
    for c, heads in ((40, 5), (64, 2)):  # any head width; 32-channel heads
        qk, v, grad = torch.randn(1, 135, 2 * c), torch.randn(1, 135, c), torch.randn(1, 135, c)
        fused = _attention_backward(qk, v, grad, 15, 9, heads, aten=False)
        ref = _attention_backward(qk, v, grad, 15, 9, heads, aten=True)
        for a, b in zip(fused, ref, strict=True):
            assert rel_err(a, b) <= 2e-6
    x, grad, weight = torch.randn(2, 7, 9, 40), torch.randn(2, 7, 9, 40), torch.randn(40, 1, 3, 3)
    bias = torch.randn(40)
    ours = cpu_kernels.dw3_backward(grad, x, weight, bias, True, True, True)
    for a, b in zip(ours, _dw3_aten(grad, x, weight, bias, [True] * 3), strict=True):
        assert rel_err(a, b) <= 1e-6


@needs_cc
def test_gate_kernels_match_aten():
    """The block's float32 gate ``m = y * SiLU(a)`` and its backward in one pass each: ATen's
    ``m``, ``y``'s gradient ``g * SiLU(a)`` and ``a``'s, ``silu_backward(g * y, a)``, to
    float32 rounding; NaN propagates."""
    g = torch.Generator().manual_seed(0)
    y, a, grad = (torch.randn(3, 5, 7, 40, generator=g) * 4 for _ in range(3))
    a[0, 0, 0, :3] = torch.tensor([float('nan'), float('inf'), -float('inf')])
    m = cpu_kernels.silu_gate(y, a, torch.empty_like(y))
    g_y = cpu_kernels.silu_gate(grad, a, torch.empty_like(y))
    m2, g_a = cpu_kernels.silu_gate_backward_(grad.clone(), y.clone(), a)
    ref_m, ref_g_a = y * F.silu(a), torch.ops.aten.silu_backward(grad * y, a)
    for out, ref in ((m, ref_m), (g_y, grad * F.silu(a)), (m2, ref_m), (g_a, ref_g_a)):
        assert torch.equal(out.isnan(), ref.isnan())
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert cpu_kernels.silu_gate(y, a, y) is y  # in place
    torch.testing.assert_close(y, m, rtol=0, atol=0, equal_nan=True)


def _dw3_aten(grad, x, weight, bias, mask):
    """ATen's backward of the same depthwise conv on the tokens' NCHW views."""
    c = x.shape[-1]
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [c] if bias is not None else None,
        [1, 1], [1, 1], [1, 1], False, [0, 0], c, mask,
    )  # fmt: skip
    return None if gx is None else gx.permute(0, 2, 3, 1), gw, gb


@needs_cc
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape', [(2, 7, 9, 40), (1, 1, 1, 16), (1, 5, 2, 7), (2, 3, 4, 48)])
def test_depthwise_backward_kernel_matches_aten(dtype, shape):
    """The depthwise 3x3 conv backward on tokens in one pass over the rows
    (:func:`cpu_kernels.dw3_backward`): ATen's input, weight and bias gradients in their
    dtypes, for float32 and bf16, channel counts that fill the 16-lane blocks or leave a rest
    (or are all rest), one-pixel and narrow maps (every border tap), each subset asked, and the
    input's gradient written into a given map."""
    g = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    c = shape[-1]
    weight, bias = torch.randn(c, 1, 3, 3, generator=g).to(dtype), torch.randn(c).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2**-7  # bf16: one rounding of float32 sums
    for mask in ([True, True, True], [True, False, False], [False, True, False]):
        ours = cpu_kernels.dw3_backward(grad, x, weight, bias, *mask)
        ref = _dw3_aten(grad, x, weight, bias, mask)
        for a, b, asked in zip(ours, ref, mask, strict=True):
            assert (a is None) == (not asked)
            if asked:
                assert a.dtype == b.dtype and a.shape == b.shape
                assert rel_err(a.float(), b.float()) <= tol
    into = torch.full_like(x, float('nan'))  # a map given for the input's gradient: all written
    gx, _, _ = cpu_kernels.dw3_backward(grad, x, weight, bias, True, False, False, out=into)
    ref = _dw3_aten(grad, x, weight, bias, [True, False, False])[0]
    assert gx is into and rel_err(gx.float(), ref.float()) <= tol
    x[0, 0, 0, 3] = grad[0, 0, 0, 5] = float('nan')
    gx, gw, gb = cpu_kernels.dw3_backward(grad, x, weight, bias, True, True, True)
    # NaN where the sums meet it: float64 ATen (its bf16 oneDNN kernel also spreads NaN into
    # taps that only read the zero padding)
    exact = _dw3_aten(grad.double(), x.double(), weight.double(), bias.double(), [True] * 3)
    for a, b in zip((gx, gw, gb), exact, strict=True):
        assert a.isnan().any() and torch.equal(a.isnan(), b.isnan())


@needs_cc
def test_depthwise_backward_kernel_is_a_custom_op():
    """``mlla::dw3_backward`` passes opcheck (schema, FakeTensor), and FLOP counters count the
    forward conv's multiply-adds for each gradient asked (torch's own formula for
    ``convolution_backward`` ignores the groups of the weight's gradient, counting it C times)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, grad, taps = torch.randn(2, 5, 6, 24), torch.randn(2, 5, 6, 24), torch.randn(9, 24)
    sums = torch.zeros(1, 10, 24, dtype=torch.float64)
    for args in ((grad, x, taps, torch.empty_like(x), sums), (grad, x, taps, None, sums)):
        torch.library.opcheck(
            torch.ops.mlla.dw3_backward.default, args, test_utils=('test_schema', 'test_faketensor')
        )
    weight = torch.randn(24, 1, 3, 3)
    counts = []
    for run in (
        lambda: F.conv2d(x.permute(0, 3, 1, 2), weight, None, 1, 1, 1, 24),
        lambda: cpu_kernels.dw3_backward(grad, x, weight, None, True, False, False),
        lambda: cpu_kernels.dw3_backward(grad, x, weight, None, True, True, True),
    ):
        counter = FlopCounterMode(display=False)
        with counter:
            run()
        counts.append(counter.get_total_flops())
    assert counts == [counts[0], counts[0], 2 * counts[0]] and counts[0] == 2 * 9 * x.numel()


@needs_cc
def test_attention_core_backward_kernel_is_a_custom_op():
    """``mlla::attention_core_backward`` passes opcheck (schema, FakeTensor) for float32 and
    bf16 values, and FLOP counters count its six d x d products per token and head (the ATen
    products it replaces: the same count as FlopCounterMode gives the reference's bmm)."""
    from torch.utils.flop_counter import FlopCounterMode

    n, c, heads = 70, 64, 2
    feat, rot = torch.rand(n, 2, c) + 0.5, torch.randn(n, 2, c)
    for dtype in (torch.float32, torch.bfloat16):
        v, go, lepe = (torch.randn(n, c).to(dtype) for _ in range(3))
        args = (feat, rot.clone(), v, go, lepe, torch.rand(c) + 0.5, torch.empty_like(v),
                torch.empty_like(v), torch.empty(n, heads), torch.empty(c))  # fmt: skip
        torch.library.opcheck(
            torch.ops.mlla.attention_core_backward.default, args,
            test_utils=('test_schema', 'test_faketensor'),
        )  # fmt: skip
    counter = FlopCounterMode(display=False)
    with counter:
        cpu_kernels.attention_core_backward(*args)
    reference = FlopCounterMode(display=False)
    split = [t.view(n, heads, -1).transpose(0, 1) for t in (rot[:, 0], rot[:, 1], feat[:, 0])]
    with reference:
        mlla.core_backward(*split, v.float().view(n, heads, -1).transpose(0, 1),
                           go.float().view(n, heads, -1).transpose(0, 1),
                           torch.rand(heads, 1, c // heads))  # fmt: skip
    products = 2 * 6 * n * c * (c // heads)
    assert counter.get_total_flops() == products
    assert reference.get_total_flops() >= products  # plus the normaliser's (N x d) @ (d x 1)
