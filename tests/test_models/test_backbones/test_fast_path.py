"""Tests of the fused inference path (``mlla_mm.models.backbones.fast_path``): it gives the plain
transcription's result, runs only where its stated conditions hold (the private oneDNN kernels
are guarded by the capability flags, switched off here to force the module path), and bf16 (bf16
models and bf16 autocast) takes the fused kernels within a stated tolerance of float32."""

import dataclasses

import pytest
import torch
import torch.nn as nn

from mlla_mm import MLLA
from mlla_mm.models.backbones import cpu_kernels
from mlla_mm.models.backbones import fast_path as ops
from mlla_mm.testing import TINY_ARCH, PlainMLLA, rel_err

TINY = TINY_ARCH
FUSED = {'_linear_pointwise', '_convolution_pointwise', '_convolution_pointwise_'}
# Relative error of bf16 outputs (bf16 model or bf16 autocast) against float32, per output stage;
# measured 0.4-0.9% on this tiny model (see docs/performance.md for MLLA-T).
BF16_TOLERANCE = 3e-2


_DTYPES = {'float': torch.float32, 'c10::BFloat16': torch.bfloat16, 'double': torch.float64}


class OpSpy:
    """Records the (name, dtypes) of every ATen / mkldnn op that runs, through the profiler (a
    TorchDispatchMode would itself turn the fast path off)."""

    def __enter__(self):
        activities = [torch.profiler.ProfilerActivity.CPU]
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        self.seen = [
            (e.name.split('::')[-1], frozenset(_DTYPES.get(t, t) for t in e.input_dtypes if t))
            for e in self.prof.events()
        ]

    def fused(self, dtype=None):
        return [d for n, d in self.seen if n in FUSED and (dtype is None or dtype in d)]


def tiny_pair():
    torch.manual_seed(0)
    model = MLLA(arch=TINY, drop_path_rate=0.0)
    model.init_weights()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    ref = PlainMLLA(**TINY, out_indices=model.out_indices)
    ref.load_state_dict(model.state_dict(), strict=True)
    return model.eval(), ref.eval()


@pytest.fixture
def no_kernels(monkeypatch):
    """A torch without the private oneDNN kernels (and no bf16 hardware)."""
    monkeypatch.setattr(ops, 'CAPS', dataclasses.replace(ops.CAPS, onednn=False, bf16=False))


@pytest.fixture
def no_bf16(monkeypatch):
    """oneDNN fp32 kernels, but a CPU without bf16 instructions."""
    monkeypatch.setattr(ops, 'CAPS', dataclasses.replace(ops.CAPS, bf16=False, amx=False))


def test_capabilities_are_detected_and_described():
    caps = ops.Capabilities.detect()
    assert caps.onednn == (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')
    )
    assert not caps.bf16 or caps.onednn
    text = caps.describe()
    assert ('oneDNN' in text) == caps.onednn and caps.isa in text


@pytest.mark.parametrize('chunks', [None, 1000])
def test_fallback_without_kernels_matches_plain_transcription(no_kernels, monkeypatch, chunks):
    """With the capability flags off no private kernel runs, and every inference strategy
    (in-place attention, chunked MLP, bands) still gives the plain transcription's outputs."""
    if chunks:
        monkeypatch.setattr(ops, 'CHUNK_ELEMENTS', chunks)
    model, ref = tiny_pair()
    x = torch.randn(2, 3, 45, 61)
    spy = OpSpy()
    with torch.no_grad():
        with spy:
            outs = model(x)
        refs = ref(x)
    assert not spy.fused()
    for o, r in zip(outs, refs):
        assert rel_err(o, r) <= 1e-5


def test_fused_kernels_run_where_available():
    if not ops.CAPS.onednn:
        pytest.skip('this torch has no fused oneDNN kernels')
    model, ref = tiny_pair()
    x = torch.randn(1, 3, 40, 56)
    spy = OpSpy()
    with torch.no_grad(), spy:
        outs = model(x)
    assert spy.fused(torch.float32)
    with torch.no_grad():
        assert all(rel_err(o, r) <= 1e-5 for o, r in zip(outs, ref(x)))
    spy = OpSpy()
    with spy:  # autograd: never a fused kernel
        model(x)
    assert not spy.fused()


@pytest.mark.parametrize('how', ['model', 'autocast'])
@pytest.mark.parametrize('caps', ['detected', 'no_bf16', 'no_kernels'])
def test_bf16_within_tolerance_of_float32(request, how, caps):
    """bf16 (a bf16 model, or bf16 autocast over float32 weights) is within BF16_TOLERANCE of
    float32 with the fused bf16 kernels (AMX / AVX512-BF16) and in the fallback alike; the
    linear-attention core runs in float32 either way."""
    if caps != 'detected':
        request.getfixturevalue(caps)
    model, _ = tiny_pair()
    x = torch.randn(2, 3, 61, 83)
    with torch.no_grad():
        ref = model(x)
        spy = OpSpy()
        if how == 'model':
            model = model.to(torch.bfloat16)
            with spy:
                outs = model(x.to(torch.bfloat16))
        else:
            with spy, torch.autocast('cpu', dtype=torch.bfloat16):
                outs = model(x)
    for o, r in zip(outs, ref):
        assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
        assert rel_err(o, r) <= BF16_TOLERANCE
    assert bool(spy.fused(torch.bfloat16)) == ops.CAPS.bf16
    products = [d for n, d in spy.seen if n in ('bmm', 'baddbmm')]
    assert products and all(d == {torch.float32} for d in products)


def test_bf16_autocast_equals_bf16_model_with_fused_kernels():
    """Under bf16 autocast the fused kernels see the same bf16 operands as in a bf16 model."""
    if not ops.CAPS.bf16:
        pytest.skip('no bf16 kernels on this CPU')
    model, _ = tiny_pair()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            auto = model(x)
        bf16 = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    for a, b in zip(auto, bf16):
        assert rel_err(a, b) <= 1e-2


def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    """After ``keep_freed_memory()`` freed 64 MB tensors' pages are reused by the next ones;
    by default glibc maps (and faults in) every such block afresh. Run in a child process, as the
    setting is process-wide."""
    script = (
        'import resource, torch\n'
        'from mlla_mm.models.backbones import fast_path as ops\n'
        'def faults():  # seven 64 MB tensors, each freed after the next exists\n'
        '    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
        '    x = torch.ones(2**24)\n'
        '    for _ in range(6):\n'
        '        x = x + 1.0\n'
        '    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n'
        'faults()\n'
        'default = faults()\n'
        'applied = ops.keep_freed_memory()\n'
        'kept = [faults() for _ in range(10)]\n'
        'print(applied, default, *kept[2:])  # the heap grows over the first few\n'
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, '-c', script], capture_output=True, text=True, check=True
    ).stdout.split()
    if out[0] != 'True':
        pytest.skip('not glibc')
    default, kept = int(out[1]), sorted(int(n) for n in out[2:])
    assert default > 6 * 16384  # 64 MB = 16384 pages, faulted in afresh by each tensor
    # Steady state: most rounds fault in nothing new. A round may still grow the heap by one
    # block (seen once in CI under a busy machine), so look at the median and the total.
    assert kept[len(kept) // 2] < 1000, kept
    assert sum(kept) < default, (default, kept)


def test_bf16_attention_core_reuses_its_float32_workspace():
    """The float32 copies of q/k and v of a bf16 model land in per-thread buffers that every
    block and every call reuse (no fresh pages), and the outputs stay the same."""
    model, _ = tiny_pair()
    model = model.to(torch.bfloat16)
    x = torch.randn(1, 3, 48, 64, dtype=torch.bfloat16)
    ops.release_workspace()
    with torch.no_grad():
        first = model(x)
        buffers = {k: (v.data_ptr(), v.dtype) for k, v in ops._WORKSPACE.__dict__.items()}
        second = model(x)
    fused = ops.CAPS.cpu_kernels and cpu_kernels.library() is not None
    assert set(buffers) == {'v', 'qk_features' if fused else 'elu_plus_one'}
    assert all(dtype == torch.float32 for _, dtype in buffers.values())
    assert buffers == {k: (v.data_ptr(), v.dtype) for k, v in ops._WORKSPACE.__dict__.items()}
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    ops.release_workspace()
    assert not ops._WORKSPACE.__dict__
