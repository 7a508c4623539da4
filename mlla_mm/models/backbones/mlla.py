"""MLLA: Mamba-Like Linear Attention backbone.

Paper: "Demystify Mamba in Vision: A Linear Attention Perspective", Dongchen Han et al.,
NeurIPS 2024, https://arxiv.org/abs/2405.16605. Official code (MIT licence):
https://github.com/LeapLabTHU/MLLA. This is an independent implementation of the same equations
with the same parameter names, so the official checkpoints load unchanged.

The file reads top to bottom as the paper's model: the convolutional stem, the patch merging,
the MLLA block (CPE, the Mamba-like gated linear attention, CPE, MLP), the linear attention with
RoPE and LePE, the stages and the backbone, then the checkpoint filter. Tokens stay
channels-last (B, H, W, C) through a stage. Any input size works (padding as the official
downstream code does); RoPE is computed for the actual token grid and cached, never stored in the
state dict.

Every layer is a module that is called, so forward hooks, LoRA wrappers, dynamic quantisation,
pruning and FLOP counters see and change what runs. The stem, each patch merging and each block
also has a fused CPU inference path (:mod:`.fast_path`), taken as a whole unit when the
conditions of :func:`.fast_path.why_not_fast_path` hold (no autograd, eval mode, CPU, the
standard layer types without hooks, no dispatch mode...) and giving the same result; otherwise
the plain forward below runs. In training, the stem, each patch merging and each block have a
memory-lean unit under the same kind of conditions (:mod:`.train_path`: it keeps a few inputs
and recomputes the rest in the backward). ``MLLA(fast_path=False)`` takes neither. OpenMMLab
backbone arguments: ``out_indices``, ``frozen_stages``, ``norm_eval``, ``with_cp``,
``init_cfg`` and ``get_layer_depth`` for layer-wise learning-rate decay.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import MMLogger, print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import PretrainedInit, trunc_normal_
from torch.nn.modules.batchnorm import _BatchNorm

from mlla_mm.registry import MODELS
from mlla_mm.utils.safe_load import check_checkpoint_file

from . import fast_path, train_path

__all__ = [
    'MLLA',
    'checkpoint_arch',
    'convert_official_state_dict',
    'linear_attention',
    'pretrained_checkpoints',
    'rope_tables',
]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _tracing() -> bool:
    """Whether the forward is being traced, compiled or exported (shapes may be symbolic)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


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


def nhwc_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv`` (an NCHW module) applied to channels-last tokens (B, H, W, C) -> (B, H', W', C').

    The conv sees the NCHW view of the tokens (channels-last memory), so no copy is made and the
    result, permuted back, is contiguous tokens again.
    """
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


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
# Rotary position embedding
# --------------------------------------------------------------------------------------------
def _rope_angles(h: int, w: int, dim: int, base: float, device) -> torch.Tensor:
    k_max = dim // 4
    theta = 1.0 / (base ** (torch.arange(k_max, device=device, dtype=torch.float32) / k_max))
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None, None] * theta
    cols = torch.arange(w, device=device, dtype=torch.float32)[None, :, None] * theta
    return torch.cat([rows.expand(h, w, k_max), cols.expand(h, w, k_max)], dim=-1)


_ROPE_CACHE: dict = {}
_ROPE_LOCK = threading.Lock()
_ROPE_CACHE_SIZE = 256


def rope_tables(h: int, w: int, dim: int, device, dtype, base: float = 10000.0) -> tuple:
    """Cosine and sine tables of the 2-D RoPE over an ``h x w`` token grid.

    Channel pair ``p`` (channels ``2p, 2p+1``) is rotated by ``row * theta_p`` for the first
    ``dim // 4`` pairs and by ``col * theta_{p - dim // 4}`` for the rest, with
    ``theta_k = base ** (-k / (dim // 4))``, as in the official code. Tables depend only on the
    grid, so they are cached (made outside inference mode and autograd, so that any later
    forward may use them); traced and compiled graphs compute them for their symbolic sizes.

    Returns:
        tuple[Tensor, Tensor]: ``cos`` and ``sin``, each of shape (h, w, dim // 2).
    """

    def make() -> tuple:
        angles = _rope_angles(h, w, dim, base, device)
        return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)

    if _tracing():
        return make()
    key = (h, w, dim, base, torch.device(device), dtype)
    tables = _ROPE_CACHE.get(key)
    if tables is None:
        with torch.inference_mode(False), torch.no_grad():
            tables = make()
        with _ROPE_LOCK:
            if len(_ROPE_CACHE) >= _ROPE_CACHE_SIZE:
                _ROPE_CACHE.clear()
            _ROPE_CACHE[key] = tables
    return tables


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` (..., C) by the angles whose cos/sin (..., C / 2) are given.

    Pair ``(re, im)`` becomes ``(re * cos - im * sin, im * cos + re * sin)``: the product of the
    complex numbers ``re + i im`` and ``cos + i sin``, which is how it runs in eager float32 and
    float64 (one pass over ``x``, where the real form makes seven; same values). Traced,
    compiled or exported graphs (ONNX has no complex type), other dtypes and tensor subclasses
    get the real form.
    """
    x = x.unflatten(-1, (-1, 2))
    if (
        not _tracing()  # first: the layout checks below would break a torch.compile graph
        and x.dtype in (torch.float32, torch.float64)
        and type(x) is torch.Tensor
        and x.stride(-1) == 1
        and x.storage_offset() % 2 == 0
        and all(s % 2 == 0 for s in x.stride()[:-1])
    ):
        rotation = torch.complex(cos, sin)
        return torch.view_as_real(torch.view_as_complex(x) * rotation).flatten(-2)
    x_re, x_im = x[..., 0], x[..., 1]
    return torch.stack([x_re * cos - x_im * sin, x_im * cos + x_re * sin], dim=-1).flatten(-2)


# --------------------------------------------------------------------------------------------
# The attention core
# --------------------------------------------------------------------------------------------
def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, heads: int
) -> torch.Tensor:
    """The MLLA linear attention core (the one reference of its equations).

    Per head, with ``N = h * w`` tokens and positive features ``q``, ``k``::

        out = RoPE(q) @ (RoPE(k)^T @ v / N) / (q . mean(k) + 1e-6)

    The normaliser uses the un-rotated q and k.

    Args:
        q, k: (B, N, C) positive features (``ELU + 1`` of the projections).
        v: (B, N, C) values.
        h, w: The token grid (``N = h * w``), for RoPE.
        heads: Number of heads (``C`` splits into ``heads`` groups of ``C / heads`` channels).

    Returns:
        Tensor: (B, N, C) attention output (without LePE).
    """
    n, c = q.shape[1], q.shape[2]
    cos, sin = rope_tables(h, w, c, q.device, q.dtype)
    cos, sin = cos.reshape(h * w, c // 2), sin.reshape(h * w, c // 2)

    def split(t):  # (B, N, C) -> (B, heads, N, d), a view
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)

    q_rope, k_rope = split(apply_rope(q, cos, sin)), split(apply_rope(k, cos, sin))
    q, k, v = split(q), split(k), split(v)
    z = 1.0 / (q @ k.mean(dim=2, keepdim=True).transpose(-2, -1) + 1e-6)  # (B, heads, N, 1)
    kv = (k_rope.transpose(-2, -1) @ v) * (1.0 / n)  # (B, heads, d, d)
    return (q_rope @ kv * z).transpose(1, 2).flatten(2)


class _FeatureAttention(torch.autograd.Function):
    """``linear_attention(ELU(q) + 1, ELU(k) + 1, v)`` saving only its inputs (memory-lean).

    Autograd through :func:`linear_attention` keeps about eight (B, N, C) tensors per block (the
    positive features, both rotations, the product before the normaliser, and at B > 1 copies
    that fold the per-head views into a batch); this saves ``qk`` (the projection) and ``v``
    only and recomputes the element-wise work in backward. The backward is the chain rule of
    :func:`linear_attention`, per image (so per-head views need no copy): the state
    ``kv = RoPE(k)^T v / N`` is d x d per head, so no N x N or wider tensor appears. Any
    device; runs in ``dtype`` and returns gradients in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, qk, v, h, w, heads, dtype):
        ctx.save_for_backward(qk, v)
        ctx.grid = (h, w, heads, dtype)
        q, k = _positive_features(qk.to(dtype)).unbind(2)
        v = v.to(dtype)
        out = torch.empty_like(v)
        for i in range(v.shape[0]):  # per image: the per-head views fold without a copy
            out[i] = linear_attention(q[i, None], k[i, None], v[i, None], h, w, heads)[0]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        qk, v = ctx.saved_tensors
        h, w, heads, dtype = ctx.grid
        grad_qk, grad_v = feature_attention_backward(qk, v, grad, h, w, heads, dtype)
        return grad_qk, grad_v, None, None, None, None


def core_backward(qh, q_rope, k_rope, vh, gh, k_mean, out=None) -> tuple:
    """The products' part of :func:`linear_attention`'s chain rule, for one image, per head:
    from the output's gradient ``gh`` and the features ``qh``, their rotations ``q_rope``,
    ``k_rope``, the values ``vh`` (all (heads, N, d)) and ``k_mean`` (heads, 1, d).

    Overwrites ``q_rope`` and ``k_rope`` with their gradients and writes the forward output
    into ``out`` ((heads, N, d)) if given.

    Returns:
        tuple: the gradient of each token's normaliser sum ``s = q . k_mean + 1e-6``
        (heads, N, 1), the gradient every key feature gets through ``mean(k)`` (heads, 1, d),
        and the values' gradient (heads, N, d).
    """
    n = qh.shape[1]
    z = 1.0 / (qh @ k_mean.transpose(-2, -1) + 1e-6)  # (heads, N, 1)
    kv = (k_rope.transpose(-2, -1) @ vh) * (1.0 / n)  # (heads, d, d)
    # out = (q_rope @ kv) * z with z = 1 / s
    g = gh * z
    attended = q_rope @ kv  # (heads, N, d)
    if out is not None:
        torch.mul(attended, z, out=out)
    grad_s = (gh * attended).sum(-1, keepdim=True).mul_(z).mul_(z).neg_()
    grad_kv = (q_rope.transpose(-2, -1) @ g) * (1.0 / n)  # with kv's 1 / N
    grad_v = k_rope @ grad_kv
    grad_k_mean = (grad_s.transpose(-2, -1) @ qh) * (1.0 / n)
    # the rotations are used up: they take their gradients
    torch.matmul(g, kv.transpose(-2, -1), out=q_rope)
    torch.matmul(vh, grad_kv.transpose(-2, -1), out=k_rope)
    return grad_s, grad_k_mean, grad_v


def feature_attention_backward(
    qk_in: torch.Tensor,
    v_in: torch.Tensor,
    grad: torch.Tensor,
    h: int,
    w: int,
    heads: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`feature_attention` with respect to ``qk`` and ``v``, given the
    output's gradient ``grad`` (the chain rule of :func:`linear_attention`, per image, in
    ``dtype``; returned in the inputs' dtypes). The backward of :class:`_FeatureAttention`, and
    of the training unit of a whole block (:mod:`.train_path`), which also takes the forward
    output, recomputed on the way, in ``out`` (a (B, N, C) tensor of ``dtype``) if given."""
    b, n, c = v_in.shape
    cos, sin = (t.reshape(n, 1, c // 2) for t in rope_tables(h, w, c, qk_in.device, dtype))
    grad_qk, grad_v = torch.empty_like(qk_in), torch.empty_like(v_in)

    def split(t):  # (N, C) -> (heads, N, d), a view
        return t.unflatten(-1, (heads, -1)).transpose(0, 1)

    for i in range(b):  # per image: the per-head views fold without a copy, and the
        # full-precision temporaries below exist for one image at a time
        qk, v, gi = qk_in[i].to(dtype), v_in[i].to(dtype), grad[i].to(dtype)
        # ELU + 1 as exp(min(x, 0)) + max(x, 0): ATen's ELU takes expm1 element by element
        features = fast_path.elu_plus_one_(qk, torch.empty_like(qk)).view(n, 2, c)
        rotated = apply_rope(features, cos, sin)  # q and k rotated at once
        qh, kh = (split(t) for t in features.unbind(1))
        q_rope, k_rope = (split(t) for t in rotated.unbind(1))
        k_mean = kh.mean(dim=1, keepdim=True)  # (heads, 1, d)
        grad_s, grad_k_mean, grad_vh = core_backward(
            qh, q_rope, k_rope, split(v), split(gi), k_mean, None if out is None else split(out[i])
        )
        grad_v[i] = grad_vh.transpose(0, 1).flatten(1)
        # RoPE is a rotation: its transpose rotates back (apply_rope with -sin); then the
        # normaliser's terms, on token-major views (N, heads, d): q's from s = q . k_mean,
        # k's from mean(k) (the same for every token)
        grad_features = apply_rope(rotated, cos, -sin)
        grad_q, grad_k = (t.unflatten(-1, (heads, -1)) for t in grad_features.unbind(1))
        grad_q.addcmul_(grad_s.transpose(0, 1).contiguous(), k_mean.transpose(0, 1))
        grad_k += grad_k_mean.transpose(0, 1)
        # ELU's derivative: 1 above 0, else exp(x), which is the feature there: min(feature, 1)
        torch.mul(grad_features.view(n, 2 * c), features.view(n, 2 * c).clamp_max_(1.0),
                  out=grad_qk[i])  # fmt: skip
    return grad_qk, grad_v


def feature_attention(
    qk: torch.Tensor, v: torch.Tensor, h: int, w: int, heads: int, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`linear_attention` of ``q, k = ELU(qk) + 1`` and ``v``, in ``dtype``.

    Where autograd records (training), outside tracing and compiling, it runs as
    :class:`_FeatureAttention`, which saves only ``qk`` and ``v``; otherwise (inference,
    ``torch.compile``/export, which plan their own graph) the ops of :func:`linear_attention`.
    Same values either way.
    """
    if torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad) and not _tracing():
        return _FeatureAttention.apply(qk, v, h, w, heads, dtype)
    q, k = _positive_features(qk.to(dtype)).unbind(2)
    return linear_attention(q, k, v.to(dtype), h, w, heads)


def _positive_features(qk: torch.Tensor) -> torch.Tensor:
    """``ELU + 1`` of the q/k projection (B, N, 2C) -> (B, N, 2, C): q and k along dim 2."""
    b, n, c2 = qk.shape
    return (F.elu(qk) + 1.0).view(b, n, 2, c2 // 2)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
class ConvLayer(nn.Module):
    """Conv2d -> optional BatchNorm -> optional ReLU."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self._batch_norm(x)
        return x if self.act is None else self.act(x)

    def _batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm; in training, a checkpoint's recomputation restores the running statistics
        afterwards (any BatchNorm class, SyncBatchNorm included)."""
        bn = self.norm
        if not (_Recomputing.depth and bn.training and bn.track_running_stats):
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


class Stem(nn.Module):
    """Convolutional stem: stride-4 patch embedding with a residual 3x3 pair."""

    def __init__(self, in_channels: int, embed_dims: int) -> None:
        super().__init__()
        mid = embed_dims // 2
        self.use_fast_path = True  # see fast_path.why_not_fast_path
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
        x = x.contiguous(memory_format=torch.channels_last)
        if self.use_fast_path and fast_path.why_not_fast_path(self, x) is None:
            return fast_path.stem_forward(self, x)
        if self.use_fast_path and train_path.why_not_train_path(self, x, autocast=True) is None:
            # keeps the conv outputs and BatchNorm statistics, recomputes the rest
            return train_path.stem_forward(self, x, _Recomputing.depth > 0)
        x = self.conv1(x)
        x = x + self.conv2(x)
        return self.conv3(x).permute(0, 2, 3, 1)


class PatchMerging(nn.Module):
    """Downsample by 2: 1x1 conv (x8 channels) -> depthwise 3x3 stride 2 -> 1x1 conv + BN."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        out_dim = 2 * dim
        hidden = int(out_dim * ratio)
        self.use_fast_path = True  # see fast_path.why_not_fast_path
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
        if self.use_fast_path and fast_path.why_not_fast_path(self, x) is None:
            return fast_path.patch_merging_forward(self, x)
        if self.use_fast_path and train_path.why_not_train_path(self, x, autocast=True) is None:
            # keeps the input and the 1x1 output, recomputes the 8x-wide hidden tensors
            return train_path.patch_merging_forward(self, x, _Recomputing.depth > 0)
        return nhwc_conv(self.conv, x)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` (in training a memory-lean unit, :mod:`.train_path`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.use_fast_path = True  # see train_path.why_not_train_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fast_path and train_path.why_not_train_path(self, x) is None:
            return train_path.mlp_forward(self, x)  # keeps GELU's input only
        return self.fc2(self.act(self.fc1(x)))


class LinearAttention(nn.Module):
    """Linear attention with RoPE on q/k and LePE on v (:func:`linear_attention`).

    ``q, k = ELU(W x) + 1``, ``v = x``; the output is ``linear_attention(q, k, v) + LePE(v)``.
    The core (``ELU + 1`` and the products) runs in float32 for half/bf16 input, with autocast
    off, as timm's EfficientViT does for its linear attention.
    """

    # the model's RoPE tables and reference core, and the attention of the features with its
    # backward, as the fused and training units (which do not import this file) take them
    rope_tables = staticmethod(rope_tables)
    core = staticmethod(linear_attention)
    attend = staticmethod(feature_attention)
    attend_backward = staticmethod(feature_attention_backward)

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads or dim % 4:
            raise ValueError(f'dim={dim} must be divisible by num_heads={num_heads} and by 4')
        self.dim = dim
        self.num_heads = num_heads
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), in float32 for half/bf16 input (the block casts it
        back within its gate product)."""
        b, h, w, c = x.shape
        qk = self.qk(x)
        lepe = nhwc_conv(self.lepe, x)
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            qk, v = qk.view(b, h * w, 2 * c), x.view(b, h * w, c)
            out = feature_attention(qk, v, h, w, self.num_heads, dtype)
            return out.view(b, h, w, c) + lepe.to(dtype)

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
        self.use_fast_path = True  # see fast_path.why_not_fast_path
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
        """(B, H, W, C) -> (B, H, W, C)."""
        if self.use_fast_path:
            if fast_path.why_not_fast_path(self, x) is None:
                return fast_path.block_forward(self, x)
            if train_path.why_not_train_path(self, x, autocast=True) is None:
                return train_path.block_forward(self, x)  # training: keeps 6 of 19 tensors
        x = x + nhwc_conv(self.cpe1, x)
        shortcut = x
        x = self.norm1(x)
        gate = self.act(self.act_proj(x))
        x = self.act(nhwc_conv(self.dwc, self.in_proj(x)))
        x = self.out_proj(self.attn(x).to(gate.dtype) * gate)
        x = shortcut + self.drop_path(x)
        x = x + nhwc_conv(self.cpe2, x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


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
        fast_path: Let the stem, the patch mergings and the blocks take their fused CPU
            inference path where its conditions hold (see :mod:`.fast_path`); the result is
            the same either way. False always runs the plain module forward.
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
        fast_path: bool = True,
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

        self.use_fast_path = fast_path
        for m in self.modules():
            if hasattr(m, 'use_fast_path'):
                m.use_fast_path = fast_path
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
        for path in pretrained_checkpoints(self.init_cfg):
            check_checkpoint_file(path, what='Pretrained checkpoint')
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        super().init_weights()

    def _dump_init_info(self) -> None:
        """How each parameter was initialised goes to the log file, as in mmengine; without a
        log file (a backbone built on its own) one debug line replaces mmengine's few thousand
        console lines."""
        logger = MMLogger.get_current_instance()
        if any(isinstance(h, logging.FileHandler) for h in logger.handlers):
            return super()._dump_init_info()
        applied = f', then init_cfg={self.init_cfg}' if self.init_cfg else ''
        print_log(
            f'{type(self).__name__}: official initialisation{applied}', 'current', logging.DEBUG
        )

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
        dtype = next(self.patch_embed.parameters()).dtype
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != dtype and x.is_floating_point() and dtype.is_floating_point and not autocast:
            x = x.to(dtype)  # a half/bf16 model (model.half()) fed float32 images
        x = self._maybe_checkpoint(self.patch_embed, x)
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in self.out_indices:
                outs.append(self._output(getattr(self, f'norm{i}'), x))
            if i == max(self.out_indices):
                break
            x = self._maybe_checkpoint(stage.downsample, x)
        return tuple(outs)

    def _output(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A stage's output: its norm, as a contiguous NCHW tensor."""
        if self.use_fast_path and fast_path.why_not_fast_path(norm, x) is None:
            return fast_path.output_forward(norm, x)
        return norm(x).permute(0, 3, 1, 2).contiguous()

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
def pretrained_checkpoints(init_cfg: dict | list | None) -> list:
    """The ``checkpoint`` of every ``Pretrained`` entry of an ``init_cfg`` in any of mmengine's
    forms (None, a dict, a list of dicts)."""
    cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    return [
        cfg.get('checkpoint')
        for cfg in cfgs
        if isinstance(cfg, dict) and cfg.get('type') in ('Pretrained', PretrainedInit)
    ]


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
