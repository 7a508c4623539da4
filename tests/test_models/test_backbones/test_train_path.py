"""Exact gradients of the training step (issue 20): the memory-lean attention core
(:class:`mlla_mm.models.backbones.mlla._FeatureAttention`) against the plain transcription, in
float64, for every parameter and the input, in every backbone mode."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mlla_mm import MLLA
from mlla_mm.models.backbones import mlla as mlla_module
from mlla_mm.testing import TINY_ARCH, PlainMLLA, randomise_bn

TOL = 1e-10


def _pair(**kwargs):
    torch.manual_seed(0)
    model = MLLA(arch=TINY_ARCH, **kwargs)
    model.init_weights()
    g = randomise_bn(model)
    with torch.no_grad():  # trained-like residual branches (the init makes them tiny)
        for name, p in model.named_parameters():
            if name.endswith(('out_proj.weight', 'fc2.weight')):
                p.normal_(0, 0.2, generator=g)
    return model.double()


def _step(model, x, seed=0):
    """Outputs' weighted sum backward; returns the gradients of every parameter and the input."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same drop-path draws
    outs = model(x)
    g = torch.Generator().manual_seed(2)
    sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads['input'] = x.grad
    for p in model.parameters():
        p.grad = None
    return outs, grads


def _assert_exact(grads, grads_ref):
    assert set(grads) == set(grads_ref)
    scale = torch.stack([g.norm() for g in grads_ref.values()]).median()
    for name, g in grads.items():
        ref = grads_ref[name]
        if ref.norm() <= 1e-12 * scale:
            # a conv bias right before a training-mode BatchNorm: zero gradient in real numbers
            assert g.norm() <= 1e-12 * scale and ref.norm() <= 1e-12 * scale, name
            continue
        err = ((g - ref).norm() / ref.norm()).item()
        assert err <= TOL, (name, err)


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(),
        dict(frozen_stages=1),
        dict(with_cp=True),
        dict(norm_eval=True),
    ],
    ids=['default', 'frozen_stages', 'with_cp', 'norm_eval'],
)
def test_float64_gradients_match_the_plain_transcription(kwargs):
    model = _pair(drop_path_rate=0.0, **kwargs).train()
    ref = PlainMLLA(**TINY_ARCH).double()
    ref.load_state_dict(model.state_dict())
    ref.train()
    if kwargs.get('norm_eval'):
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    if kwargs.get('frozen_stages'):  # the same frozen parameters and eval-mode layers
        for name, p in ref.named_parameters():
            p.requires_grad = dict(model.named_parameters())[name].requires_grad
        ref.patch_embed.eval(), ref.layers[0].eval(), ref.norm0.eval()
    x = torch.randn(2, 3, 45, 61, dtype=torch.float64)
    outs, grads = _step(model, x)
    outs_ref, grads_ref = _step(ref, x)
    for o, r in zip(outs, outs_ref):
        assert ((o - r).norm() / r.norm()).item() <= TOL
    _assert_exact(grads, grads_ref)
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.allclose(b.double(), b_ref.double(), rtol=1e-12, atol=1e-12), name


def test_float64_gradients_with_drop_path_match_autograd_through_the_reference(monkeypatch):
    """Drop path (absent from the plain transcription): the same draws, against autograd
    through :func:`linear_attention` itself."""
    model = _pair(drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 45, 61, dtype=torch.float64)
    _, grads = _step(model, x, seed=5)
    monkeypatch.setattr(mlla_module, '_tracing', lambda: True)  # the plain ops, no Function
    _, grads_ref = _step(model, x, seed=5)
    _assert_exact(grads, grads_ref)


def test_attention_core_saves_only_its_inputs():
    """In training the attention core keeps ``qk`` and ``v`` (already kept by the projection),
    nothing of (B, N, C) size of its own."""
    torch.manual_seed(0)
    attn = mlla_module.LinearAttention(32, 2).train()
    x = torch.randn(2, 12, 20, 32, requires_grad=True)
    qk = attn.qk(x)
    sizes = []

    def pack(t):
        sizes.append((t.untyped_storage().data_ptr(), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlla_module.feature_attention(qk.view(2, 240, 64), x.view(2, 240, 32), 12, 20, 2, x.dtype)
    inputs = {qk.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()}
    assert {p for p, _ in sizes} == inputs


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_attention_core_under_autocast_saves_the_half_inputs(dtype):
    torch.manual_seed(0)
    qk = torch.randn(2, 240, 64, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 240, 32, dtype=dtype, requires_grad=True)
    out = mlla_module.feature_attention(qk, v, 12, 20, 2, torch.float32)
    assert out.dtype == torch.float32
    out.square().sum().backward()
    q32, v32 = qk.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    q, k = mlla_module._positive_features(q32).unbind(2)
    mlla_module.linear_attention(q, k, v32, 12, 20, 2).square().sum().backward()
    assert qk.grad.dtype == dtype and v.grad.dtype == dtype
    assert torch.allclose(qk.grad.float(), q32.grad, rtol=1e-2, atol=1e-2)
    assert torch.allclose(v.grad.float(), v32.grad, rtol=1e-2, atol=1e-2)


def _saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn(*args)`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def test_mlp_unit_keeps_only_gelu_input_and_gives_the_module_result():
    """In training the MLP keeps GELU's input (4C) and its own input, not GELU's output too;
    same outputs and gradients as the module forward, which a hook on fc2 selects."""
    from mlla_mm.models.backbones import train_path

    torch.manual_seed(0)
    mlp = mlla_module.Mlp(16, 64).double()
    x = torch.randn(2, 9, 11, 16, dtype=torch.float64, requires_grad=True)
    assert train_path.why_not_train_path(mlp, x) is None
    lean = _saved_bytes(mlp, x)
    out = mlp(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    handle = mlp.fc2.register_forward_hook(lambda *a: None)
    assert train_path.why_not_train_path(mlp, x) == 'fc2 has hooks'
    plain = _saved_bytes(mlp, x)
    ref = mlp(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *mlp.parameters()])
    handle.remove()
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
    tokens = x.numel() // 16
    assert lean == (16 + 64) * tokens * 8 + (16 * 64 + 64 * 16) * 8  # x, GELU input, weights
    assert plain == lean + 64 * tokens * 8  # GELU's output too
    with torch.no_grad():
        assert train_path.why_not_train_path(mlp, x) == 'autograd is not recording'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert train_path.why_not_train_path(mlp, x) == 'autocast is on'


def _module_and_unit(module, x, watch, autocast=False):
    """Outputs, gradients (input, then parameters), saved bytes and buffers after the step, of
    the training unit and of the module forward (selected by a hook on ``watch``); each from
    the same starting buffers; under CPU bf16 autocast if ``autocast``."""
    from mlla_mm.models.backbones import train_path

    def forward(x):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            return module(x)

    start = {k: v.clone() for k, v in module.state_dict().items()}
    results = []
    for hooked in (False, True):
        module.load_state_dict(start)
        handle = watch.register_forward_hook(lambda *a: None) if hooked else None
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            why = train_path.why_not_train_path(module, x, autocast=True)
        assert (why is None) != hooked
        saved = _saved_bytes(forward, x)
        module.load_state_dict(start)
        out = forward(x)
        g = torch.sin(torch.arange(out.numel(), dtype=torch.float64)).to(out.dtype)
        g = g.view(out.shape)
        grads = torch.autograd.grad((out * g).sum(), [x, *module.parameters()])
        buffers = {k: v.clone() for k, v in module.named_buffers()}
        results.append((out, grads, saved, buffers))
        if handle is not None:
            handle.remove()
    return results


def _assert_same(unit, plain):
    (out, grads, _, buffers), (out_ref, grads_ref, _, buffers_ref) = unit, plain
    torch.testing.assert_close(out, out_ref, rtol=1e-13, atol=1e-14)
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-13)
    for name, b in buffers.items():
        torch.testing.assert_close(b, buffers_ref[name], rtol=1e-13, atol=0), name


@pytest.mark.parametrize('bn_eval', [False, True], ids=['bn_train', 'bn_eval'])
@pytest.mark.parametrize('chunk', [None, 3000, 1], ids=['whole', 'bands', 'rows'])
def test_patch_merging_unit_keeps_its_input_and_projection(monkeypatch, chunk, bn_eval):
    """In training the patch merging keeps its input and the 2C-wide projection (BatchNorm's
    input), not the two 8C-wide ReLU outputs; same outputs, gradients and running statistics
    as the module forward, over bands of output rows (several, one row each) or whole."""
    from mlla_mm.models.backbones import fast_path

    if chunk is not None:  # 3000 elements: bands of 2 output rows (2 * 2 * 8 * 48 per row)
        monkeypatch.setattr(fast_path, 'CHUNK_ELEMENTS', chunk)
    torch.manual_seed(0)
    merging = mlla_module.PatchMerging(6).double().train()
    randomise_bn(merging)
    bn = merging.conv[2].norm
    if bn_eval:
        bn.eval()
    x = torch.randn(2, 14, 8, 6, dtype=torch.float64, requires_grad=True)
    unit, plain = _module_and_unit(merging, x, merging.conv[2].conv)
    _assert_same(unit, plain)
    assert unit[3]['conv.2.norm.num_batches_tracked'].item() == (0 if bn_eval else 1)
    lean, module = unit[2], plain[2]
    params = sum(p.numel() for p in merging.parameters()) - 12 - 12  # no project bias, BN bias
    y = 2 * 7 * 4 * 12  # the projection (B, H/2, W/2, 2C)
    assert lean == (x.numel() + y + params + 2 * 12) * 8  # and two BatchNorm statistics
    hidden = 2 * 14 * 8 * 48 + 2 * 7 * 4 * 48  # the two ReLU outputs; the module keeps no bias
    running = 0 if bn_eval else 2 * 12  # BatchNorm's kernel in training keeps them too
    assert module == lean + (hidden - 48 - 48 + running) * 8


def _stem_and_image(bn_eval: bool, dtype: torch.dtype) -> tuple:
    """A training ``Stem(3, 16)`` in ``dtype`` with random BatchNorm statistics (its
    BatchNorms in eval mode if ``bn_eval``), and a channels-last 2 x 3 x 20 x 28 image that
    requires grad."""
    torch.manual_seed(0)
    stem = mlla_module.Stem(3, 16).to(dtype).train()
    randomise_bn(stem)
    if bn_eval:
        for m in stem.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    x = torch.randn(2, 3, 20, 28, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return stem, x.requires_grad_()


def _stem_sizes(stem) -> tuple:
    """Element counts for that stem and image: the pixels of the batch at strides 2 and 4, the
    five convs' outputs, the parameters and the BatchNorm statistics (mean and inverse std)."""
    half, quarter = 10 * 14 * 2, 5 * 7 * 2
    convs = half * (8 + 8 + 8) + quarter * (64 + 16)
    params = sum(p.numel() for p in stem.parameters())
    stats = 2 * (8 + 8 + 8 + 64 + 16)
    return half, quarter, convs, params, stats


@pytest.mark.parametrize('bn_eval', [False, True], ids=['bn_train', 'bn_eval'])
def test_stem_unit_keeps_conv_outputs_and_statistics(bn_eval):
    """In training the stem keeps its input, its five convs' outputs and the BatchNorm
    statistics, not the ReLU outputs and the residual sum; same outputs, gradients and running
    statistics as the module forward."""
    stem, x = _stem_and_image(bn_eval, torch.float64)
    unit, plain = _module_and_unit(stem, x, stem.conv3[1].conv)
    _assert_same(unit, plain)
    tracked = [v.item() for k, v in unit[3].items() if k.endswith('num_batches_tracked')]
    assert tracked == [0 if bn_eval else 1] * 5
    lean, module = unit[2], plain[2]
    half, quarter, convs, params, stats = _stem_sizes(stem)
    assert lean == (x.numel() + convs + params + stats) * 8
    kept_bn = 8 + 8 + 8 + 64 + 16  # BatchNorm biases, recomputing the normalised tensors
    running = 0 if bn_eval else 2 * kept_bn  # BatchNorm's kernel in training keeps them too
    assert module == lean + (half * 8 * 3 + quarter * 64 - kept_bn + running) * 8


def test_with_cp_recomputation_takes_the_units_and_updates_statistics_once(monkeypatch):
    """With ``with_cp`` the stem and the patch mergings take their units in the forward and in
    the checkpoint's recomputation (which leaves the running statistics alone): one step moves
    every BatchNorm's statistics as a step without checkpointing does."""
    from mlla_mm.models.backbones import train_path

    calls = []
    for name in ('stem_forward', 'patch_merging_forward'):
        unit = getattr(train_path, name)
        monkeypatch.setattr(
            train_path, name, lambda m, x, r, unit=unit, name=name: calls.append((name, r))
            or unit(m, x, r),
        )  # fmt: skip
    x = torch.randn(2, 3, 45, 61, dtype=torch.float64)
    forward = [('stem_forward', False)] + [('patch_merging_forward', False)] * 3
    buffers = []
    for with_cp in (False, True):
        model = _pair(drop_path_rate=0.0, with_cp=with_cp).train()
        calls.clear()
        _step(model, x)
        assert calls[:4] == forward
        recomputed = [(name, True) for name, _ in forward] if with_cp else []
        assert sorted(calls[4:]) == sorted(recomputed)
        buffers.append(dict(model.named_buffers()))
    for name, b in buffers[0].items():
        torch.testing.assert_close(buffers[1][name], b, rtol=1e-12, atol=1e-15)
        if name.endswith('num_batches_tracked'):
            assert b.item() == 1, name


@pytest.mark.parametrize(
    'kwargs, taken',
    [
        (dict(), 4),
        (dict(norm_eval=True), 4),
        # the input requires grad: the frozen stem and merge0 take their units too, with
        # frozen parameters and eval-mode BatchNorm
        (dict(frozen_stages=1), 4),
    ],
    ids=['default', 'norm_eval', 'frozen_stages'],
)
def test_float64_step_takes_the_stem_and_merging_units(monkeypatch, kwargs, taken):
    """The float64 comparisons against the plain transcription above run these units."""
    from mlla_mm.models.backbones import train_path

    calls = []
    for name in ('stem_forward', 'patch_merging_forward'):
        unit = getattr(train_path, name)
        monkeypatch.setattr(
            train_path, name, lambda *a, unit=unit: calls.append(1) or unit(*a)
        )  # fmt: skip
    _step(_pair(drop_path_rate=0.0, **kwargs).train(), torch.randn(2, 3, 45, 61).double())
    assert len(calls) == taken


def _block_pair(drop_path=0.0, dtype=torch.float32, dim=32):
    torch.manual_seed(0)
    block = mlla_module.MLLABlock(dim, 2, drop_path=drop_path).train()
    with torch.no_grad():  # trained-like weights (the init makes the branches tiny)
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block.to(dtype)


def _block_step(block, x, grad, autocast=None):
    torch.manual_seed(1)  # the same drop-path draws
    with torch.autocast('cpu', dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = block(x)
    grads = torch.autograd.grad(out, [x, *block.parameters()], grad)
    return out, grads


@pytest.mark.parametrize(
    'dtype, autocast, drop_path, dim',
    [
        (torch.float64, None, 0.0, 32),
        (torch.float32, None, 0.3, 32),
        (torch.float32, torch.bfloat16, 0.0, 32),
        (torch.bfloat16, torch.bfloat16, 0.3, 32),
        (torch.float32, None, 0.0, 64),
        (torch.float32, torch.bfloat16, 0.0, 64),
    ],
    ids=[
        'float64',
        'float32-drop_path',
        'autocast',
        'autocast-bf16-input-drop_path',
        'float32-heads_of_32',
        'autocast-heads_of_32',
    ],
)
def test_block_unit_gives_the_module_result(dtype, autocast, drop_path, dim):
    """The whole-block training unit against the module forward (which a hook on ``norm2``
    selects): the same output and gradients for the input and every parameter (the same
    operations in the same dtypes, so equal up to the order of sums: 1e-12 in float64, 1e-5 of
    each gradient's scale in float32), in float64, float32 and under bf16 autocast (float32 and
    bf16 residual streams); with MLLA's 32-channel heads, through the attention backward's
    kernel for them (where the C kernels are built)."""
    from mlla_mm.models.backbones import train_path

    block = _block_pair(drop_path, dim=dim)
    x = torch.randn(2, 12, 20, dim, requires_grad=True).to(dtype).detach().requires_grad_()
    grad = torch.randn(2, 12, 20, dim).to(dtype)
    block = block.to(dtype) if autocast is None else block
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast is not None):
        assert train_path.why_not_train_path(block, x, autocast=True) is None
    out, grads = _block_step(block, x, grad, autocast)
    assert type(out.grad_fn).__name__ == 'BlockFunctionBackward'
    handle = block.norm2.register_forward_hook(lambda *a: None)
    ref, ref_grads = _block_step(block, x, grad, autocast)
    handle.remove()
    assert type(ref.grad_fn).__name__ != 'BlockFunctionBackward'
    assert out.dtype == ref.dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    names = ['input'] + [n for n, _ in block.named_parameters()]
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == r.dtype, name
        if autocast is None:  # float32: the unit's kernels and folded residual convs sum in
            # another order, so to rounding on the gradient's scale (entries up to ~100)
            scale = r.abs().max()
            assert (g - r).abs().max() <= tol['rtol'] * scale + tol['atol'], name
        else:  # bf16 products summed in another order: bf16 rounding
            err = ((g.float() - r.float()).norm() / r.float().norm()).item()
            assert err <= 1e-2, (name, err)


@pytest.mark.parametrize('autocast', [False, True], ids=['float32', 'autocast'])
def test_block_unit_saves_six_token_tensors(autocast):
    """The unit keeps its input, in_proj's and act_proj's outputs, q/k (2C) and the second
    CPE's input: 6 (B, H, W, C) tensors (in_proj, act_proj and q/k in bf16 under autocast),
    where the module forward keeps 19 (the MLP unit included)."""
    block = _block_pair()
    x = torch.randn(2, 12, 20, 32, requires_grad=True)
    token = x.numel() * 4
    weights = sum(p.numel() * 4 for p in block.parameters())
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        lean = _saved_bytes(block, x) - weights
        handle = block.norm2.register_forward_hook(lambda *a: None)
        plain = _saved_bytes(block, x)
        handle.remove()
    assert lean == (4 * token if autocast else 6 * token)  # x, x2; p, a, qk (bf16 in autocast)
    assert plain >= (11 if autocast else 18) * token


def _assert_same_under_autocast(unit, plain, names):
    """The unit's step against the module's under bf16 autocast: the same output (dtype and
    values: the same casts and kernels) and running statistics; gradients in the same dtypes,
    within bf16 rounding (products summed over bands, and the recomputed BatchNorm outputs)."""
    (out, grads, _, buffers), (out_ref, grads_ref, _, buffers_ref) = unit, plain
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert torch.equal(out, out_ref)
    for name, g, r in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == r.dtype, name
        if r.float().norm() <= 1e-3 * grads_ref[1].float().norm():
            continue  # a conv bias right before a training-mode BatchNorm: zero up to rounding
        err = ((g.float() - r.float()).norm() / r.float().norm()).item()
        assert err <= 1e-2, (name, err)
    for name, b in buffers.items():
        assert torch.equal(b, buffers_ref[name]), name


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32_in', 'bf16_in'])
@pytest.mark.parametrize('chunk', [None, 3000], ids=['whole', 'bands'])
def test_patch_merging_unit_under_autocast(monkeypatch, chunk, dtype):
    """Under CPU bf16 autocast the patch merging's unit makes autocast's casts itself: the
    convs in bf16 (BatchNorm and ReLU in their input's, bf16), the same output, gradients and
    running statistics as the module forward; it keeps the bf16 copy of its input the first
    conv sees and the bf16 projection, not the bf16 weight copies and ReLU outputs."""
    from mlla_mm.models.backbones import fast_path

    if chunk is not None:
        monkeypatch.setattr(fast_path, 'CHUNK_ELEMENTS', chunk)
    torch.manual_seed(0)
    merging = mlla_module.PatchMerging(6).train()
    randomise_bn(merging)
    x = torch.randn(2, 14, 8, 6).to(dtype).requires_grad_()
    unit, plain = _module_and_unit(merging, x, merging.conv[2].conv, autocast=True)
    names = ['input'] + [n for n, _ in merging.named_parameters()]
    _assert_same_under_autocast(unit, plain, names)
    assert unit[3]['conv.2.norm.num_batches_tracked'].item() == 1
    lean, module = unit[2], plain[2]
    params = sum(p.numel() for p in merging.parameters()) - 12 - 12  # no project bias, BN bias
    y = 2 * 7 * 4 * 12  # the projection (B, H/2, W/2, 2C), bf16
    assert lean == (x.numel() + y) * 2 + (params + 2 * 12) * 4  # BatchNorm statistics float32
    hidden = 2 * 14 * 8 * 48 + 2 * 7 * 4 * 48  # the two bf16 ReLU outputs
    # the module keeps those too, and bf16 copies of the weights instead of the weights
    assert module >= lean - params * 4 + hidden * 2


@pytest.mark.parametrize('bn_eval', [False, True], ids=['bn_train', 'bn_eval'])
def test_stem_unit_under_autocast(bn_eval):
    """Under CPU bf16 autocast the stem's unit runs its convs in bf16, BatchNorm on their bf16
    outputs with float32 statistics, the ReLUs and the residual sum in bf16, as the module
    forward: the same output and running statistics, gradients within bf16 rounding; it keeps
    the bf16 image the first conv sees and the bf16 conv outputs."""
    stem, x = _stem_and_image(bn_eval, torch.float32)
    unit, plain = _module_and_unit(stem, x, stem.conv3[1].conv, autocast=True)
    names = ['input'] + [n for n, _ in stem.named_parameters()]
    _assert_same_under_autocast(unit, plain, names)
    tracked = [v.item() for k, v in unit[3].items() if k.endswith('num_batches_tracked')]
    assert tracked == [0 if bn_eval else 1] * 5
    lean, module = unit[2], plain[2]
    half, quarter, convs, params, stats = _stem_sizes(stem)
    assert lean == (x.numel() + convs) * 2 + (params + stats) * 4
    # the module keeps the ReLU outputs and the residual sum too, and bf16 weight copies
    assert module >= lean - params * 4 + (half * 8 * 3 + quarter * 64) * 2


def test_autocast_step_takes_the_stem_and_merging_units(monkeypatch):
    """A bf16 autocast training step of the backbone runs the stem's and the mergings' units."""
    from mlla_mm.models.backbones import train_path

    calls = []
    for name in ('stem_forward', 'patch_merging_forward'):
        unit = getattr(train_path, name)
        monkeypatch.setattr(
            train_path, name, lambda *a, unit=unit: calls.append(1) or unit(*a)
        )  # fmt: skip
    model = _pair(drop_path_rate=0.0).float().train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(torch.randn(2, 3, 45, 61))
    sum(o.float().square().mean() for o in outs).backward()
    assert len(calls) == 4
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_compiled_training_step_is_one_graph_with_the_eager_gradients():
    """``torch.compile`` of a training step (the units step aside while compiling, so the
    compiler plans the module forward): one graph, no graph break (``torch._dynamo.explain``),
    and through AOTAutograd (``aot_eager``: inductor's passes without its C++ compile) the
    eager step's gradients."""
    torch.manual_seed(0)
    model = MLLA(arch=TINY_ARCH, drop_path_rate=0.0, out_indices=(1,)).train()
    x = torch.randn(2, 3, 64, 96)

    def loss(m):
        return sum(o.square().mean() for o in m(x))

    explanation = torch._dynamo.explain(loss)(model)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    loss(model).backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss(torch.compile(model, backend='aot_eager')).backward()
    for name, g in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, msg=name)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('padding', [[1, 1], [0, 1]], ids=['padded', 'band'])
@pytest.mark.parametrize('rows', [13, 12])
def test_strided_depthwise_input_gradient_in_low_precision(dtype, padding, rows):
    """The stride-2 depthwise conv's input gradient in bf16/fp16 (PatchMerging's, whole and as
    a band without its top padding, odd and even rows) comes from one float32
    ``conv_transpose2d``: ATen's sums rounded once to ``dtype`` (at most a last-bit difference
    of the summation order), with ATen's weight and bias gradients."""
    from mlla_mm.models.backbones import train_path

    torch.manual_seed(0)
    c = 8
    x = torch.randn(2, rows, 10, c).to(dtype).permute(0, 3, 1, 2)  # channels-last, as units
    weight, bias = torch.randn(c, 1, 3, 3).to(dtype), torch.randn(c).to(dtype)
    spec = ([2, 2], padding, [1, 1], c)
    out = F.conv2d(x, weight, bias, 2, padding, 1, c)
    grad = torch.randn(out.shape).to(dtype)
    assert train_path._strided_low_precision_depthwise(grad, weight, spec[0], c)
    gx, gw, gb = train_path._conv_backward(grad, x, weight, bias, spec, True, True, True)
    ref = torch.ops.aten.convolution_backward(
        grad, x, weight, [c], [2, 2], padding, [1, 1], False, [0, 0], c, [True, True, True]
    )
    assert gx.shape == x.shape and gx.dtype == dtype
    torch.testing.assert_close(gx, ref[0], rtol=2**-7, atol=1e-6)
    assert torch.equal(gw, ref[1]) and torch.equal(gb, ref[2])
    # float32, or a stride-1 conv: ATen's own backward
    assert not train_path._strided_low_precision_depthwise(grad.float(), weight, [2, 2], c)
    assert not train_path._strided_low_precision_depthwise(grad, weight, [1, 1], c)


def _bn_case(dtype, training):
    """A channels-last BatchNorm input, its output gradient, the float32 parameters and what
    :func:`train_path._bn` returns as statistics (batch ones in training, running ones else)."""
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    c = (torch.randn(2, 24, 9, 13, generator=g) * 3 + 1).to(dtype).contiguous(memory_format=cl)
    grad = torch.randn(2, 24, 9, 13, generator=g).to(dtype).contiguous(memory_format=cl)
    wide = torch.float64 if dtype == torch.float64 else torch.float32  # the parameters'
    weight, bias = (torch.rand(24, generator=g) + 0.5).to(wide), torch.randn(24, generator=g)
    bias = bias.to(wide)
    if training:
        _, mean, invstd = torch.ops.aten.native_batch_norm(
            c, weight, bias, None, None, True, 0, 1e-5
        )
        return c, grad, weight, bias, (mean, invstd)
    running = torch.randn(24, generator=g), torch.rand(24, generator=g) + 0.1
    return c, grad, weight, bias, tuple(t.to(wide) for t in running)


@pytest.mark.parametrize('training', [True, False], ids=['batch_stats', 'running_stats'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_stem_batchnorm_pieces_in_place_match_batchnorm(monkeypatch, dtype, training):
    """The stem's BatchNorm pieces against BatchNorm's own kernels, over several chunks: the
    recomputed output (bf16: BatchNorm's eval kernel, one pass, written into a given map) and
    the backward that writes the input's gradient into the output gradient's map (bf16: in
    float32 chunks, rounded once)."""
    from mlla_mm.models.backbones import fast_path, train_path

    monkeypatch.setattr(train_path, 'LOW_CHUNK', 24 * 50)
    monkeypatch.setattr(fast_path, 'CHUNK_ELEMENTS', 24 * 50)
    c, grad, weight, bias, stats = _bn_case(dtype, training)
    if training:
        ref_out = torch.ops.aten.native_batch_norm(c, weight, bias, None, None, True, 0, 1e-5)[0]
    else:
        ref_out = F.batch_norm(c, *stats, weight, bias, False, 0.0, 1e-5)
    into = torch.empty_like(c)
    out = train_path._normalise(c, weight, bias, stats, training, 1e-5, out=into)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.bfloat16:
        assert out.data_ptr() == into.data_ptr()
        assert (out.float() - ref_out.float()).abs().max() <= 2**-7 * ref_out.float().abs().max()
    else:
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    mask = [True, True, True]
    ref = train_path._bn_backward(grad, c, weight, stats, training, 1e-5, mask)
    ours = train_path._bn_backward_(grad.clone(), c, weight, stats, training, 1e-5, mask)
    tol = 1e-12 if dtype == torch.float64 else 2**-7
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype
        assert (a.double() - b.double()).abs().max() <= tol * b.double().abs().max()


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_stem_pointwise_conv_backward_writes_into_the_relu_output(monkeypatch, dtype):
    """The input gradient of the stem's 1x1 conv through the ReLU before it, written into the
    ReLU output's map chunk by chunk: the conv backward's and ReLU backward's result."""
    from mlla_mm.models.backbones import fast_path, train_path

    monkeypatch.setattr(fast_path, 'CHUNK_ELEMENTS', 24 * 40)
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    x = F.relu(torch.randn(2, 24, 9, 13, generator=g)).to(dtype).contiguous(memory_format=cl)
    grad = torch.randn(2, 8, 9, 13, generator=g).to(dtype).contiguous(memory_format=cl)
    weight = torch.randn(8, 24, 1, 1, generator=g).to(dtype)
    spec = ([1, 1], [0, 0], [1, 1], 1)
    assert train_path._pointwise_into(grad, x, weight, spec)
    assert not train_path._pointwise_into(grad, x.contiguous(), weight, spec)
    ref, _, _ = train_path._conv_backward(grad, x, weight, None, spec, True, False, False)
    ref = torch.ops.aten.threshold_backward(ref, x, 0)
    out = train_path._pointwise_relu_backward_(grad, x.clone(), weight)
    tol = 1e-12 if dtype == torch.float64 else 2**-7
    assert (out.double() - ref.double()).abs().max() <= tol * ref.double().abs().max()
