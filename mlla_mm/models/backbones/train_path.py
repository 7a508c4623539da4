"""Memory-lean training units of the MLLA backbone, taken only where their conditions hold.

As the fused inference path (:mod:`.fast_path`), a unit here replaces a module's forward only
when the module is exactly the standard one and nothing watches it; otherwise the module
forward runs, with the same result. Conditions (:func:`why_not_train_path`):

1. ``use_fast_path`` is True on the module (``MLLA(fast_path=False)`` turns it off);
2. autograd records: grad mode is on and the input or a parameter requires grad (without
   autograd there is nothing to save);
3. not traced, compiled or exported;
4. autocast off and the input float32 or float64, except for the units of the block, the
   stem and the patch merging, which make CPU autocast's casts themselves
   (``why_not_train_path(..., autocast=True)``; on other devices autocast's policy differs,
   e.g. CUDA's runs LayerNorm in float32, so there the module forward runs under autocast);
5. no tensor subclass, no ``TorchDispatchMode`` or ``TorchFunctionMode`` active;
6. every submodule is exactly its standard type and has no hooks; no global module hooks.

The units (any device):

- :class:`BlockFunction`, a whole ``MLLABlock``: it keeps the block's input, ``in_proj``'s and
  ``act_proj``'s outputs, the q/k projection (2C) and the second CPE's input, 6 (B, H, W, C)
  tensors where the module forward keeps 19 (with the MLP and attention units below), and
  recomputes the rest in the backward: the depthwise convs, the LayerNorms, the SiLUs and the
  gate, the attention's features, rotations and output, and the MLP's hidden layer (one GEMM,
  ``fc1``, over chunks of tokens). Under autocast it runs the linears and convs in autocast's
  dtype and the attention in float32, as the module forward does (outputs and gradients equal
  to it, tested in float64, float32 and bf16 autocast).
- :class:`MlpFunction` (an ``Mlp`` outside the block's unit, e.g. a block with a hook elsewhere),
  ``fc2(GELU(fc1(x)))`` over chunks of tokens keeping only GELU's input;
  plain autograd keeps both 4x-wide tensors (GELU's input, and its output for ``fc2``'s weight
  gradient), and the backward here recomputes GELU from the kept input (bit for bit), so the MLP
  saves a quarter of a block's activation memory less.
- :class:`PatchMergingFunction` keeps the input and the 2C-wide projection (BatchNorm's input)
  and recomputes the two 8C-wide ReLU outputs in the backward, over bands of output rows of at
  most :data:`.fast_path.CHUNK_ELEMENTS` hidden values (so they never exist whole, forward or
  backward): 1.5 times the input's size kept instead of 11.5. Under autocast it runs the
  convs in autocast's dtype and BatchNorm on their output, as the module forward does (the
  same output and running statistics, gradients within bf16 rounding), keeping the input as
  the first conv sees it and the projection in that dtype.
- :class:`StemFunction` keeps the input image, the five convs' outputs and the BatchNorm
  statistics, and recomputes the normalised and ReLU tensors and the residual sum in the
  backward: 11.8 instead of 21.8 times the size of its output. Under autocast, as the
  patch merging's unit, it keeps the image and the conv outputs in autocast's dtype.

Their BatchNorm layers update their running statistics as ``nn.BatchNorm2d`` does (momentum or
cumulative average, ``num_batches_tracked``, unbiased variance), except in a checkpoint's
recomputation (``with_cp``), which the caller tells them of: there they use the batch
statistics and leave the buffers alone, so a step updates them once. BatchNorm in eval mode
(``norm_eval``, frozen stages) normalises with the running statistics, as the module does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels, fast_path

__all__ = [
    'BlockFunction',
    'MlpFunction',
    'PatchMergingFunction',
    'StemFunction',
    'block_forward',
    'mlp_forward',
    'patch_merging_forward',
    'stem_forward',
    'why_not_train_path',
]

# Where a GEMM may add its product into a tensor in place (one rounding instead of the module
# path's two): float32 and float64; in bf16/fp16 the units keep the module path's roundings.
WIDE = (torch.float32, torch.float64)
LOW = (torch.bfloat16, torch.float16)
# Elements per float32 chunk where a bf16/fp16 map is worked on in float32 (1 MB: in cache)
LOW_CHUNK = 2**18


def why_not_train_path(module: nn.Module, x: torch.Tensor, autocast: bool = False) -> str | None:
    """Why ``module`` cannot take its training unit on ``x`` now, or None if it can.

    Args:
        module: The module whose unit would run.
        x: Its input.
        autocast: Whether the unit does autocast's casts itself (the block's unit does);
            otherwise autocast rules it out.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return 'the forward is traced, compiled or exported'
    if not getattr(module, 'use_fast_path', True):
        return 'the fast path is switched off (fast_path=False)'
    params = list(module.parameters())
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        return 'autograd is not recording'
    if torch.is_autocast_enabled(x.device.type):
        if not autocast:
            return 'autocast is on'
        if x.device.type != 'cpu':  # CUDA autocast also moves LayerNorm to float32, for one
            return f"autocast on {x.device.type}: the units make CPU autocast's casts only"
    elif x.dtype not in (torch.float32, torch.float64):
        return 'the input is neither float32 nor float64 (and autocast is off)'
    if type(x) is not torch.Tensor or any(type(p) is not nn.Parameter for p in params):
        return 'a tensor subclass is involved'
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return 'a TorchDispatchMode or TorchFunctionMode is active'
    return fast_path.why_not_standard_layers(module)


class MlpFunction(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` over chunks of tokens, keeping only the pre-activation.

    Forward and backward run over chunks of at most :data:`fast_path.CHUNK_ELEMENTS` hidden
    activations (the pre-activation is kept as those chunks), so no 4x-wide tensor exists whole;
    the weight gradients accumulate over the chunks.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        pres = []
        out = _mlp(x, w1, b1, w2, b2, keep=pres)
        ctx.save_for_backward(x, w1, w2, *pres)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w1, w2, *pres = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _mlp_backward(x, grad, w1, None, w2, need[1:], w1.dtype, pres)
        return (grads[0] if need[0] else None, *grads[1:])


def mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An ``Mlp`` in training: :class:`MlpFunction` on its layers' parameters."""
    with torch.profiler.record_function('mlla.train_path.Mlp'):
        return MlpFunction.apply(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)


# --------------------------------------------------------------------------------------------
# Conv and BatchNorm pieces of the Stem and PatchMerging units
# --------------------------------------------------------------------------------------------
def _conv_spec(conv: nn.Conv2d) -> tuple:
    """(stride, padding, dilation, groups) of a Conv2d, as ``convolution_backward`` takes them."""
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _conv(x: torch.Tensor, weight, bias, spec: tuple) -> torch.Tensor:
    stride, padding, dilation, groups = spec
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _conv_backward(grad, x, weight, bias, spec: tuple, need_x: bool, need_w: bool, need_b: bool):
    """(grad_x, grad_weight, grad_bias) of :func:`_conv`, None where not asked for."""
    stride, padding, dilation, groups = spec
    need_b = need_b and bias is not None
    if not (need_x or need_w or need_b):
        return None, None, None
    if need_x and _strided_low_precision_depthwise(grad, weight, stride, groups):
        _, gw, gb = _conv_backward(grad, x, weight, bias, spec, False, need_w, need_b)
        # the same sums rounded once to the gradient's dtype, as one float32 conv_transpose2d
        out_size = [
            n - ((m - 1) * s - 2 * p + d * (k - 1) + 1)
            for n, m, s, p, d, k in zip(
                x.shape[2:], grad.shape[2:], stride, padding, dilation, weight.shape[2:]
            )
        ]
        f32 = torch.float32
        gx = F.conv_transpose2d(
            grad.to(f32), weight.to(f32), None, stride, padding, out_size, groups, dilation
        )
        return gx.to(grad.dtype), gw, gb
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if need_b else None, stride, padding, dilation,
        False, [0] * len(stride), groups, [need_x, need_w, need_b],
    )  # fmt: skip


def _strided_low_precision_depthwise(grad, weight, stride, groups: int) -> bool:
    """Whether the input gradient of this conv is a strided depthwise one in bf16/fp16 on the
    CPU, which oneDNN runs 15-20x slower than a float32 ``conv_transpose2d`` of the same sums
    (PatchMerging's stride-2 conv, 2048 channels: 28 ms against 1.2 ms, rounded to bf16 the
    same but for a rare last-bit difference of the summation order; docs/performance.md)."""
    return (
        grad.device.type == 'cpu'
        and grad.dtype in (torch.bfloat16, torch.float16)
        and groups == weight.shape[0]
        and weight.shape[1] == 1
        and any(s > 1 for s in stride)
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the convs on ``x``: autocast's where it casts ``x`` (not float64), else
    ``x``'s."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return x.dtype


def _bn_setup(bn: nn.Module, update: bool) -> tuple:
    """What ``bn``'s forward would pass to the BatchNorm kernel, as BatchNorm's own forward
    decides it: ``(running_mean, running_var, training, momentum factor, eps)``.

    In training with ``update`` it counts the batch in ``num_batches_tracked`` (the kernel then
    updates the running statistics); without ``update`` (a checkpoint's recomputation) the batch
    statistics are used and no buffer is touched.
    """
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and update and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            factor = 1.0 / float(bn.num_batches_tracked)
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    running = not bn.training or bn.track_running_stats
    mean, var = (bn.running_mean, bn.running_var) if running else (None, None)
    if training and not update:
        mean = var = None
    return mean, var, training, factor, bn.eps


def _bn(c: torch.Tensor, weight, bias, setup: tuple) -> tuple:
    """BatchNorm of ``c`` (NCHW) -> (output, stats): the batch mean and inverse std in
    training, copies of the running mean and variance in eval mode (what the backward takes)."""
    mean, var, training, factor, eps = setup
    out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        c, weight, bias, mean, var, training, factor, eps
    )
    return out, ((save_mean, save_invstd) if training else (mean.clone(), var.clone()))


def _normalise(c: torch.Tensor, weight, bias, stats: tuple, training: bool, eps: float, out=None):
    """The BatchNorm output of ``c`` again, from the statistics :func:`_bn` returned (into
    ``out``, a map of ``c``'s shape, memory format and result dtype, if given)."""
    mean, s = stats
    if c.dtype in LOW:
        # BatchNorm's own kernel in eval form: read bf16, one float32 fma, bf16 out, in one
        # pass (the chain below makes a float32 map, 2x the size, and a cast: 8x slower)
        var = s if not training else s.reciprocal().square_().sub_(eps)  # 1/invstd^2 - eps
        empty = c.new_empty(0, dtype=mean.dtype)
        if out is None or out.dtype != c.dtype:
            out = torch.empty_like(c)
        return torch.ops.aten.native_batch_norm.out(
            c, weight, bias, mean, var, False, 0.0, eps, out=out, save_mean=empty,
            save_invstd=empty.clone(),
        )[0]  # fmt: skip
    invstd = s if training else (s + eps).rsqrt()
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    shift, scale = shift.view(1, -1, 1, 1), scale.view(1, -1, 1, 1)
    if out is not None and out.dtype == torch.result_type(c, scale):
        return torch.addcmul(shift, c, scale, out=out)
    return torch.addcmul(shift, c, scale)


def _bn_backward(grad, c, weight, stats: tuple, training: bool, eps: float, mask: list):
    """(grad_c, grad_weight, grad_bias) of :func:`_bn` (entries of ``mask`` False give None)."""
    if not any(mask):
        return None, None, None
    mask = [mask[0], mask[1] and weight is not None, mask[2]]
    a, b = stats
    if training:  # batch statistics
        return torch.ops.aten.native_batch_norm_backward(
            grad, c, weight, None, None, a, b, True, eps, mask
        )
    return torch.ops.aten.native_batch_norm_backward(
        grad, c, weight, a, b, None, None, False, eps, mask
    )


def _bn_backward_(grad, c, weight, stats: tuple, training: bool, eps: float, mask: list):
    """:func:`_bn_backward` writing the input's gradient into ``grad`` (channels-last maps of
    one dtype; otherwise :func:`_bn_backward`): no new map for the stem's, the step's largest.
    Chunk by chunk of tokens, the sums of ``grad`` and ``grad * (c - mean)`` per channel, then
    ``grad * k + c * a + b`` in place; for bf16/fp16 maps in float32 chunks, rounded once, as
    BatchNorm's own backward computes them."""
    cl = torch.channels_last
    if not (
        mask[0]
        and grad.dtype == c.dtype
        and c.dtype in WIDE + LOW
        and grad.is_contiguous(memory_format=cl)
        and c.is_contiguous(memory_format=cl)
    ):
        return _bn_backward(grad, c, weight, stats, training, eps, mask)
    acc = torch.float32 if c.dtype in LOW else c.dtype
    channels = c.shape[1]
    g2, c2 = grad.permute(0, 2, 3, 1).view(-1, channels), c.permute(0, 2, 3, 1).view(-1, channels)
    mean, s = (t.to(acc) for t in stats)
    invstd = s if training else (s + eps).rsqrt()
    step = fast_path.rows_per_chunk(channels) if acc == c.dtype else max(1, LOW_CHUNK // channels)
    chunks = [slice(start, start + step) for start in range(0, g2.shape[0], step)]
    sum_g, dot = torch.zeros(2, channels, dtype=acc, device=c.device)
    for rows in chunks:
        g_rows, c_rows = g2[rows].to(acc), c2[rows].to(acc)
        sum_g += g_rows.sum(0)
        dot += ((c_rows - mean) * g_rows).sum(0)
    k = invstd if weight is None else invstd * weight.to(acc)
    # training: grad - sum_g / M - (c - mean) invstd^2 dot / M, times k; eval: grad times k
    if training:
        a = -k * invstd * invstd * dot / g2.shape[0]
        b = -k * sum_g / g2.shape[0] - a * mean
        for rows in chunks:
            if acc == c.dtype:
                g2[rows].mul_(k).addcmul_(c2[rows], a).add_(b)
            else:
                g2[rows] = torch.addcmul(b, c2[rows].to(acc), a).addcmul_(g2[rows].to(acc), k)
    elif acc == c.dtype:
        g2.mul_(k)
    else:
        for rows in chunks:
            g2[rows] = g2[rows].to(acc).mul_(k)
    grad_weight = (dot * invstd).to(weight.dtype) if mask[1] and weight is not None else None
    grad_bias = sum_g.to(weight.dtype if weight is not None else c.dtype) if mask[2] else None
    return grad, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------
# PatchMerging
# --------------------------------------------------------------------------------------------
def _merging_hidden(x, w1, b1, w2, b2, spec: tuple, r0: int, r1: int) -> tuple:
    """Output rows ``[r0, r1)`` of the depthwise conv, after its ReLU, and the expanded input
    rows they read, ``2 r0 - 1 .. 2 r1 - 1`` (row -1, the zero padding, is left to the conv).

    Returns ``(t1, t2)``: ``ReLU(x W1 + b1)`` of those rows, tokens (B, rows, W, 8C), and
    ``ReLU(DWConv(t1))``, tokens (B, r1 - r0, W / 2, 8C).
    """
    lo = 2 * r0 - 1 if r0 > 0 else 0
    # a contiguous band: one GEMM with the bias, rounded once as the module's 1x1 conv (on a
    # strided band, F.linear adds the bias after the product, rounding twice in bf16)
    t1 = F.relu_(F.linear(x[:, lo : 2 * r1].contiguous(), w1, b1))
    stride, padding, dilation, groups = spec
    pad = padding if r0 == 0 else [0, padding[1]]
    t2 = F.conv2d(t1.permute(0, 3, 1, 2), w2, b2, stride, pad, dilation, groups)
    return t1, F.relu_(t2).permute(0, 2, 3, 1)


class PatchMergingFunction(torch.autograd.Function):
    """:class:`PatchMerging` in training: 1x1 conv to 8C + ReLU, depthwise 3x3 stride 2 + ReLU,
    1x1 conv to 2C, BatchNorm, keeping only the input and the quarter-size 1x1 output.

    Plain autograd keeps both 8C-wide ReLU outputs (8 and 2 times the input's size); here the
    forward runs over bands of output rows (:func:`_merging_hidden`) so they never exist whole,
    and the backward recomputes them band by band, bottom band first: a band's top input row
    (shared with the band above) passes its gradient to the band above.

    The convs run in ``compute`` (autocast's dtype under autocast, else the input's), with the
    casts autocast makes on the module path: the input is kept as the first conv sees it, the
    weights are cast at each call, BatchNorm takes the projection in ``compute`` with its
    own parameters' dtype, and the gradients come back in the input's and parameters' dtypes.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3, gamma, beta, spec, bn_setup, compute):
        b, h, w, _ = x.shape
        ctx.x_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(compute)  # what the first conv keeps on the module path
            w1m, b1c, w2c, b2c, w3m, b3c = (
                _cast(t, compute) for t in (w1.flatten(1), b1, w2, b2, w3.flatten(1), b3)
            )
            y = x.new_empty(b, h // 2, w // 2, w3.shape[0])
            step = fast_path.rows_per_chunk(2 * b * w * w1.shape[0])
            for r0 in range(0, h // 2, step):
                r1 = min(r0 + step, h // 2)
                _, t2 = _merging_hidden(x, w1m, b1c, w2c, b2c, spec, r0, r1)
                y[:, r0:r1] = F.linear(t2, w3m, b3c)
            out, stats = _bn(y.permute(0, 3, 1, 2), gamma, beta, bn_setup)
        ctx.spec, ctx.step, ctx.training, ctx.eps = spec, step, bn_setup[2], bn_setup[4]
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.b3_dtype = None if b3 is None else b3.dtype
        ctx.save_for_backward(x, w1, b1, w2, b2, w3, gamma, y, *stats)
        return out.permute(0, 2, 3, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return _patch_merging_backward(ctx, grad)


def _accumulate(total, a, b):
    """``total += a @ b``; a product in a lower dtype than ``total`` is rounded first, as
    the module path's ``compute`` gradients are before autocast casts them back."""
    return total.addmm_(a, b) if a.dtype == total.dtype else total.add_(a @ b)


def _patch_merging_backward(ctx, grad):
    """:meth:`PatchMergingFunction.backward` (autocast off)."""
    x, w1, b1, w2, b2, w3, gamma, y, *stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    w1m, b1c, w2c, b2c, w3m = (
        _cast(t, x.dtype) for t in (w1.flatten(1), b1, w2, b2, w3.flatten(1))
    )
    below = any(need[:7])  # anything before the BatchNorm
    gy, g_gamma, g_beta = _bn_backward(
        grad.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2), gamma, stats, ctx.training,
        ctx.eps, [below, need[7], need[8]],
    )  # fmt: skip
    if not below:
        return None, None, None, None, None, None, None, g_gamma, g_beta, None, None, None
    gy = gy.permute(0, 2, 3, 1)  # tokens (B, H/2, W/2, 2C)
    g_b3 = gy.sum((0, 1, 2)).to(ctx.b3_dtype) if need[6] else None
    g_w3 = w3.new_zeros(w3m.shape) if need[5] else None
    deeper = any(need[:5])  # through the depthwise conv
    g_x = torch.empty_like(x) if need[0] else None
    g_w1 = w1.new_zeros(w1m.shape) if need[1] else None
    g_b1 = torch.zeros_like(b1) if need[2] else None
    g_w2 = torch.zeros_like(w2) if need[3] else None
    g_b2 = torch.zeros_like(b2) if need[4] else None
    spec, step, h2 = ctx.spec, ctx.step, y.shape[1]
    stride, padding, dilation, groups = spec
    carry = None  # gradient of the expanded row the band below read as its top row
    for r0 in reversed(range(0, h2, step)):
        r1 = min(r0 + step, h2)
        t1, t2 = _merging_hidden(x, w1m, b1c, w2c, b2c, spec, r0, r1)
        g = gy[:, r0:r1].reshape(-1, gy.shape[-1])
        if need[5]:
            _accumulate(g_w3, g.t(), t2.reshape(-1, t2.shape[-1]))
        if not deeper:
            continue
        g2 = torch.ops.aten.threshold_backward((g @ w3m).view(t2.shape), t2, 0)
        band_spec = (stride, padding if r0 == 0 else [0, padding[1]], dilation, groups)
        g1, gw, gb = _conv_backward(
            g2.permute(0, 3, 1, 2), t1.permute(0, 3, 1, 2), w2c, b2c, band_spec,
            need[0] or need[1] or need[2], need[3], need[4],
        )  # fmt: skip
        if need[3]:
            g_w2 += gw
        if need[4]:
            g_b2 += gb
        if g1 is None:
            continue
        g1 = g1.permute(0, 2, 3, 1)  # tokens (B, rows, W, 8C)
        if carry is not None:
            g1[:, -1] += carry
        if r0 > 0:
            carry, g1, t1 = g1[:, 0].clone(), g1[:, 1:], t1[:, 1:]
        g1 = torch.ops.aten.threshold_backward(g1, t1, 0).reshape(-1, t1.shape[-1])
        rows = x[:, 2 * r0 : 2 * r1]
        if need[0]:
            g_x[:, 2 * r0 : 2 * r1] = (g1 @ w1m).view(rows.shape)
        if need[1]:
            _accumulate(g_w1, g1.t(), rows.reshape(-1, rows.shape[-1]))
        if need[2]:
            g_b1 += g1.sum(0)
    g_w1 = g_w1.view_as(w1) if need[1] else None
    g_w3 = g_w3.view_as(w3) if need[5] else None
    g_x = None if g_x is None else g_x.to(ctx.x_dtype)
    return g_x, g_w1, g_b1, g_w2, g_b2, g_w3, g_b3, g_gamma, g_beta, None, None, None


def patch_merging_forward(merging: nn.Module, x: torch.Tensor, recomputing: bool) -> torch.Tensor:
    """A ``PatchMerging`` in training on tokens (B, H, W, C), H and W even:
    :class:`PatchMergingFunction` on its layers' parameters.

    Args:
        merging: The ``PatchMerging`` module.
        x: Tokens (B, H, W, C), padded to even H and W.
        recomputing: Whether this is a checkpoint's recomputation (the BatchNorm then leaves
            its running statistics as they are: the step updates them once).

    Returns:
        Tokens (B, H / 2, W / 2, 2C).
    """
    expand, dwconv, project = merging.conv
    bn = project.norm
    with torch.profiler.record_function('mlla.train_path.PatchMerging'):
        return PatchMergingFunction.apply(
            x, expand.conv.weight, expand.conv.bias, dwconv.conv.weight, dwconv.conv.bias,
            project.conv.weight, project.conv.bias, bn.weight, bn.bias,
            _conv_spec(dwconv.conv), _bn_setup(bn, not recomputing), _compute_dtype(x),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Stem
# --------------------------------------------------------------------------------------------
def _pointwise_into(grad, x, weight, spec: tuple) -> bool:
    """Whether a conv's input gradient can run as :func:`_pointwise_relu_backward_`: a 1x1
    conv (stride 1, no padding, one group) on channels-last maps of one dtype."""
    stride, padding, dilation, groups = spec
    cl = torch.channels_last
    return (
        tuple(weight.shape[2:]) == (1, 1)
        and list(stride) == [1, 1]
        and list(padding) == [0, 0]
        and groups == 1
        and grad.dtype == x.dtype == weight.dtype
        and grad.is_contiguous(memory_format=cl)
        and x.is_contiguous(memory_format=cl)
    )


def _pointwise_relu_backward_(grad, x, weight):
    """The input gradient of a 1x1 conv whose input ``x`` is a ReLU's output, through that
    ReLU, written into ``x``'s map (which the caller gives up): per chunk of pixels, the
    product ``grad W`` (one GEMM, rounded once as the conv's) and the ReLU's mask. No new map
    of ``x``'s size, which in the stem is the step's largest (256 channels at stride 4)."""
    c_out, c_in = weight.shape[:2]
    g2 = grad.permute(0, 2, 3, 1).reshape(-1, c_out)
    x2 = x.permute(0, 2, 3, 1).view(-1, c_in)
    w2 = weight.view(c_out, c_in)
    step = fast_path.rows_per_chunk(c_in)
    for start in range(0, x2.shape[0], step):
        rows = slice(start, start + step)
        torch.ops.aten.threshold_backward.grad_input(
            g2[rows] @ w2, x2[rows], 0, grad_input=x2[rows]
        )
    return x


class StemFunction(torch.autograd.Function):
    """:class:`Stem` in training: five ``ConvLayer`` s (conv, BatchNorm, ReLU but for the second
    of the residual pair and the projection), keeping the convs' outputs and the BatchNorm
    statistics only.

    Plain autograd also keeps each ReLU output and the residual sum; here the backward
    recomputes them from the kept conv outputs and statistics, one at a time.

    ``params`` holds, per layer (``conv1``, ``conv2[0]``, ``conv2[1]``, ``conv3[0]``,
    ``conv3[1]``), the conv weight and bias and the BatchNorm weight and bias; ``specs`` the
    layers' :func:`_conv_spec` and :func:`_bn_setup`. The convs run in ``compute`` (autocast's
    dtype under autocast, else the input's) with autocast's casts, as
    :class:`PatchMergingFunction`'s: the image is kept as the first conv sees it, and every
    tensor between the layers (BatchNorm's output, the ReLUs, the residual sum) is in
    ``compute``, as on the module path.
    """

    @staticmethod
    def forward(ctx, x, specs, compute, *params):
        convs = [s[0] for s in specs]
        ws, cbs, gs, bs = params[0::4], params[1::4], params[2::4], params[3::4]
        outs, stats = [], []
        ctx.x_dtype = x.dtype

        def layer(i, t, act):
            c = _conv(t, ws[i].to(compute), _cast(cbs[i], compute), convs[i])
            out, s = _bn(c, gs[i], bs[i], specs[i][1])
            outs.append(c)
            stats.extend(s)
            return F.relu_(out) if act else out

        with torch.autocast(x.device.type, enabled=False):
            x = x.to(compute)  # what the first conv keeps on the module path
            a1 = layer(0, x, True)
            s = layer(2, layer(1, a1, True), False).add_(a1)  # x + conv2(x)
            out = layer(4, layer(3, s, True), False)
        ctx.specs = specs
        ctx.save_for_backward(x, *params, *outs, *stats)
        return out.permute(0, 2, 3, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return _stem_backward(ctx, grad)


def _stem_backward(ctx, grad):
    """:meth:`StemFunction.backward` (autocast off)."""
    saved = ctx.saved_tensors
    x, params, outs, stats = saved[0], saved[1:21], saved[21:26], saved[26:]
    ws, cbs, gs, bs = params[0::4], params[1::4], params[2::4], params[3::4]
    compute = x.dtype  # the image as the first conv saw it
    specs = ctx.specs
    need = ctx.needs_input_grad[3:]
    grads = [None] * 20

    def normalised(i, act, out=None):
        training, eps = specs[i][1][2], specs[i][1][4]
        t = _normalise(outs[i], gs[i], bs[i], stats[2 * i : 2 * i + 2], training, eps, out)
        return (F.relu_(t) if act else t).to(compute)  # BatchNorm's output dtype

    def backward(i, g, t, below, own=False, relu=False):
        """Layer ``i``'s BatchNorm and conv backward from the gradient ``g`` of its
        normalised output, given the conv's input ``t``; the gradient of ``t`` if
        ``below`` (with ``relu``, of the ReLU whose output ``t`` is, in ``t``'s map where
        the conv is pointwise). ``own``: ``g`` is not needed after, its map may take the
        BatchNorm's input gradient."""
        training, eps = specs[i][1][2], specs[i][1][4]
        n_w, n_cb, n_g, n_b = need[4 * i : 4 * i + 4]
        gc, grads[4 * i + 2], grads[4 * i + 3] = (_bn_backward_ if own else _bn_backward)(
            g, outs[i], gs[i], stats[2 * i : 2 * i + 2], training, eps,
            [below or n_w or n_cb, n_g, n_b],
        )  # fmt: skip
        w, b, spec = ws[i].to(compute), _cast(cbs[i], compute), specs[i][0]
        if below and relu and _pointwise_into(gc, t, w, spec):
            _, grads[4 * i], grads[4 * i + 1] = _conv_backward(gc, t, w, b, spec, False, n_w, n_cb)
            return _pointwise_relu_backward_(gc, t, w)
        gt, grads[4 * i], grads[4 * i + 1] = _conv_backward(gc, t, w, b, spec, below, n_w, n_cb)
        return relu_backward_(gt, t) if below and relu else gt

    def relu_backward_(g, a):  # ReLU's backward into g (no new map: these are the largest)
        return torch.ops.aten.threshold_backward.grad_input(g, a, 0, grad_input=g)

    before = [any(need[: 4 * i]) or ctx.needs_input_grad[0] for i in range(5)]
    a3 = normalised(3, True)
    g = backward(4, grad.permute(0, 3, 1, 2), a3, before[4], relu=True)
    if before[4]:
        del a3
        a1 = normalised(0, True)
        s = normalised(2, False).add_(a1)  # the residual sum
        g = backward(3, g, s, before[3], own=True)
    if before[3]:
        a2 = normalised(1, True, out=s if s.dtype == compute else None)  # s's map: s is done
        del s
        g2 = backward(2, g, a2, before[2])  # (g is needed again below)
        if before[2]:
            g2 = backward(1, relu_backward_(g2, a2), a1, before[1], own=True)
        del a2
    if before[1]:
        g = relu_backward_(g2.add_(g), a1)  # both branches of the residual
        g = backward(0, g, x, before[0], own=True)
    grads = [None if g is None else g.to(p.dtype) for g, p in zip(grads, params)]
    g = g.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    return g, None, None, *grads


def stem_forward(stem: nn.Module, x: torch.Tensor, recomputing: bool) -> torch.Tensor:
    """A ``Stem`` in training on a padded image batch: :class:`StemFunction` on its layers.

    Args:
        stem: The ``Stem`` module.
        x: Images (B, C_in, H, W), H and W multiples of 4, channels-last memory.
        recomputing: Whether this is a checkpoint's recomputation (the BatchNorm layers then
            leave their running statistics as they are: the step updates them once).

    Returns:
        Channels-last tokens (B, H / 4, W / 4, C).
    """
    layers = (stem.conv1, *stem.conv2, *stem.conv3)
    specs = tuple((_conv_spec(m.conv), _bn_setup(m.norm, not recomputing)) for m in layers)
    params = [p for m in layers for p in (m.conv.weight, m.conv.bias, m.norm.weight, m.norm.bias)]
    with torch.profiler.record_function('mlla.train_path.Stem'):
        return StemFunction.apply(x, specs, _compute_dtype(x), *params)


# --------------------------------------------------------------------------------------------
# The MLLA block
# --------------------------------------------------------------------------------------------
class _Spec(NamedTuple):
    """What a block's unit needs besides tensors."""

    cpe1: tuple  # _conv_spec of each depthwise conv
    dwc: tuple
    lepe: tuple
    cpe2: tuple
    eps1: float
    eps2: float
    heads: int
    compute: torch.dtype  # of the linears and convs (autocast's dtype, else the input's)
    attend: object  # LinearAttention.attend, .attend_backward, .rope_tables
    attend_backward: object
    rope_tables: object


def _conv_tokens(x: torch.Tensor, weight, bias, spec: tuple) -> torch.Tensor:
    """:func:`_conv` of channels-last tokens (B, H, W, C) -> (B, H', W', C'), as ``nhwc_conv``."""
    return _conv(x.permute(0, 3, 1, 2), weight, bias, spec).permute(0, 2, 3, 1)


def _conv_tokens_backward(grad, x, weight, bias, spec: tuple, params, need_x=True, out=None):
    """:func:`_conv_backward` of :func:`_conv_tokens`: the input's gradient as tokens, the
    weight's and bias's where ``params``, the layer's own, require grad. ``out``: a map the
    caller is done with, which the C kernel writes the input's gradient into if it fits (no
    new map; at 2048^2 each is 67 MB, mapped and faulted in afresh by glibc)."""
    need_w, need_b = (t is not None and t.requires_grad for t in params)
    if _dw3_kernel(grad, x, weight, spec):
        if out is not None and not (
            out.shape == x.shape
            and out.dtype == x.dtype
            and out.is_contiguous()
            and out.untyped_storage().data_ptr()
            not in (grad.untyped_storage().data_ptr(), x.untyped_storage().data_ptr())
        ):
            out = None  # it does not fit: a new map
        return cpu_kernels.dw3_backward(grad, x, weight, bias, need_x, need_w, need_b, out)
    gx, gw, gb = _conv_backward(
        grad.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, bias, spec, need_x, need_w, need_b
    )
    return (None if gx is None else gx.permute(0, 2, 3, 1)), gw, gb


def _dw3_kernel(grad: torch.Tensor, x: torch.Tensor, weight, spec: tuple) -> bool:
    """Whether a conv's backward on tokens runs as :func:`.cpu_kernels.dw3_backward`: a
    depthwise 3x3 conv with stride 1 and padding 1 (the block's four), ``grad`` and ``x``
    contiguous float32 or bfloat16 tokens of one dtype, with the C kernels built."""
    stride, padding, dilation, groups = spec
    return (
        grad.dtype == x.dtype
        and tuple(weight.shape[1:]) == (1, 3, 3)
        and groups == weight.shape[0] == x.shape[-1]
        and stride == padding == dilation == [1, 1]
        and fast_path._c_kernels(grad, x)
    )


def _linear_grads(grad2d, x2d, weight, bias):
    """Weight and bias gradients of a linear layer (None where not needed)."""
    gw = grad2d.t() @ x2d if weight.requires_grad else None
    gb = grad2d.sum(0) if bias is not None and bias.requires_grad else None
    return gw, gb


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _folds_residual(x: torch.Tensor, compute: torch.dtype, weight, spec: tuple) -> bool:
    """Whether ``x + CPE(x)`` runs as one conv whose centre tap is increased by one (exact in
    real arithmetic; it saves a pass over the tokens in forward and in backward): float32 or
    float64 without autocast (under autocast the module rounds the conv to its dtype first),
    and a stride-1 same-size depthwise conv."""
    stride, padding, dilation, groups = spec
    k = weight.shape[2:]
    return (
        x.dtype == compute in (torch.float32, torch.float64)
        and groups == weight.shape[0]
        and weight.shape[1] == 1
        and stride == [1, 1]
        and dilation == [1, 1]
        and padding == [k[0] // 2, k[1] // 2]
        and k[0] % 2 == k[1] % 2 == 1
    )


def _fused_gate(y: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the gate ``y * SiLU(a)`` and its backward run as C kernels (float32 with them
    built; in bf16 ATen's ops keep autocast's roundings)."""
    return y.dtype == a.dtype == torch.float32 and fast_path._c_kernels(y, a)


def _attention(qk, s, lepe, spec: _Spec, dtype: torch.dtype) -> torch.Tensor:
    """The block's attention plus its LePE, ``attend(qk, s) + lepe`` (B, H, W, C) in ``dtype``;
    as the inference fast path's fused core (:func:`.fast_path.attention_core_`, one C kernel
    for the features, rotations and normaliser, the products accumulating into the LePE)
    where its C kernels run on these float32 tensors, leaving ``qk`` as it is."""
    b, h, w, c = s.shape
    n = h * w
    if dtype == torch.float32 and fast_path._c_kernels(qk, s, lepe):
        v, out = s.reshape(b, n, c).to(dtype), lepe.to(dtype).reshape(b, n, c)
        qk = qk.view(b, n, 2, c)
        features = torch.empty(1, n, 2, c, dtype=dtype, device=qk.device)  # one image's
        for i in range(b):
            fast_path.attention_core_(
                qk[i : i + 1], v[i : i + 1], out[i : i + 1], h, w, spec.heads, spec.rope_tables,
                None, features,
            )  # fmt: skip
        return out.view(b, h, w, c)
    y = spec.attend(qk.view(b, n, 2 * c), s.reshape(b, n, c), h, w, spec.heads, dtype)
    return y.view(b, h, w, c).add_(lepe)


def _attention_backward(qk, v, grad, h: int, w: int, spec: _Spec, dtype, lepe) -> tuple:
    """``spec.attend_backward`` in ``dtype``: the gradients of ``qk`` and ``v`` (the inputs'
    dtypes) and the recomputed forward plus the LePE, ``attend(qk, v) + lepe`` in ``lepe``'s
    dtype (rounded once, as the module's cast of its float32 sum). In float32 with the C kernels
    built, per image, three kernels: :func:`.cpu_kernels.features` (the features and their
    rotations), :func:`.cpu_kernels.attention_core_backward` (the products, with each head's
    d x d state in cache, reading ``v``, ``grad`` and ``lepe`` in their dtype) and
    :func:`.cpu_kernels.features_grad` (RoPE's transpose, the normaliser's terms and ELU's
    derivative), where ATen makes nine products and about seventeen passes; no (B, N, C)
    float32 map."""
    b, n, c = v.shape
    heads = spec.heads
    if not (
        dtype == torch.float32
        and v.dtype == grad.dtype == lepe.dtype
        and fast_path._c_kernels(qk, v, grad, lepe)
    ):
        out = torch.empty(b, n, c, dtype=dtype, device=v.device)
        grad_qk, grad_v = spec.attend_backward(qk, v, grad.to(dtype), h, w, heads, dtype, out=out)
        return grad_qk, grad_v, out.add_(lepe).to(lepe.dtype)
    table = fast_path._rope_table(spec.rope_tables, h, w, c, qk.device)
    grad_qk, grad_v = torch.empty_like(qk), torch.empty_like(v)
    y = lepe  # the output takes the LePE's map (the kernel reads each row before writing it)
    features = torch.empty(n, 2, c, dtype=dtype, device=qk.device)  # reused for each image
    rotated = torch.empty_like(features)
    gs = torch.empty(n, heads, dtype=dtype, device=qk.device)
    grad_k_mean = torch.empty(c, dtype=dtype, device=qk.device)
    for i in range(b):  # as feature_attention_backward, per image
        k_mean = cpu_kernels.features(qk[i].view(n, 2, c), features, rotated, table)
        cpu_kernels.attention_core_backward(
            features, rotated, v[i], grad[i], lepe[i], k_mean, y[i], grad_v[i], gs, grad_k_mean
        )
        cpu_kernels.features_grad(
            rotated, features, table, gs, k_mean, grad_k_mean, grad_qk[i].view(n, 2, c)
        )
    return grad_qk, grad_v, y


class BlockFunction(torch.autograd.Function):
    """A whole ``MLLABlock`` in training, saving its input, the outputs of ``in_proj``,
    ``act_proj`` and ``attn.qk``, and the input of the second CPE (6 of the 19 (B, H, W, C)
    tensors autograd keeps); the element-wise work, the depthwise convs, the LayerNorms, the
    attention and the MLP's hidden layer are recomputed in backward.

    Under autocast, the linears and convs run in ``spec.compute`` and the attention in float32,
    with the casts autocast makes on the module path (the weights are cast at each call)."""

    @staticmethod
    def forward(ctx, x, mask1, mask2, spec: _Spec, *params):
        cdt = spec.compute
        adt = torch.float32 if cdt in (torch.float16, torch.bfloat16) else cdt
        (w_c1, b_c1, w_n1, b_n1, w_a, b_a, w_i, b_i, w_d, b_d, w_qk, b_qk, w_l, b_l,
         w_o, b_o, w_c2, b_c2, w_n2, b_n2, w_f1, b_f1, w_f2, b_f2) = params  # fmt: skip
        b, h, w, c = x.shape

        def conv(t, weight, bias, conv_spec):
            return _conv_tokens(t.to(cdt), weight.to(cdt), _cast(bias, cdt), conv_spec)

        def linear(t, weight, bias):
            return F.linear(t.to(cdt), weight.to(cdt), _cast(bias, cdt))

        fold = _folds_residual(x, cdt, w_c1, spec.cpe1)

        def residual(t, weight, bias, conv_spec):  # t + CPE(t), one conv where it folds
            if fold:
                return _conv_tokens(t, fast_path.plus_identity(weight), bias, conv_spec)
            return t + conv(t, weight, bias, conv_spec)

        with torch.autocast(x.device.type, enabled=False):
            # the residual stream (x1, x2, x3, out) in x's and cdt's promoted dtype, as autocast
            # gives it; the LayerNorms run in it (CPU autocast leaves layer_norm's dtype alone)
            x1 = residual(x, w_c1, b_c1, spec.cpe1)
            xn = F.layer_norm(x1, (c,), w_n1, b_n1, spec.eps1).to(cdt)  # cast once, for both
            a = linear(xn, w_a, b_a)
            p = linear(xn, w_i, b_i)
            del xn
            s = F.silu(conv(p, w_d, b_d, spec.dwc), inplace=True)
            qk = linear(s, w_qk, b_qk)
            y = _attention(qk, s, conv(s, w_l, b_l, spec.lepe), spec, adt).to(cdt)
            if _fused_gate(y, a):
                cpu_kernels.silu_gate(y, a, y)
            else:
                y *= F.silu(a)
            del s
            if mask1 is None and x1.dtype == cdt in WIDE:  # x1 += y W^T + b in place
                x1.view(-1, c).addmm_(y.view(-1, c), w_o.to(cdt).t())
                x2 = x1 if b_o is None else x1.add_(b_o.to(cdt))
            else:
                r = linear(y, w_o, b_o)
                x2 = x1.add_(r if mask1 is None else r.mul_(mask1))
            del y
            x3 = residual(x2, w_c2, b_c2, spec.cpe2)
            mlp = (w_f1.to(cdt), _cast(b_f1, cdt), w_f2.to(cdt), _cast(b_f2, cdt))
            xn2 = F.layer_norm(x3, (c,), w_n2, b_n2, spec.eps2).to(cdt)
            if mask2 is None and x3.dtype == cdt in WIDE:  # x3 += MLP(xn2) in place
                out = _mlp(xn2, *mlp, into=x3)
            else:
                f = _mlp(xn2, *mlp)
                out = x3.add_(f if mask2 is None else f.mul_(mask2))
            del xn2
        ctx.spec = spec
        ctx.save_for_backward(x, p, a, qk, x2, mask1, mask2, *params)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return _block_backward(ctx, grad.contiguous())


def _block_backward(ctx, grad):
    """:meth:`BlockFunction.backward`: recompute, then the chain rule from the output back."""
    x, p, a, qk, x2, mask1, mask2, *params = ctx.saved_tensors
    spec = ctx.spec
    cdt = spec.compute
    adt = torch.float32 if cdt in (torch.float16, torch.bfloat16) else cdt
    rdt = torch.promote_types(x.dtype, cdt)  # the residual stream's (x1, x2, x3, out)
    (w_c1, b_c1, w_n1, b_n1, w_a, b_a, w_i, b_i, w_d, b_d, w_qk, b_qk, w_l, b_l,
     w_o, b_o, w_c2, b_c2, w_n2, b_n2, w_f1, b_f1, w_f2, b_f2) = params  # fmt: skip
    b, h, w, c = x.shape
    n = h * w

    def low(*ts):  # the tensors in the compute dtype (what autocast hands the linears/convs)
        return [_cast(t, cdt) for t in ts]

    def ln_backward(g, inp, mean, rstd, weight, bias):
        mask = [True, weight.requires_grad, bias.requires_grad]
        return torch.ops.aten.native_layer_norm_backward(
            g, inp, [c], mean, rstd, weight, bias, mask
        )

    # ---- out = x3 + MLP(LN(x3)), x3 = x2 + CPE2(x2)
    x2_low, w_c2_low, b_c2_low = low(x2, w_c2, b_c2)
    fold = _folds_residual(x, cdt, w_c1, spec.cpe1)  # x + CPE(x) as one conv, as in forward
    if fold:  # the centre tap plus one: the conv's data gradient is then the residual's too
        w_c2_low = fast_path.plus_identity(w_c2_low)
        x3 = _conv_tokens(x2_low, w_c2_low, b_c2_low, spec.cpe2)
    else:
        x3 = x2 + _conv_tokens(x2_low, w_c2_low, b_c2_low, spec.cpe2)
    xn2, mean2, rstd2 = torch.native_layer_norm(x3, [c], w_n2, b_n2, spec.eps2)
    g_f = grad.to(cdt) if mask2 is None else grad.to(cdt) * mask2
    g_xn2, gw_f1, gb_f1, gw_f2, gb_f2 = _mlp_backward(
        xn2.to(cdt),
        g_f,
        *low(w_f1, b_f1, w_f2),
        acc_dtype=w_f1.dtype,
        need=tuple(t is not None and t.requires_grad for t in params[20:24]),
    )
    del xn2, g_f
    g_x3, gw_n2, gb_n2 = ln_backward(g_xn2.to(rdt), x3, mean2, rstd2, w_n2, b_n2)
    del x3
    g_x3 += grad
    gi, gw_c2, gb_c2 = _conv_tokens_backward(
        g_x3.to(cdt), x2_low, w_c2_low, b_c2_low, spec.cpe2, (w_c2, b_c2), out=g_xn2
    )  # into the MLP's input gradient's map (done with)
    g_x2 = gi if fold else g_x3.add_(gi)
    del gi, g_x3, x2_low, g_xn2

    # ---- x2 = x1 + out_proj((attn(s) + LePE(s)) * SiLU(a)), s = SiLU(dwc(p))
    w_o_low, w_d_low, b_d_low, w_l_low, b_l_low, w_qk_low = low(w_o, w_d, b_d, w_l, b_l, w_qk)
    g_r = g_x2.to(cdt) if mask1 is None else g_x2.to(cdt) * mask1
    g_r2 = g_r.reshape(-1, c)
    g_m = (g_r2 @ w_o_low).view(b, h, w, c)
    fused = _fused_gate(g_m, a)
    if fused:
        g_y = cpu_kernels.silu_gate(g_m, a, torch.empty_like(g_m))
    else:
        gate = F.silu(a)
        g_y = g_m * gate
    d = _conv_tokens(p, w_d_low, b_d_low, spec.dwc)
    s = F.silu(d)
    lepe = _conv_tokens(s, w_l_low, b_l_low, spec.lepe).reshape(b, n, c)
    g_qk, g_v, y = _attention_backward(
        qk.view(b, n, 2 * c), s.reshape(b, n, c), g_y.view(b, n, c), h, w, spec, adt, lepe
    )
    del lepe
    y = y.view(b, h, w, c)
    if fused:
        m, g_a = cpu_kernels.silu_gate_backward_(g_m, y, a)
    else:
        g_gate = g_m.mul_(y)
        m = y.mul_(gate)
        del gate
        g_a = torch.ops.aten.silu_backward(g_gate, a)
        del g_gate
    gw_o, gb_o = _linear_grads(g_r2, m.reshape(-1, c), w_o, b_o)
    del g_r, g_r2
    g_s, gw_l, gb_l = _conv_tokens_backward(
        g_y, s, w_l_low, b_l_low, spec.lepe, (w_l, b_l), out=m
    )  # into the gate's input's map (done with)
    del g_y, m
    g_qk2 = g_qk.reshape(-1, 2 * c)
    g_s += g_v.view(b, h, w, c)
    if g_s.dtype == g_qk2.dtype in WIDE:  # in place (no new map)
        g_s.view(-1, c).addmm_(g_qk2, w_qk_low)
    else:
        g_s += (g_qk2 @ w_qk_low).view(b, h, w, c)
    gw_qk, gb_qk = _linear_grads(g_qk2, s.reshape(-1, c), w_qk, b_qk)
    del s, g_qk, g_qk2, g_v
    g_d = torch.ops.aten.silu_backward.grad_input(g_s, d, grad_input=g_s)
    del g_s
    g_p, gw_d, gb_d = _conv_tokens_backward(
        g_d, p, w_d_low, b_d_low, spec.dwc, (w_d, b_d), out=d
    )  # into the DWConv output's map (done with)
    del g_d, d

    # ---- x1 = x + CPE1(x), then LN1 into act_proj and in_proj
    x_low, w_c1_low, b_c1_low, w_i_low, w_a_low = low(x, w_c1, b_c1, w_i, w_a)
    if fold:
        w_c1_low = fast_path.plus_identity(w_c1_low)
        x1 = _conv_tokens(x_low, w_c1_low, b_c1_low, spec.cpe1)
    else:
        x1 = x + _conv_tokens(x_low, w_c1_low, b_c1_low, spec.cpe1)
    xn, mean1, rstd1 = torch.native_layer_norm(x1, [c], w_n1, b_n1, spec.eps1)
    g_p2, g_a2, xn2d = g_p.reshape(-1, c), g_a.reshape(-1, c), xn.reshape(-1, c).to(cdt)
    g_xn = (g_p2 @ w_i_low).to(rdt)
    if g_xn.dtype == g_a2.dtype in WIDE:  # in place (no new map)
        g_xn.addmm_(g_a2, w_a_low)
    else:
        g_xn += g_a2 @ w_a_low
    gw_i, gb_i = _linear_grads(g_p2, xn2d, w_i, b_i)
    gw_a, gb_a = _linear_grads(g_a2, xn2d, w_a, b_a)
    del g_p, g_a, g_p2, g_a2, xn, xn2d
    g_x1, gw_n1, gb_n1 = ln_backward(g_xn.view(b, h, w, c), x1, mean1, rstd1, w_n1, b_n1)
    del g_xn
    g_x1 += g_x2
    del g_x2
    need_x = ctx.needs_input_grad[0]
    gi, gw_c1, gb_c1 = _conv_tokens_backward(
        g_x1.to(cdt), x_low, w_c1_low, b_c1_low, spec.cpe1, (w_c1, b_c1), need_x=need_x, out=x1
    )  # into the recomputed x1's map (done with)
    del x1
    g_x = None if not need_x else gi if fold else g_x1.add_(gi).to(x.dtype)
    grads = (
        gw_c1,
        gb_c1,
        gw_n1,
        gb_n1,
        gw_a,
        gb_a,
        gw_i,
        gb_i,
        gw_d,
        gb_d,
        gw_qk,
        gb_qk,
        gw_l,
        gb_l,
        gw_o,
        gb_o,
        gw_c2,
        gb_c2,
        gw_n2,
        gb_n2,
        gw_f1,
        gb_f1,
        gw_f2,
        gb_f2,
    )
    grads = [None if g is None else g.to(p.dtype) for g, p in zip(grads, params)]
    return g_x, None, None, None, *grads


def _mlp(x, w1, b1, w2, b2, keep: list | None = None, into: torch.Tensor | None = None):
    """``fc2(GELU(fc1(x)))`` over chunks of tokens (no 4x-wide tensor exists whole); the
    chunks' pre-activations are appended to ``keep`` if given. With ``into`` (a contiguous
    tensor of the output's shape and dtype) the output is added into it instead, and it is
    returned."""
    tokens = x.reshape(-1, x.shape[-1])
    step = fast_path.rows_per_chunk(w1.shape[0])
    out = (
        tokens.new_empty(tokens.shape[0], w2.shape[0])
        if into is None
        else into.view(-1, w2.shape[0])
    )
    for start in range(0, tokens.shape[0], step):
        rows = slice(start, start + step)
        pre = F.linear(tokens[rows], w1, b1)
        if keep is not None:
            keep.append(pre)
        hidden = F.gelu(pre)
        if into is not None:
            out[rows].addmm_(hidden, w2.t())
            if b2 is not None:
                out[rows] += b2
        elif b2 is None:
            torch.mm(hidden, w2.t(), out=out[rows])
        else:
            torch.addmm(b2, hidden, w2.t(), out=out[rows])
    return out.view(*x.shape[:-1], -1)


def _mlp_backward(x, grad, w1, b1, w2, need: tuple, acc_dtype, pres=None) -> tuple:
    """Gradients of :func:`_mlp`: the input's, and fc1's weight and bias and fc2's weight and
    bias where ``need`` (4 bools) asks (else None), accumulated in ``acc_dtype``; chunk by chunk,
    from the kept pre-activations ``pres`` or recomputing them from ``x``."""
    tokens = x.reshape(-1, x.shape[-1])
    grad = grad.reshape(-1, grad.shape[-1])
    step = fast_path.rows_per_chunk(w1.shape[0])
    need_w1, need_b1, need_w2, need_b2 = need
    grad_x = torch.empty_like(tokens)
    grad_w1 = torch.zeros(w1.shape, dtype=acc_dtype, device=w1.device) if need_w1 else None
    grad_b1 = torch.zeros(w1.shape[0], dtype=acc_dtype, device=w1.device) if need_b1 else None
    grad_w2 = torch.zeros(w2.shape, dtype=acc_dtype, device=w2.device) if need_w2 else None

    def acc(total, a, b):
        return total.addmm_(a, b) if a.dtype == total.dtype else total.add_(a @ b)

    for i, start in enumerate(range(0, tokens.shape[0], step)):
        rows = slice(start, start + step)
        pre = pres[i] if pres is not None else F.linear(tokens[rows], w1, b1)
        g = grad[rows]
        if need_w2:
            acc(grad_w2, g.t(), F.gelu(pre))
        grad_pre = torch.ops.aten.gelu_backward(g @ w2, pre)
        torch.mm(grad_pre, w1, out=grad_x[rows])
        if need_w1:
            acc(grad_w1, grad_pre.t(), tokens[rows])
        if need_b1:
            grad_b1 += grad_pre.sum(0)
    grad_b2 = grad.sum(0).to(acc_dtype) if need_b2 else None
    return grad_x.view_as(x), grad_w1, grad_b1, grad_w2, grad_b2


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An ``MLLABlock`` in training: :class:`BlockFunction` on its layers' parameters."""
    attn = block.attn
    device = x.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    spec = _Spec(
        _conv_spec(block.cpe1),
        _conv_spec(block.dwc),
        _conv_spec(attn.lepe),
        _conv_spec(block.cpe2),
        block.norm1.eps,
        block.norm2.eps,
        attn.num_heads,
        compute,
        attn.attend,
        attn.attend_backward,
        attn.rope_tables,
    )
    masks = []
    for _ in range(2):  # the draws of the module forward's two drop paths, in their order
        p = getattr(block.drop_path, 'p', 0.0)
        if p == 0.0 or not block.training:
            masks.append(None)
        else:
            keep = 1.0 - p
            mask = x.new_empty((x.shape[0], 1, 1, 1), dtype=compute).bernoulli_(keep)
            masks.append(mask.div_(keep))
    layers = (
        block.cpe1,
        block.norm1,
        block.act_proj,
        block.in_proj,
        block.dwc,
        attn.qk,
        attn.lepe,
        block.out_proj,
        block.cpe2,
        block.norm2,
        block.mlp.fc1,
        block.mlp.fc2,
    )
    params = [t for layer in layers for t in (layer.weight, layer.bias)]
    with torch.profiler.record_function('mlla.train_path.MLLABlock'):
        return BlockFunction.apply(x, *masks, spec, *params)
