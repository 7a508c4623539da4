"""MLLA: Mamba-Like Linear Attention backbone.

Paper: "Demystify Mamba in Vision: A Linear Attention Perspective", Dongchen Han et al.,
NeurIPS 2024, https://arxiv.org/abs/2405.16605. Official code (MIT licence):
https://github.com/LeapLabTHU/MLLA. This is an independent implementation of the same equations
with the same parameter names, so the official checkpoints load unchanged:

* any input size (padding as the official downstream code does), with RoPE computed for the actual
  token grid and cached per (height, width, channels, device, dtype), never stored in the state
  dict; eager float32/64 rotates with one complex product, tracing, ``torch.compile`` and half
  precision with real arithmetic (ONNX-friendly);
* tokens stay channels-last (B, H, W, C) through a stage; depthwise convs see a channels-last NCHW
  view and the 1x1 convs of the stem and patch merging run as token GEMMs, so no permute copies;
  the attention heads are a batch dimension of strided views (one batched GEMM per product);
* ``ELU(x) + 1`` as ``exp(min(x, 0)) + max(x, 0)`` (ATen's ELU runs a scalar ``expm1``);
* inference only (no autograd): BatchNorm folded into the convs, oneDNN linear and conv kernels
  with the bias and activation in their epilogue, in-place activations, RoPE and residual
  products, and the MLP, the patch merging and the stem's stride-2 conv run over chunks so their
  wide hidden tensors never exist whole. In training the MLP runs over chunks of tokens too.
  With autograd the same equations run out of place; the tests hold every path to the plain
  transcription (:mod:`mlla_mm.testing`);
* the linear-attention normaliser and KV product run in float32 under autocast;
* OpenMMLab backbone arguments: ``out_indices``, ``frozen_stages``, ``norm_eval``, ``with_cp``,
  ``init_cfg`` and ``get_layer_depth`` for layer-wise learning-rate decay.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import PretrainedInit, trunc_normal_
from torch.nn.modules.batchnorm import _BatchNorm

from mlla_mm.registry import MODELS
from mlla_mm.safe_load import check_checkpoint_file

__all__ = ['MLLA', 'checkpoint_arch', 'convert_official_state_dict', 'rope_tables']


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's ``drop_path``)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f'p={self.p}'


def _rope_angles(h: int, w: int, dim: int, base: float, device, dtype) -> tuple:
    k_max = dim // 4
    theta = 1.0 / (base ** (torch.arange(k_max, device=device, dtype=torch.float32) / k_max))
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None, None] * theta
    cols = torch.arange(w, device=device, dtype=torch.float32)[None, :, None] * theta
    angles = torch.cat([rows.expand(h, w, k_max), cols.expand(h, w, k_max)], dim=-1)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


_ROPE_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 256


def _cached(cache: dict, key: tuple, make) -> tuple | torch.Tensor:
    """``cache[key]``, made by ``make()`` on a miss.

    Tables are made outside inference mode and without autograd, so that a table first made
    under ``torch.inference_mode()`` is an ordinary tensor that a later autograd forward may save
    for backward. Writes are locked (several threads may run models at once); a full cache is
    emptied rather than grown.
    """
    table = cache.get(key)
    if table is None:
        with torch.inference_mode(False), torch.no_grad():
            table = make()
        with _CACHE_LOCK:
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[key] = table
    return table


def rope_tables(h: int, w: int, dim: int, device, dtype, base: float = 10000.0) -> tuple:
    """Cosine and sine tables of the 2-D RoPE over an ``h x w`` token grid.

    Channel pair ``p`` (channels ``2p, 2p+1``) is rotated by ``row * theta_p`` for the first
    ``dim // 4`` pairs and by ``col * theta_{p - dim // 4}`` for the rest, with
    ``theta_k = base ** (-k / (dim // 4))``, as in the official code.

    Returns:
        tuple[Tensor, Tensor]: ``cos`` and ``sin``, each of shape (h, w, dim // 2).
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return _rope_angles(h, w, dim, base, device, dtype)  # traced into the graph, not cached
    key = (h, w, dim, base, torch.device(device), dtype)
    return _cached(_ROPE_CACHE, key, lambda: _rope_angles(h, w, dim, base, device, dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` (..., H, W, C) by the angles whose cos/sin are given."""
    x = x.unflatten(-1, (-1, 2))
    x_re, x_im = x[..., 0], x[..., 1]
    return torch.stack([x_re * cos - x_im * sin, x_im * cos + x_re * sin], dim=-1).flatten(-2)


_ROPE_PAIR_CACHE: dict = {}


def rope_pair_tables(h: int, w: int, dim: int, device, dtype) -> tuple:
    """RoPE tables laid out per channel: ``rope(x) = x * cos2 + swap_pairs(x) * sin2``.

    ``cos2[..., 2p] = cos2[..., 2p + 1] = cos_p`` and ``sin2[..., 2p] = -sin_p``,
    ``sin2[..., 2p + 1] = sin_p``: the same rotation as :func:`apply_rope` in three full-width
    element-wise passes instead of eight half-width ones. Cached like :func:`rope_tables`.

    Returns:
        tuple[Tensor, Tensor]: ``cos2`` and ``sin2``, each of shape (h, w, dim).
    """

    def make() -> tuple:
        cos, sin = rope_tables(h, w, dim, device, dtype)
        return (
            torch.stack([cos, cos], dim=-1).flatten(-2),
            torch.stack([-sin, sin], dim=-1).flatten(-2),
        )

    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return make()  # traced into the graph, not cached
    return _cached(_ROPE_PAIR_CACHE, (h, w, dim, torch.device(device), dtype), make)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)`` along the last dimension (a copy)."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


_ROPE_COMPLEX_CACHE: dict = {}


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _autocast(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        cpu = device_type == 'cpu'
        return torch.is_autocast_cpu_enabled() if cpu else torch.is_autocast_enabled()


def rope_complex_table(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """``exp(i * angle)`` of every RoPE channel pair over an ``h x w`` grid, as a complex tensor.

    Multiplying the complex view of ``x`` (pairs ``(x_2p, x_2p+1)`` as ``x_2p + i x_2p+1``) by it
    is :func:`apply_rope` in one element-wise pass that can run in place. Cached like
    :func:`rope_tables`; ``dtype`` is the real dtype (float32 or float64).

    Returns:
        Tensor: Complex, of shape (h * w, 1, dim // 2) (broadcasting over the q/k axis).
    """

    def make() -> torch.Tensor:
        cos, sin = rope_tables(h, w, dim, device, dtype)
        return torch.complex(cos, sin).reshape(h * w, 1, dim // 2)

    return _cached(_ROPE_COMPLEX_CACHE, (h, w, dim, torch.device(device), dtype), make)


def rope_rotate(qk: torch.Tensor, h: int, w: int, inplace: bool = False) -> torch.Tensor:
    """RoPE of q and k together: ``qk`` is (B, h * w, 2, C), the result has the same shape.

    float32/float64 tensors in eager mode take the complex product with
    :func:`rope_complex_table` (one pass, in place when ``inplace``); half precision, tracing and
    ``torch.compile`` take the real formulation with :func:`rope_pair_tables`.
    """
    c = qk.shape[-1]
    if qk.dtype in (torch.float32, torch.float64) and not _tracing():
        table = rope_complex_table(h, w, c, qk.device, qk.dtype)
        pairs = torch.view_as_complex(qk.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs.mul_(table) if inplace else pairs * table).flatten(-2)
    cos2, sin2 = rope_pair_tables(h, w, c, qk.device, qk.dtype)
    cos2, sin2 = cos2.reshape(h * w, 1, c), sin2.reshape(h * w, 1, c)
    return (qk * cos2).addcmul_(swap_pairs(qk), sin2)


def _identity_taps(conv: nn.Conv2d) -> torch.Tensor:
    """A depthwise kernel that is the identity: 1 at the centre tap, 0 elsewhere."""
    kh, kw = conv.kernel_size
    eye = conv.weight.new_zeros(conv.weight.shape)
    eye[:, :, kh // 2, kw // 2] = 1.0
    return eye


def dwconv_nhwc(x: torch.Tensor, conv: nn.Conv2d, residual: bool = False) -> torch.Tensor:
    """Apply a (depthwise) conv to channels-last tokens (B, H, W, C) without copies.

    The conv sees the NCHW view of the NHWC tensor (channels-last memory format), so oneDNN
    runs its channels-last kernel and the result, permuted back, is a contiguous (B, H, W, C).

    Args:
        x: Tokens (B, H, W, C).
        conv: A stride-1, same-padding depthwise conv when ``residual`` is set.
        residual: Return ``x + conv(x)`` computed as one conv whose centre tap is increased by
            one (exact in real arithmetic; the gradient w.r.t. ``conv.weight`` is unchanged),
            which saves the separate addition pass.
    """
    weight, bias = conv.weight, conv.bias
    if weight.dtype != x.dtype:  # LePE of a half/bf16 model runs in float32, as under autocast
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    if residual:
        weight = weight + _identity_taps(conv)
    out = F.conv2d(
        x.permute(0, 3, 1, 2), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )
    return out.permute(0, 2, 3, 1)


_ONEDNN_ACTS = {None: 'none', 'relu': 'relu', 'gelu': 'gelu', 'silu': 'swish'}
_HAS_ONEDNN_FUSION = all(
    hasattr(torch.ops.mkldnn, op)
    for op in ('_linear_pointwise', '_convolution_pointwise', '_convolution_pointwise_')
)


def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's fused linear/conv kernels may run: CPU float32 without autograd,
    autocast or tracing (the bias, activation or residual addition in the kernel's epilogue)."""
    return (
        _HAS_ONEDNN_FUSION
        and not torch.is_grad_enabled()
        and x.device.type == 'cpu'
        and x.dtype == weight.dtype == torch.float32
        and not _autocast('cpu')
        and not _tracing()
        and torch.backends.mkldnn.is_available()
    )


def linear_act(x: torch.Tensor, linear: nn.Linear | tuple, act: str | None = None) -> torch.Tensor:
    """``act(linear(x))`` for ``act`` in None/relu/gelu (exact)/silu.

    Without autograd on CPU float32 it is one oneDNN GEMM with the bias and the activation in its
    epilogue (no separate bias and activation passes over the output); otherwise the module is
    called (its hooks run) and the activation follows, in place when there is no autograd.

    Args:
        x: Input (..., C_in).
        linear: An ``nn.Linear``, or a ``(weight, bias)`` pair.
        act: Activation name or None.
    """
    weight, bias = (linear.weight, linear.bias) if isinstance(linear, nn.Module) else linear
    if _onednn_ok(x, weight):
        algorithm = 'none' if act == 'gelu' else ''
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, _ONEDNN_ACTS[act], [], algorithm)
    y = linear(x) if isinstance(linear, nn.Module) else F.linear(x, weight, bias)
    inplace = not torch.is_grad_enabled()
    if act == 'relu':  # in place with autograd too: ReLU's backward reads its output only
        return F.relu(y, inplace=True)
    if act == 'silu':
        return F.silu(y, inplace=inplace)
    if act == 'gelu':
        return torch.ops.aten.gelu_(y) if inplace else F.gelu(y)
    return y


def _linear_residual(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``; without autograd the product accumulates into ``residual``."""
    if (
        torch.is_grad_enabled()
        or _tracing()  # an in-place add into a view is recorded wrongly by the JIT tracer
        or not (residual.dtype == x.dtype == linear.weight.dtype)
        or not residual.is_contiguous()
    ):
        return residual + linear(x)
    out = residual.view(-1, residual.shape[-1])
    out.addmm_(x.reshape(-1, x.shape[-1]), linear.weight.t())
    if linear.bias is not None:
        out.add_(linear.bias)
    return residual


class _EluPlusOne(torch.autograd.Function):
    """``ELU(x) + 1`` computed as ``exp(min(x, 0)) + max(x, 0)``, keeping only the output.

    The derivative is ``min(y, 1)`` of the output ``y`` (``exp(x) = y`` below zero, 1 above).
    """

    @staticmethod
    def forward(ctx, x):
        y = torch.clamp_max(x, 0.0).exp_().add_(torch.clamp_min(x, 0.0))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * torch.clamp_max(y, 1.0)


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``ELU(x) + 1``, the positive feature map of q and k.

    ATen's ELU evaluates ``expm1`` element by element (about ten times slower than its vectorised
    ``exp`` on this CPU), so it is computed as ``exp(min(x, 0)) + max(x, 0)``: the same value above
    zero, and within an ulp of 1 below it. Without autograd ``x`` (contiguous) is overwritten
    with the result, chunk by cache-sized chunk; tracing and export keep the ELU operator.
    """
    if _tracing():
        return F.elu(x) + 1.0
    if torch.is_grad_enabled() or not x.is_contiguous():
        return _EluPlusOne.apply(x)
    flat, step = x.view(-1), 2**18  # 1 MB chunks: the temporary stays in the L2 cache
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        negative = torch.clamp_max(chunk, 0.0).exp_()  # before the chunk is overwritten
        chunk.clamp_min_(0.0).add_(negative)
    return x


class _Recomputing:
    """Context of a checkpoint's recomputation (counted, as recomputations may nest)."""

    depth = 0

    def __enter__(self) -> None:
        type(self).depth += 1

    def __exit__(self, *exc) -> None:
        type(self).depth -= 1


def checkpoint(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with activation checkpointing (non-reentrant); during the recomputation
    BatchNorm layers of :class:`ConvLayer` leave their running statistics as they are, so that
    a training step updates them once, as without checkpointing."""
    contexts = lambda: (contextlib.nullcontext(), _Recomputing())  # noqa: E731
    return cp.checkpoint(fn, x, use_reentrant=False, context_fn=contexts)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
# The MLP (inference and training), the patch merging and the stem's stride-2 conv (inference)
# run over chunks of tokens / bands of rows, so that their 4x / 8x-wide hidden tensors hold at
# most this many elements (16 MB in float32) at a time.
CHUNK_ELEMENTS = 2**22


def _rows_per_chunk(elements_per_row: int) -> int:
    """How many rows (tokens, or rows of a feature map) keep a chunk within CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // elements_per_row)


class ConvLayer(nn.Module):
    """Conv2d -> optional BatchNorm -> optional ReLU; BatchNorm is folded in at inference."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias
        )
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU() if act else None

    def forward(self, x: torch.Tensor, padding: tuple | None = None) -> torch.Tensor:
        """Conv, BatchNorm, ReLU; ``padding`` overrides the conv's (inference only, for bands)."""
        if self.norm_training:
            x = self._batch_norm(self.conv(x))
            return x if self.act is None else F.relu(x, inplace=True)  # backward reads the result
        weight, bias = self._folded()
        conv = self.conv
        padding = conv.padding if padding is None else padding
        if _onednn_ok(x, weight):  # one kernel with the bias and ReLU in its epilogue
            act = 'relu' if self.act is not None else 'none'
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, padding, conv.stride, conv.dilation, conv.groups, act, [], ''
            )
        x = F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)
        return x if self.act is None else F.relu(x, inplace=True)

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``; without autograd on CPU the conv accumulates into it."""
        conv = self.conv
        if self.act is None and not self.norm_training and _onednn_ok(x, conv.weight):
            weight, bias = self._folded()
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, weight, bias, conv.padding, conv.stride, conv.dilation, conv.groups,
                'add', 1.0, None, [], None,
            )  # fmt: skip
        y = self(x)
        return y.add_(residual) if not torch.is_grad_enabled() else y + residual

    @property
    def norm_training(self) -> bool:
        return self.norm is not None and self.norm.training

    def _batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Training-mode BatchNorm; a checkpoint's recomputation restores the running statistics
        afterwards (any BatchNorm class, SyncBatchNorm included)."""
        bn = self.norm
        if not (_Recomputing.depth and bn.track_running_stats):
            return bn(x)
        buffers = [
            b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None
        ]
        saved = [b.clone() for b in buffers]
        try:  # the recomputation may stop early, by an exception raised inside bn(x)
            return bn(x)
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, saved):
                    b.copy_(v)

    def _folded(self) -> tuple:
        """Conv weight and bias with the (inference-mode) BatchNorm folded in."""
        conv, bn = self.conv, self.norm
        if bn is None:
            return conv.weight, conv.bias
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        return conv.weight * scale.reshape(-1, 1, 1, 1), bias

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A 1x1 ConvLayer on channels-last tokens (B, H, W, C_in) -> (B, H, W, C_out).

        The 1x1 conv is a linear layer of the tokens (one GEMM, no layout change); BatchNorm is
        folded in at inference and runs on the NCHW view of the tokens in training.
        """
        act = 'relu' if self.act is not None else None
        if not self.norm_training:
            weight, bias = self._folded()
            return linear_act(x, (weight.flatten(1), bias), act)
        x = F.linear(x, self.conv.weight.flatten(1), self.conv.bias)
        x = self._batch_norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x if act is None else F.relu(x, inplace=True)


class Stem(nn.Module):
    """Convolutional stem: stride-4 patch embedding with a residual 3x3 pair."""

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        mid = embed_dims // 2
        self.conv1 = ConvLayer(in_channels, mid, 3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Sequential(
            ConvLayer(mid, mid, 3, padding=1, bias=False),
            ConvLayer(mid, mid, 3, padding=1, bias=False, act=False),
        )
        self.conv3 = nn.Sequential(
            ConvLayer(mid, embed_dims * 4, 3, stride=2, padding=1, bias=False),
            ConvLayer(embed_dims * 4, embed_dims, 1, bias=False, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> channels-last tokens (B, ceil(H/4), ceil(W/4), C)."""
        h, w = x.shape[-2:]
        # bottom/right zero padding to a multiple of 4; always traced, so that an exported or
        # compiled graph pads whatever size it is later given
        if _tracing() or h % 4 or w % 4:
            # non-negative floor divisions only: symbolic '%' breaks torch.compile's dynamic
            # shapes, and ONNX integer division truncates (negative operands would round wrong)
            x = F.pad(x, (0, (w + 3) // 4 * 4 - w, 0, (h + 3) // 4 * 4 - h))
        # channels-last convs: oneDNN's fastest path, and the NHWC tokens come out copy-free
        x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        x = self.conv2[1].add_to(self.conv2[0](x), x)
        if not (torch.is_grad_enabled() or _tracing() or self.conv3[0].norm_training):
            return self._conv3_bands(x)
        x = self.conv3[0](x).permute(0, 2, 3, 1)
        return self.conv3[1].forward_tokens(x)

    def _conv3_bands(self, x: torch.Tensor) -> torch.Tensor:
        """``conv3`` at inference over bands of output rows, so that its 4x-wide hidden tensor
        (the largest of the model) never exists whole.

        Output rows ``[r0, r1)`` of the stride-2 3x3 conv read input rows ``2 r0 - 1 .. 2 r1 - 1``
        (row -1 is the zero padding, which the first band keeps; the others slice it out).
        """
        wide, project = self.conv3
        b, _, h, w = x.shape
        out = x.new_empty(b, h // 2, w // 2, project.conv.out_channels)
        rows = _rows_per_chunk(b * (w // 2) * wide.conv.out_channels)
        for r0 in range(0, h // 2, rows):
            r1 = min(r0 + rows, h // 2)
            if r0 == 0:
                t = wide(x[:, :, : 2 * r1])
            else:
                t = wide(x[:, :, 2 * r0 - 1 : 2 * r1], padding=(0, 1))
            out[:, r0:r1] = project.forward_tokens(t.permute(0, 2, 3, 1))
        return out


class PatchMerging(nn.Module):
    """Downsample by 2: 1x1 conv (x8 channels) -> depthwise 3x3 stride 2 -> 1x1 conv + BN."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        out_dim = 2 * dim
        hidden = int(out_dim * ratio)
        self.conv = nn.Sequential(
            ConvLayer(dim, hidden, 1, norm=False),
            ConvLayer(hidden, hidden, 3, stride=2, padding=1, groups=hidden, norm=False),
            ConvLayer(hidden, out_dim, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        h, w = x.shape[1:3]
        if _tracing() or h % 2 or w % 2:  # odd sizes: pad *before* the 1x1 conv
            x = F.pad(x, (0, 0, 0, w - w // 2 * 2, 0, h - h // 2 * 2))  # floor div, as above
        expand, dwconv, project = self.conv
        if not (torch.is_grad_enabled() or _tracing() or project.norm.training):
            return self._forward_bands(x)
        x = expand.forward_tokens(x)  # 1x1 convs as token GEMMs: no NCHW round trip
        x = dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return project.forward_tokens(x)

    def _forward_bands(self, x: torch.Tensor) -> torch.Tensor:
        """Inference over bands of output rows, so the 8x-wide hidden tensor never exists whole.

        Output rows ``[r0, r1)`` of the stride-2 3x3 conv read input rows ``2 r0 - 1 .. 2 r1 - 1``.
        Each band expands its own rows ``2 r0 .. 2 r1 - 1`` once and runs the conv with a zero
        row on top; the top kernel row's taps on the previous band's last row (the zero row's
        place) are then added to the band's first output row before the ReLU.
        """
        expand, dwconv, project = self.conv
        b, h, w, _ = x.shape
        out = x.new_empty(b, h // 2, w // 2, project.conv.out_channels)
        rows = _rows_per_chunk(2 * b * w * expand.conv.out_channels)
        weight, bias, groups = dwconv.conv.weight, dwconv.conv.bias, dwconv.conv.groups
        halo = None  # the previous band's last expanded row, NCHW (B, C, 1, W)
        for r0 in range(0, h // 2, rows):
            r1 = min(r0 + rows, h // 2)
            t = expand.forward_tokens(x[:, 2 * r0 : 2 * r1]).permute(0, 3, 1, 2)
            y = F.conv2d(t, weight, bias, 2, 1, 1, groups)
            if halo is not None:
                y[:, :, :1] += F.conv2d(halo, weight[:, :, :1], None, (1, 2), (0, 1), 1, groups)
            halo = t[:, :, -1:]
            out[:, r0:r1] = project.forward_tokens(F.relu_(y).permute(0, 2, 3, 1))
        return out


class _MlpFunction(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` for training, over chunks of tokens, keeping only the pre-activation.

    Plain autograd keeps both 4x-wide tensors (GELU's input, and its output for ``fc2``'s weight
    gradient); here the backward recomputes GELU from the kept input (the same values, bit for
    bit), which saves a quarter of the block's activation memory. Forward and backward run over
    chunks of at most :data:`CHUNK_ELEMENTS` hidden activations (the pre-activation is kept as
    those chunks), so no 4x-wide tensor exists whole: at high resolution a whole one is large
    enough that the allocator maps fresh pages for it every step, and page faults then cost more
    than the GEMMs. The weight gradients accumulate over the chunks.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        tokens = x.reshape(-1, x.shape[-1])
        step = _rows_per_chunk(w1.shape[0])
        out = tokens.new_empty(tokens.shape[0], w2.shape[0])
        pres = []
        for start in range(0, tokens.shape[0], step):
            pre = F.linear(tokens[start : start + step], w1, b1)
            out[start : start + step] = F.linear(F.gelu(pre), w2, b2)
            pres.append(pre)
        ctx.step = step
        ctx.save_for_backward(x, w1, w2, *pres)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, *pres = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1])
        tokens = x.reshape(-1, x.shape[-1])
        grad_x = torch.empty_like(tokens) if need[0] else None
        grad_w1 = torch.zeros_like(w1) if need[1] else None
        grad_b1 = w1.new_zeros(w1.shape[0]) if need[2] else None
        grad_w2 = torch.zeros_like(w2) if need[3] else None
        for i, pre in enumerate(pres):
            rows = slice(i * ctx.step, i * ctx.step + pre.shape[0])
            g = grad[rows]
            if need[3]:
                grad_w2.addmm_(g.t(), F.gelu(pre))
            if need[0] or need[1] or need[2]:
                grad_pre = torch.ops.aten.gelu_backward(g @ w2, pre)
                if need[0]:
                    torch.mm(grad_pre, w1, out=grad_x[rows])
                if need[1]:
                    grad_w1.addmm_(grad_pre.t(), tokens[rows])
                if need[2]:
                    grad_b1 += grad_pre.sum(0)
        grad_b2 = grad.sum(0) if need[4] else None
        grad_x = grad_x.view_as(x) if need[0] else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if torch.is_grad_enabled() and not (_tracing() or _autocast(x.device.type)):
            return _MlpFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return fc2(self.act(fc1(x)))


class LinearAttention(nn.Module):
    """Linear attention with RoPE on q/k and LePE on v.

    ``q, k = ELU(W x) + 1``, ``v = x``. Per head, with ``N`` tokens::

        out = (RoPE(q) @ (RoPE(k)^T @ v) / N) / (q . mean(k) + 1e-6) + LePE(v)

    The normaliser uses the un-rotated q and k. Under autocast the products run in float32.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads or dim % 4:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads} and by 4')
        self.dim = dim
        self.num_heads = num_heads
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C).

        q and k come out of one GEMM as a (B, N, 2, C) tensor and are rotated together
        (:func:`rope_rotate`). The heads are a batch dimension of strided views, so each product
        is one batched GEMM over all heads without a transpose copy; see :meth:`_attend`.
        """
        b, h, w, c = x.shape
        grad = torch.is_grad_enabled()
        qk = linear_act(x, self.qk)
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            v = x.to(dtype)
            qk = elu_plus_one(qk.to(dtype)).view(b, h * w, 2, c)
            lepe = dwconv_nhwc(v, self.lepe).view(b, h * w, c)  # float32 weights and input
            if grad or _tracing():
                out = self._attend(qk, v.view(b, h * w, c), lepe, h, w)
            else:
                out = self._attend_inplace(qk, v.view(b, h * w, c), lepe, h, w)
        return out.view(b, h, w, c).to(x.dtype)

    def _attend(self, qk, v, lepe, h: int, w: int) -> torch.Tensor:
        """The attention core as four batched products over (B, heads) (autograd, tracing).

        Args:
            qk: (B, N, 2, C) ``ELU + 1`` of q and k.
            v: (B, N, C) values.
            lepe: (B, N, C) LePE of the values.

        Returns:
            Tensor: (B, N, C), ``LePE(v)`` plus the attention output.
        """
        heads, n = self.num_heads, h * w

        def split(t):  # (B, N, C) -> (B, heads, N, d), a view
            return t.unflatten(-1, (heads, -1)).transpose(1, 2)

        q, k = qk.unbind(2)
        q_rot, k_rot = rope_rotate(qk, h, w).unbind(2)
        k_mean = split(k).mean(2, keepdim=True)  # (B, heads, 1, d)
        # the normaliser as (1 x d) @ (d x N), a fast GEMM shape
        z = 1.0 / ((k_mean @ split(q).transpose(-2, -1)).transpose(-2, -1) + 1e-6)  # (B, h, N, 1)
        kv = (split(k_rot).transpose(-2, -1) @ split(v)) * (1.0 / n)  # (B, heads, d, d)
        out = (split(q_rot) * z) @ kv  # (B, heads, N, d)
        return (lepe.unflatten(-1, (heads, -1)) + out.transpose(1, 2)).flatten(2)

    def _attend_inplace(self, qk, v, lepe, h: int, w: int) -> torch.Tensor:
        """:meth:`_attend` without autograd: rotation, scaling and the output product run in
        place (the products accumulate into ``lepe``), per image, on strided per-head views."""
        b, n, _, c = qk.shape
        heads, d = self.num_heads, c // self.num_heads

        def split(t):  # (N, C) -> (heads, N, d), a view
            return t.view(n, heads, d).transpose(0, 1)

        k_mean = qk[:, :, 1].mean(1).view(b, heads, 1, d)
        z = []  # (heads, N, 1) per image; as a (1 x d) @ (d x N) product: a fast GEMM shape
        for i in range(b):
            dots = torch.bmm(k_mean[i], split(qk[i, :, 0]).transpose(1, 2))  # (heads, 1, N)
            z.append(dots.add_(1e-6).reciprocal_().transpose(1, 2))
        rot = rope_rotate(qk, h, w, inplace=True)
        for i in range(b):
            kv = torch.bmm(split(rot[i, :, 1]).transpose(1, 2), split(v[i])).mul_(1.0 / n)
            split(lepe[i]).baddbmm_(split(rot[i, :, 0]).mul_(z[i]), kv)
        return lepe

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}'


class MLLABlock(nn.Module):
    """CPE -> LN -> (in_proj -> DWConv -> SiLU -> LinearAttention) * SiLU(act_proj) -> out_proj,
    residual; CPE -> LN -> MLP, residual. Tokens are channels-last (B, H, W, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.SiLU()
        self.attn = LinearAttention(dim, num_heads, qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), all intermediates channels-last.

        The CPE residuals run as one conv each (:func:`dwconv_nhwc` with ``residual=True``);
        without autograd the gate, activations and residual additions run in place.
        """
        no_grad = not torch.is_grad_enabled()
        x = dwconv_nhwc(x, self.cpe1, residual=True)
        shortcut = x
        x = self.norm1(x)
        gate = linear_act(x, self.act_proj, 'silu')
        x = F.silu(dwconv_nhwc(linear_act(x, self.in_proj), self.dwc), inplace=no_grad)
        x = self.attn(x)
        x = x.mul_(gate) if no_grad else x * gate
        if isinstance(self.drop_path, nn.Identity) or not self.training:
            x = _linear_residual(x, self.out_proj, shortcut)
        else:
            x = shortcut + self.drop_path(self.out_proj(x))
        x = dwconv_nhwc(x, self.cpe2, residual=True)
        no_drop = isinstance(self.drop_path, nn.Identity) or not self.training
        if no_grad and no_drop and not _tracing() and x.is_contiguous():
            return self._mlp_inplace(x)
        if not no_grad:
            return x + self.drop_path(self.mlp(self.norm2(x)))
        hidden = linear_act(self.norm2(x), self.mlp.fc1, 'gelu')
        if no_drop:
            return _linear_residual(hidden, self.mlp.fc2, x)
        return x + self.drop_path(self.mlp.fc2(hidden))

    def _mlp_inplace(self, x: torch.Tensor) -> torch.Tensor:
        """``x + MLP(LN(x))`` without autograd, in place, over chunks of tokens.

        Every op of the MLP is per token, so chunks of at most :data:`CHUNK_ELEMENTS` hidden
        activations give the same result while the 4x-wide hidden tensor never exists whole:
        lower peak memory, and chunk buffers the allocator reuses instead of fresh pages.
        """
        tokens = x.view(-1, x.shape[-1])
        step = _rows_per_chunk(self.mlp.fc1.out_features)
        for start in range(0, tokens.shape[0], step):
            rows = tokens[start : start + step]
            hidden = linear_act(self.norm2(rows), self.mlp.fc1, 'gelu')
            out = _linear_residual(hidden, self.mlp.fc2, rows)
            if out is not rows:  # mixed dtypes under autocast: not accumulated in place
                rows.copy_(out)
        return x


class MLLAStage(nn.Module):
    """``depth`` MLLA blocks, then an optional :class:`PatchMerging` (named ``downsample``)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_paths: Sequence[float],
        downsample: bool,
        with_cp: bool = False,
    ) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.blocks = nn.ModuleList(
            MLLABlock(dim, num_heads, mlp_ratio, qkv_bias, drop_paths[i]) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks on (B, H, W, C); the caller applies ``downsample``."""
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = checkpoint(block, x)
            else:
                x = block(x)
        return x


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
@MODELS.register_module()
class MLLA(BaseModule):
    """MLLA backbone for detection, segmentation and classification.

    Args:
        arch: ``'tiny'|'t'``, ``'small'|'s'``, ``'base'|'b'``, or a dict with ``embed_dims``
            (int), ``depths`` and ``num_heads`` (4-tuples).
        in_channels: Channels of the input image.
        mlp_ratio: Hidden width of the MLP relative to the stage width.
        qkv_bias: Bias in the q/k projection.
        drop_path_rate: Stochastic depth rate, linearly increasing over all blocks.
        out_indices: Stages whose outputs are returned; each gets a LayerNorm ``norm{i}``.
        frozen_stages: -1 freezes nothing; 0 the stem; ``k > 0`` the stem, stages ``0..k-1``
            and their output norms (kept in eval mode).
        norm_eval: Keep BatchNorm layers in eval mode during training.
        with_cp: Activation checkpointing of every block, the stem and the patch mergings
            (saves most activation memory, costs a recomputation).
        checkpoint_key: Entry of an official ImageNet checkpoint to load the weights from:
            ``'model'``, or the EMA weights (``'model_ema'``/``'state_dict_ema'``) on request.
        map_cls_norm: Load the final ``norm`` of an official ImageNet classifier into ``norm3``
            (what gives the official logits in classification). With False it is left out
            (reported as unexpected) and ``norm3`` keeps its initialisation, as in the official
            detection and segmentation code, which loads the classifier with ``strict=False``.
        init_cfg: mmengine init config (a dict or a list of dicts, any initialiser), e.g.
            ``dict(type='Pretrained', checkpoint=PATH)`` with an official MLLA ImageNet or
            downstream checkpoint, or this package's own.
        pretrained: Deprecated (mmseg's segmentor-level ``pretrained=`` lands here): a
            checkpoint path, the same as ``init_cfg=dict(type='Pretrained', checkpoint=PATH)``.

    Shapes:
        Input (B, in_channels, H, W) of any H, W >= the largest output stride; outputs a tuple of
        (B, C_i, ceil(H / 2**(i+2)), ceil(W / 2**(i+2))) tensors for ``i`` in ``out_indices``.
    """

    arch_zoo = {
        **dict.fromkeys(
            ['t', 'tiny'], {'embed_dims': 64, 'depths': (2, 4, 8, 4), 'num_heads': (2, 4, 8, 16)}
        ),
        **dict.fromkeys(
            ['s', 'small'], {'embed_dims': 64, 'depths': (3, 6, 21, 6), 'num_heads': (2, 4, 8, 16)}
        ),
        **dict.fromkeys(
            ['b', 'base'], {'embed_dims': 96, 'depths': (3, 6, 21, 6), 'num_heads': (3, 6, 12, 24)}
        ),
    }
    num_stages = 4

    def __init__(
        self,
        arch: str | dict = 'tiny',
        in_channels: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.2,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        with_cp: bool = False,
        checkpoint_key: str = 'model',
        map_cls_norm: bool = True,
        init_cfg: dict | list | None = None,
        pretrained: str | None = None,
    ) -> None:
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError(
                    'MLLA got both pretrained= and init_cfg=; pretrained= is deprecated: set only '
                    "init_cfg=dict(type='Pretrained', checkpoint=...)"
                )
            if not isinstance(pretrained, str):
                raise TypeError(
                    f'pretrained must be a checkpoint path, got {type(pretrained).__name__}'
                )
            warnings.warn(
                'MLLA: pretrained= is deprecated, use '
                f"init_cfg=dict(type='Pretrained', checkpoint={pretrained!r}) instead",
                DeprecationWarning,
                stacklevel=2,
            )
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        self.checkpoint_key = checkpoint_key
        self.map_cls_norm = map_cls_norm
        self.arch = self._parse_arch(arch)
        embed_dims, depths, num_heads = (
            self.arch[k] for k in ('embed_dims', 'depths', 'num_heads')
        )
        self.embed_dims, self.depths, self.num_heads = embed_dims, tuple(depths), tuple(num_heads)
        self.in_channels = in_channels
        self.num_features = [embed_dims * 2**i for i in range(self.num_stages)]
        if isinstance(out_indices, int):
            out_indices = (out_indices,)
        out_indices = tuple(i + self.num_stages if i < 0 else i for i in out_indices)
        if not out_indices or any(not 0 <= i < self.num_stages for i in out_indices):
            raise ValueError(f'out_indices must be stage indices in 0..3, got {out_indices}')
        self.out_indices = tuple(sorted(set(out_indices)))
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be in -1..4, got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp

        self.patch_embed = Stem(in_channels, embed_dims)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            start = sum(self.depths[:i])
            self.layers.append(
                MLLAStage(
                    self.num_features[i],
                    depth,
                    heads,
                    mlp_ratio,
                    qkv_bias,
                    dpr[start : start + depth],
                    downsample=i < self.num_stages - 1,
                    with_cp=with_cp,
                )
            )
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(self.num_features[i]))

        self._register_load_state_dict_pre_hook(self._load_hook)
        self._freeze_stages()

    @classmethod
    def _parse_arch(cls, arch: str | dict) -> dict:
        if isinstance(arch, str):
            if arch.lower() not in cls.arch_zoo:
                raise KeyError(
                    f'Unknown MLLA arch {arch!r}; choose one of {sorted(cls.arch_zoo)} or pass a '
                    "dict with 'embed_dims', 'depths' and 'num_heads'"
                )
            return dict(cls.arch_zoo[arch.lower()])
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a name or a dict, got {type(arch).__name__}')
        missing = {'embed_dims', 'depths', 'num_heads'} - set(arch)
        if missing:
            raise KeyError(
                f'Custom MLLA arch is missing {sorted(missing)}; got keys {sorted(arch)}'
            )
        if len(arch['depths']) != cls.num_stages or len(arch['num_heads']) != cls.num_stages:
            raise ValueError('Custom MLLA arch needs 4 depths and 4 num_heads')
        return dict(arch)

    # ----------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """The official initialisation, then ``init_cfg`` as mmengine's ``BaseModule`` does.

        Linear layers get a truncated normal (std 0.02) and zero bias, LayerNorms 1/0; then every
        entry of ``init_cfg`` (a dict or a list, any mmengine initialiser) is applied, pretrained
        weights last. A ``Pretrained`` entry whose file is missing, corrupt or not a checkpoint
        fails before anything is loaded.
        """
        if self.is_init:
            return super().init_weights()  # mmengine warns that it ran before, and does nothing
        cfgs = self.init_cfg if isinstance(self.init_cfg, list) else [self.init_cfg]
        for cfg in cfgs:
            if isinstance(cfg, dict) and cfg.get('type') in ('Pretrained', PretrainedInit):
                check_checkpoint_file(cfg.get('checkpoint'), what='Pretrained checkpoint')
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        super().init_weights()

    def _load_hook(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Accept official checkpoints unchanged (see :func:`convert_official_state_dict`).

        mmengine hands over a file without a ``state_dict`` entry whole, so the official ImageNet
        file arrives as ``{'model': {...}, ...}``: its ``checkpoint_key`` entry is unwrapped. A
        whole detector/segmentor/classifier state dict (``backbone.*`` keys) is accepted too.
        """
        entries = sorted(k for k, v in state_dict.items() if isinstance(v, dict))
        if self.checkpoint_key != 'model' and entries and self.checkpoint_key not in entries:
            raise KeyError(
                f'checkpoint_key={self.checkpoint_key!r}: the checkpoint has no such entry; its '
                f"entries are {entries}. Official ImageNet files keep the weights in 'model' "
                "(and EMA weights, where saved, in 'model_ema' or 'state_dict_ema')."
            )
        if isinstance(state_dict.get(self.checkpoint_key), dict):
            weights = state_dict[self.checkpoint_key]
            state_dict.clear()
            state_dict.update({prefix + k: v for k, v in weights.items()})
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not any(k[len(prefix) :].startswith('patch_embed.') for k in own):
            nested = {k: v for k, v in own.items() if k.startswith(prefix + 'backbone.')}
            if nested:
                print_log(f'{type(self).__name__}: loading the backbone.* part of a whole model')
                own = {prefix + k[len(prefix) + len('backbone.') :]: v for k, v in nested.items()}
        out_indices = self.out_indices if self.map_cls_norm else ()
        converted = convert_official_state_dict(
            {k[len(prefix) :]: v for k, v in own.items()}, out_indices=out_indices
        )
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        state_dict.update({prefix + k: v for k, v in converted.items()})
        self.check_fits(converted)

    def check_fits(self, state_dict: dict) -> None:
        """Raise if backbone weights (``patch_embed.*``, ``layers.*`` keys) are of another model.

        Checked: every tensor's shape, and that the checkpoint has exactly this model's blocks
        (MLLA-T and MLLA-S have the same widths, so only the block count tells them apart).
        Tolerated, as mmengine reports them: keys outside the backbone (a classifier head),
        output norms that one of the two lacks, and a checkpoint without any backbone weights.

        Raises:
            ValueError: Naming the first mismatching tensor, or the extra and missing blocks,
                and the ``arch`` that fits the checkpoint.
        """
        found = checkpoint_arch(state_dict)
        if found is None:
            return
        expected = self.state_dict()
        ours = f'embed_dims={self.embed_dims}, depths={self.depths}'
        for key, value in state_dict.items():
            if key in expected and tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f'Checkpoint does not fit this MLLA ({ours}): {key!r} has shape '
                    f'{tuple(value.shape)}, expected {tuple(expected[key].shape)}. It is a '
                    f'checkpoint of another variant: set arch={_arch_hint(found)}'
                )
        have = {_block_of(k) for k in state_dict} - {None}
        ours_blocks = {_block_of(k) for k in expected} - {None}
        extra, missing = sorted(have - ours_blocks), sorted(ours_blocks - have)
        if extra or missing:

            def show(b: list) -> str:
                return ', '.join(f'layers.{i}.blocks.{j}' for i, j in b[:6]) + (
                    ' ...' if len(b) > 6 else ''
                )

            raise ValueError(
                f'Checkpoint does not fit this MLLA ({ours}): it has depths {found["depths"]}'
                + (f'; extra blocks: {show(extra)}' if extra else '')
                + (f'; missing blocks: {show(missing)}' if missing else '')
                + f'. It is a checkpoint of another variant: set arch={_arch_hint(found)}'
            )

    # ----------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f'MLLA expects a 4-D NCHW image batch, got shape {tuple(x.shape)}; '
                'add a batch dimension with x[None] for a single image'
            )
        if x.shape[1] != self.in_channels:
            hint = ' (it looks NHWC: permute with x.permute(0, 3, 1, 2))'
            hint = hint if x.shape[-1] == self.in_channels else ''
            raise ValueError(
                f'MLLA expects NCHW input with {self.in_channels} channels, got shape '
                f'{tuple(x.shape)}{hint}'
            )
        stride = 2 ** (max(self.out_indices) + 2)
        if x.shape[2] < stride or x.shape[3] < stride:
            raise ValueError(
                f'Input {x.shape[2]}x{x.shape[3]} is smaller than the output stride {stride} of '
                f'stage {max(self.out_indices)}; resize it to at least {stride}x{stride}'
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, C_in, H, W) -> tuple of NCHW features, one per index in ``out_indices``."""
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self._check_input(x)
        weight = self.patch_embed.conv1.conv.weight
        if x.dtype != weight.dtype and x.is_floating_point() and not _autocast(x.device.type):
            x = x.to(weight.dtype)  # a half/bf16 model (model.half()) fed float32 images
        x = self._maybe_checkpoint(self.patch_embed, x)
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x).permute(0, 3, 1, 2).contiguous())
            if i == max(self.out_indices):
                break
            x = self._maybe_checkpoint(stage.downsample, x)
        return tuple(outs)

    def _maybe_checkpoint(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """With ``with_cp`` the stem and the patch mergings are checkpointed too (their wide
        conv activations are a large part of the memory at high resolution)."""
        use_cp = (  # the parameter scan only when with_cp is on
            self.with_cp
            and torch.is_grad_enabled()
            and not _tracing()
            and any(p.requires_grad for p in module.parameters())
        )
        return checkpoint(module, x) if use_cp else module(x)

    # ----------------------------------------------------------------------------------------
    def _freeze_stages(self) -> None:
        frozen = []
        if self.frozen_stages >= 0:
            frozen.append(self.patch_embed)
        for i in range(self.frozen_stages):
            frozen.append(self.layers[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        for m in frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> MLLA:
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def get_layer_depth(self, param_name: str, prefix: str = '') -> tuple[int, int]:
        """Layer id of a parameter for layer-wise learning-rate decay.

        The stem is layer 0, block ``j`` of stage ``i`` is ``sum(depths[:i]) + j + 1``, the
        patch merging after stage ``i`` shares the id of the stage's last block, and everything
        else (output norms, heads) gets the last id.

        Returns:
            tuple[int, int]: The layer id and the number of layers.
        """
        num_layers = sum(self.depths) + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        name = param_name[len(prefix) :]
        if name.startswith('patch_embed'):
            return 0, num_layers
        if name.startswith('layers'):
            parts = name.split('.')
            stage = int(parts[1])
            if parts[2] == 'blocks':
                return sum(self.depths[:stage]) + int(parts[3]) + 1, num_layers
            return sum(self.depths[: stage + 1]), num_layers
        return num_layers - 1, num_layers


# --------------------------------------------------------------------------------------------
# Checkpoint filter
# --------------------------------------------------------------------------------------------
def _block_of(key: str) -> tuple[int, int] | None:
    """``(stage, block)`` of a ``layers.{i}.blocks.{j}.*`` key, else None."""
    parts = key.split('.')
    if len(parts) > 3 and parts[0] == 'layers' and parts[2] == 'blocks':
        return int(parts[1]), int(parts[3])
    return None


def checkpoint_arch(state_dict: dict) -> dict | None:
    """The ``embed_dims``, ``depths`` and ``mlp_ratio`` of MLLA backbone weights (this package's
    or the official key layout), read from the tensors; None if there are no backbone weights.

    ``num_heads`` changes no tensor shape, so it cannot be read from weights.
    """
    stem = state_dict.get('patch_embed.conv3.1.conv.weight')
    if stem is None:
        return None
    depths = [0] * MLLA.num_stages
    for key in state_dict:
        block = _block_of(key)
        if block is not None and block[0] < MLLA.num_stages:
            depths[block[0]] = max(depths[block[0]], block[1] + 1)
    fc1 = state_dict.get('layers.0.blocks.0.mlp.fc1.weight')
    ratio = fc1.shape[0] / fc1.shape[1] if fc1 is not None else 4.0
    return dict(embed_dims=int(stem.shape[0]), depths=tuple(depths), mlp_ratio=ratio)


def official_arch_name(found: dict) -> str | None:
    """The official variant (``'tiny'``, ``'small'``, ``'base'``) with these widths and depths."""
    for name in ('tiny', 'small', 'base'):
        arch = MLLA.arch_zoo[name]
        if (
            arch['embed_dims'] == found['embed_dims']
            and tuple(arch['depths']) == tuple(found['depths'])
            and found.get('mlp_ratio', 4.0) == 4.0
        ):
            return name
    return None


def _arch_hint(found: dict) -> str:
    name = official_arch_name(found)
    if name is not None:
        return repr(name)
    return f'dict(embed_dims={found["embed_dims"]}, depths={found["depths"]}, num_heads=...)' + (
        f' and mlp_ratio={found["mlp_ratio"]:g}' if found.get('mlp_ratio', 4.0) != 4.0 else ''
    )


def convert_official_state_dict(
    state_dict: dict, out_indices: Sequence[int] = (0, 1, 2, 3)
) -> dict:
    """Map an official MLLA state dict (classification or downstream) onto :class:`MLLA` keys.

    * ``*.attn.rope.rotations`` buffers are dropped: RoPE is recomputed for the input size.
    * The classification model's final ``norm`` becomes ``norm3`` (applied to the last stage).
    * ``head.*`` stays as it is, so that loading into a backbone reports it as unexpected
      rather than dropping it silently.

    Keys already in this package's layout pass through unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith('attn.rope.rotations'):
            continue
        if key.startswith('norm.') and 3 in out_indices and f'norm3.{key[5:]}' not in state_dict:
            key = 'norm3.' + key[5:]
        out[key] = value
    return out
