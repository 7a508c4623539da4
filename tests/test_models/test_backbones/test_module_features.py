"""What people build on a backbone's modules works on MLLA: forward hooks and pre-hooks, LoRA
wrappers (hand-written and mmpretrain's ``LoRAModel``), dynamic quantisation, pruning, FLOP
counters and the profiler, and writes through ``.data`` (EMA, mean teacher) - in training, in
eval, without autograd, at the sizes where the fast path keeps large maps in reused buffers,
under bf16 autocast. The fast path (``fast_path.why_not_fast_path``) steps aside whenever one of
these is in play, so the result is always the module forward's."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from torch.utils.flop_counter import FlopCounterMode

from mlla_mm import MLLA
from mlla_mm.models.backbones import fast_path
from mlla_mm.testing import TINY_ARCH, rel_err

LAYERS = [
    'in_proj', 'act_proj', 'out_proj', 'attn.qk', 'mlp.fc1', 'mlp.fc2', 'dwc', 'cpe1', 'cpe2',
    'attn.lepe', 'norm1', 'norm2',
]  # fmt: skip


def tiny(seed: int = 0, **kwargs) -> MLLA:
    torch.manual_seed(seed)
    model = MLLA(arch=TINY_ARCH, drop_path_rate=0.0, **kwargs)
    model.init_weights()
    with torch.no_grad():  # trained-like residual branches (init makes them tiny)
        for block in model.layers[0].blocks:
            block.out_proj.weight.mul_(50.0)
    return model


@pytest.fixture
def large_maps(monkeypatch):
    """Every block-internal result counts as large (as stage-0 maps at detection sizes do), so
    the fast path writes them into reused buffers."""
    monkeypatch.setattr(fast_path, 'SCRATCH_MIN_BYTES', 0)


@pytest.mark.parametrize('mode', ['train', 'eval', 'no_grad', 'no_grad_large_maps'])
@pytest.mark.parametrize('name', LAYERS)
def test_hooks_fire_and_an_editing_hook_changes_the_output(request, mode, name):
    if mode.endswith('large_maps'):
        request.getfixturevalue('large_maps')
    model = tiny()
    model.train(mode == 'train')
    block = model.layers[0].blocks[0]
    layer = block.get_submodule(name)
    x = torch.randn(1, 3, 48, 64)
    grad = torch.enable_grad() if mode in ('train', 'eval') else torch.no_grad()
    with grad:
        plain = model(x)
    pre, post = [], []
    h1 = layer.register_forward_pre_hook(lambda m, args: pre.append(args[0].shape))
    h2 = layer.register_forward_hook(lambda m, args, out: post.append(out.shape))
    with grad:
        same = model(x)
    assert pre and post, f'{name}: hooks did not fire in {mode}'
    # observing changes nothing (the module forward instead of the fused one: float32
    # round-off, summed in another order and grown through the four stages)
    assert all(rel_err(a.detach(), b.detach()) <= 5e-6 for a, b in zip(same, plain))
    h2.remove()
    h3 = layer.register_forward_hook(lambda m, args, out: out * -20.0)
    with grad:
        edited = model(x)
    h1.remove(), h3.remove()
    change = rel_err(edited[0].detach(), plain[0].detach())
    assert change > 1e-4, f'{name}: edit had no effect ({change})'
    with grad:  # hooks gone: the fused path again, same result
        again = model(x)
    assert all(rel_err(a.detach(), b.detach()) <= 1e-6 for a, b in zip(again, plain))


def test_global_hooks_turn_the_fast_path_off():
    model = tiny().eval()
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(m))
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert any(type(m) is nn.Linear for m in calls) and any(type(m) is nn.Conv2d for m in calls)


class LoRA(nn.Module):
    """``base(x) + B(A(x))``, the usual LoRA wrapper."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.A = nn.Linear(base.in_features, rank, bias=False)
        self.B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


@pytest.mark.parametrize('grad', [True, False])
def test_lora_wrapper(grad):
    model = tiny().eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        plain = model(x)
    for block in model.layers[0].blocks:
        block.in_proj = LoRA(block.in_proj)
        block.attn.qk = LoRA(block.attn.qk)
    with torch.no_grad():
        why = fast_path.why_not_fast_path(model.layers[0].blocks[0], torch.randn(1, 8, 8, 32))
    assert why == 'in_proj is a LoRA, not a standard layer'
    with torch.set_grad_enabled(grad):
        same = model(x)  # B = 0: the wrapped model gives the plain output
    assert all(rel_err(a.detach(), b) <= 1e-6 for a, b in zip(same, plain))
    lora = model.layers[0].blocks[0].in_proj
    nn.init.normal_(lora.B.weight, std=0.5)
    out = model(x)
    assert rel_err(out[0].detach(), plain[0]) > 1e-3
    sum(o.sum() for o in out).backward()
    assert lora.A.weight.grad is not None and lora.B.weight.grad.abs().sum() > 0


def test_mmpretrain_lora_model():
    peft = pytest.importorskip('mmpretrain.models.peft')
    cfg = dict(type='mlla_mm.MLLA', arch=TINY_ARCH, drop_path_rate=0.0)
    targets = [dict(type='in_proj'), dict(type='qk')]
    torch.manual_seed(0)
    lora = peft.LoRAModel(module=cfg, alpha=1, rank=4, targets=targets)
    torch.manual_seed(0)
    plain = MLLA(arch=TINY_ARCH, drop_path_rate=0.0)
    plain.init_weights()  # the same weights as the module LoRAModel built
    plain.eval()
    x = torch.randn(1, 3, 40, 56)
    wrapped = lora.module.layers[0].blocks[0].in_proj
    assert type(wrapped) is not nn.Linear  # mmpretrain's LoRALinear
    lora.eval()
    with torch.no_grad():
        ref = plain(x)
        same = lora.module(x)
    assert all(rel_err(a, b) <= 1e-6 for a, b in zip(same, ref))  # lora_up starts at zero
    for name, p in lora.named_parameters():
        if 'lora_up' in name:
            nn.init.normal_(p, std=0.5)
    lora.train()
    out = lora.module(x)
    sum(o.sum() for o in out).backward()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all('lora' in n for n in trainable)
    assert all(p.grad is not None for n, p in lora.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert rel_err(lora.eval().module(x)[0], ref[0]) > 1e-3


def test_dynamic_quantisation():
    model = tiny().eval()
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ref = model(x)
    quantized = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
    )
    assert type(quantized.layers[0].blocks[0].in_proj) is not nn.Linear
    with torch.no_grad():
        outs = quantized(x)
    for o, r in zip(outs, ref):
        assert o.shape == r.shape and torch.isfinite(o).all()
        assert 0 < rel_err(o, r) <= 0.1  # int8 weights: close, not equal


def test_pruning_trains_over_several_steps():
    model = tiny().train()
    block = model.layers[0].blocks[0]
    prune.l1_unstructured(block.in_proj, 'weight', 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 40, 56)
    for _ in range(3):
        opt.zero_grad()
        sum(o.square().mean() for o in model(x)).backward()
        opt.step()
    assert block.in_proj.weight_orig.grad is not None
    assert (block.in_proj.weight == 0).float().mean() == 0.5
    model.eval()
    with torch.no_grad():
        pruned = model(x)
        block.in_proj.weight_orig.mul_(block.in_proj.weight_mask)
        prune.remove(block.in_proj, 'weight')
        assert fast_path.why_not_fast_path(block, torch.randn(1, 8, 8, 32)) is None
        removed = model(x)  # plain Linear again, fast path: the same pruned weights
    assert all(rel_err(a, b) <= 1e-6 for a, b in zip(removed, pruned))


def test_flop_counter_counts_the_same_with_and_without_autograd():
    model = tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    counts = []
    for grad in (True, False):
        counter = FlopCounterMode(display=False)
        with torch.set_grad_enabled(grad), counter:
            model(x)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 50e6


@pytest.mark.parametrize('write', ['data_copy', 'ema', 'mean_teacher'])
def test_writes_through_data_are_never_stale_under_bf16_autocast(write):
    """A weight cast is never reused after a write through ``.data`` (which does not move the
    version counter): ``p.data.copy_``, mmengine's EMA (``ExponentialMovingAverage``, the
    model of ``EMAHook``) and mmdet's ``MeanTeacherHook`` update."""
    from mmengine.model import ExponentialMovingAverage

    student, teacher = tiny(0).eval(), tiny(1).eval()
    x = torch.randn(1, 3, 48, 64)
    autocast = torch.autocast('cpu', dtype=torch.bfloat16)
    if write == 'ema':
        teacher = ExponentialMovingAverage(teacher, momentum=0.5).module
    with torch.no_grad(), autocast:
        teacher(x)  # whatever a cache kept, it holds the teacher's old weights now
    expected = copy.deepcopy(teacher)
    pairs = list(zip(teacher.parameters(), expected.parameters(), student.parameters()))
    with torch.no_grad():
        for t, e, s in pairs:
            if write == 'data_copy':
                t.data.copy_(s.data)
                e.copy_(s)
            elif write == 'ema':  # ExponentialMovingAverage.avg_func on .data
                t.data.lerp_(s.data, 0.5)
                e.lerp_(s, 0.5)
            else:  # MeanTeacherHook.momentum_update
                t.data.mul_(1 - 0.5).add_(s.data, alpha=0.5)
                e.mul_(1 - 0.5).add_(s, alpha=0.5)
    fresh = copy.deepcopy(expected)  # a model that never ran
    with torch.no_grad(), autocast:
        got, want = teacher(x), fresh(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_half_model_after_data_write_is_not_stale():
    a, b = tiny(0).eval().half(), tiny(1).eval().half()
    x = torch.randn(1, 3, 48, 64).half()
    with torch.no_grad():
        a(x)
        for p, q in zip(a.parameters(), b.parameters()):
            p.data.copy_(q.data)
        for p, q in zip(a.buffers(), b.buffers()):
            p.data.copy_(q.data)
        assert all(torch.equal(u, v) for u, v in zip(a(x), b(x)))


def test_conditions_are_named():
    model = tiny()
    block = model.layers[0].blocks[0]
    x = torch.randn(1, 8, 8, 32)
    why = fast_path.why_not_fast_path
    assert why(block.eval(), x).startswith('autograd is recording')
    with torch.no_grad():
        assert why(block.train(), x).startswith('the module is in training mode')
        block.eval()
        assert why(block, x) is None
        assert why(block, x.double()).startswith('unsupported precision')
        block.use_fast_path = False
        assert 'switched off' in why(block, x)
        block.use_fast_path = True
        with FlopCounterMode(display=False):
            assert 'DispatchMode' in why(block, x)
        h = block.norm2.register_forward_hook(lambda *a: None)
        assert why(block, x) == 'norm2 has hooks'
        h.remove()
        block.mlp.act = nn.GELU(approximate='tanh')
        assert why(block, x) == 'mlp.act is a GELU, not a standard layer'
    assert not any(m.use_fast_path for m in MLLA(arch=TINY_ARCH, fast_path=False).modules()
                   if hasattr(m, 'use_fast_path'))  # fmt: skip
