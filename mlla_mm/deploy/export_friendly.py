"""A deploy-time rewrite of MLLA that ONNX runtimes execute well: same function, other operators.

The plain module forward of :class:`~mlla_mm.models.backbones.mlla.MLLA` (what tracing exports)
is written for PyTorch, where views and strided matmuls are free. Exported as it is, onnxruntime
and OpenVINO spend most of their time outside the matrix products (profiles of MLLA-T at
1280x800, 2 threads; ``docs/deployment.md``): RoPE as ``Gather``/``Concat`` of channel pairs
(OpenVINO runs that ``Concat`` with its reference kernel), sine and cosine tables recomputed in
every block, the normaliser's mean over tokens as a strided ``ReduceMean``, bias ``Add`` nodes
left unfused because the linears see 4-D tokens, and transposes of q, k, v and of both RoPE'd
copies for the per-head products.

:func:`export_friendly` returns a copy of a model in which every MLLA stage is replaced by an
equivalent built from the same parameters:

* tokens stay a 2-D ``(B * H * W, C)`` matrix between the depthwise convolutions, so every linear
  is one ``Gemm`` with its bias (and activation) fused;
* RoPE tables are computed once per stage, in the per-head layout, and RoPE is moved off the
  token tensors: with ``q_rope = q * cos + swap(q * sin_signed)`` (``swap`` exchanging the
  channels of each pair), ``q_rope @ kv = (q * cos) @ kv + (q * sin_signed) @ (P @ kv)`` and
  ``kv = (k * cos)^T v + P @ ((k * sin_signed)^T v)``, where ``P`` is the pair-swap permutation
  of a head (``d x d``): the swap acts on the small ``d x d`` matrices, the big tensors only get
  multiplied by tables;
* the normaliser's ``mean(k)`` is a ``(1 x N) @ (N x C)`` product (a ``ReduceMean`` over the
  token axis is strided, and slow in onnxruntime);
* q and k are two linears (the rows of the ``qk`` weight), so no slicing of their output;
* BatchNorm is folded into the preceding convolution (stem, patch merging).

The copy is exact up to float rounding (``tests/test_deploy/test_export_friendly.py``) and can be
run eagerly too (it never takes the fused CPU path of :mod:`~mlla_mm.models.backbones.fast_path`,
which is eager-only anyway). The original model is not modified.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from mlla_mm.models.backbones.mlla import MLLA, ConvLayer, MLLABlock, MLLAStage

__all__ = ['FULL_WIDTH_HEADS', 'ExportBlock', 'ExportStage', 'export_friendly', 'rope_head_tables']

#: Stages with at most this many heads compute the attention products for all heads at once
#: (:meth:`ExportBlock._attention_full_width`); more heads use the per-head layout.
FULL_WIDTH_HEADS = 4


def rope_head_tables(
    h, w, dim: int, heads: int, like: torch.Tensor, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLLA's 2-D RoPE tables in the per-head layout, for the rewrite of :class:`ExportBlock`.

    Channel pair ``p`` of the ``dim`` channels is rotated by ``row * theta_p`` (first ``dim // 4``
    pairs) or ``col * theta_{p - dim // 4}`` (the rest), as
    :func:`mlla_mm.models.backbones.mlla.rope_tables`; both channels of a pair share the angle.

    Returns:
        tuple[Tensor, Tensor]: ``cos`` and ``sin_signed``, each ``(heads, h * w, dim // heads)``;
        ``sin_signed`` is ``+sin`` on the first channel of each pair and ``-sin`` on the second.
    """
    k_max = dim // 4
    theta = 1.0 / (base ** (torch.arange(k_max, dtype=torch.float32) / k_max))
    theta = theta.repeat_interleave(2).to(like.device)  # (dim / 2,): one angle per channel
    rows = torch.arange(h, device=like.device, dtype=torch.float32)[:, None, None] * theta
    cols = torch.arange(w, device=like.device, dtype=torch.float32)[None, :, None] * theta
    angles = torch.cat([rows.expand(h, w, dim // 2), cols.expand(h, w, dim // 2)], dim=-1)
    angles = angles.reshape(h * w, heads, dim // heads).transpose(0, 1)  # (heads, N, d)
    sign = 1.0 - 2.0 * (torch.arange(dim // heads, device=like.device) % 2)  # +1, -1, +1, ...
    sign = sign.to(torch.float32)
    return torch.cos(angles).to(like.dtype), (torch.sin(angles) * sign).to(like.dtype)


def _pair_swap(d: int) -> torch.Tensor:
    """(d, d) permutation matrix exchanging rows ``2p`` and ``2p + 1``."""
    idx = torch.arange(d).view(-1, 2).flip(-1).reshape(-1)
    return torch.eye(d)[idx]


def _linear(module: nn.Linear, rows: slice) -> nn.Linear:
    """A new linear with the output rows ``rows`` of ``module``."""
    weight = module.weight[rows]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    out.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if module.bias is not None:
        out.bias = nn.Parameter(module.bias[rows].detach().clone(), requires_grad=False)
    return out


def _conv_nhwc(conv: nn.Module, x: torch.Tensor, b, h, w) -> torch.Tensor:
    """``conv`` on 2-D tokens ``(B * H * W, C)``, same layout out."""
    c = x.shape[-1]
    y = conv(x.reshape(b, h, w, c).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


class ExportBlock(nn.Module):
    """:class:`~mlla_mm.models.backbones.mlla.MLLABlock`, rewritten for ONNX runtimes (see the
    module docstring); shares ``block``'s modules, except ``qk``, split into ``q`` and ``k``."""

    def __init__(self, block: MLLABlock) -> None:
        super().__init__()
        attn = block.attn
        self.dim, self.heads = attn.dim, attn.num_heads
        self.cpe1, self.norm1, self.cpe2, self.norm2 = (
            block.cpe1,
            block.norm1,
            block.cpe2,
            block.norm2,
        )
        self.in_proj, self.act_proj, self.out_proj = block.in_proj, block.act_proj, block.out_proj
        self.dwc, self.act, self.mlp, self.lepe = block.dwc, block.act, block.mlp, attn.lepe
        self.q = _linear(attn.qk, slice(0, self.dim))
        self.k = _linear(attn.qk, slice(self.dim, 2 * self.dim))
        d = self.dim // self.heads
        self.register_buffer('swap', _pair_swap(d), persistent=False)
        # few heads: all heads in one full-width product, masked to the diagonal blocks (heads
        # times the product FLOPs, but no transposes of q, k, v and the output to the per-head
        # layout, which cost more where the token tensors are largest: stages 0 and 1)
        self.full_width = self.heads <= FULL_WIDTH_HEADS
        head = torch.arange(self.dim) // d
        self.register_buffer('same_head', (head[:, None] == head[None, :]).float(), False)
        self.register_buffer('swap_full', _pair_swap(self.dim), persistent=False)

    def forward(self, x: torch.Tensor, b, h, w, cos: torch.Tensor, sin: torch.Tensor):
        """Tokens ``(B * H * W, C)`` -> the same; ``cos``/``sin`` from :func:`rope_head_tables`."""
        x = x + _conv_nhwc(self.cpe1, x, b, h, w)
        xn = self.norm1(x)
        gate = self.act(self.act_proj(xn))
        a = self.act(_conv_nhwc(self.dwc, self.in_proj(xn), b, h, w))
        x = x + self.out_proj(self._attention(a, b, h, w, cos, sin) * gate)
        x = x + _conv_nhwc(self.cpe2, x, b, h, w)
        return x + self.mlp(self.norm2(x))

    def _attention(self, a: torch.Tensor, b, h, w, cos, sin) -> torch.Tensor:
        """:func:`~mlla_mm.models.backbones.mlla.linear_attention` + LePE on tokens ``a``."""
        n, c, heads = h * w, self.dim, self.heads
        q = F.elu(self.q(a)) + 1.0
        k = F.elu(self.k(a)) + 1.0
        lepe = _conv_nhwc(self.lepe, a, b, h, w)

        if self.full_width:
            return self._attention_full_width(q, k, a, b, n, cos, sin) + lepe

        def split(t):  # (B * N, C) -> (B, heads, N, d)
            return t.reshape(b, n, heads, c // heads).transpose(1, 2)

        # mean over tokens as a (1 x N) @ (N x C) product: a strided ReduceMean is slow
        ones = torch.ones(b, 1, n, dtype=k.dtype, device=k.device)
        k_mean = (ones @ k.reshape(b, n, c) * (1.0 / n)).reshape(b, heads, 1, c // heads)
        q, k, v = split(q), split(k), split(a)
        z = 1.0 / (q @ k_mean.transpose(-2, -1) + 1e-6)  # (B, heads, N, 1), un-rotated q, k
        kv = (k * cos).transpose(-2, -1) @ v + self.swap @ ((k * sin).transpose(-2, -1) @ v)
        kv = kv * (1.0 / n)
        out = ((q * cos) @ kv + (q * sin) @ (self.swap @ kv)) * z
        return out.transpose(1, 2).reshape(-1, c) + lepe

    def _attention_full_width(self, q, k, v, b, n, cos, sin) -> torch.Tensor:
        """:meth:`_attention` without the per-head layout (``cos``/``sin``: ``(N, C)``)."""
        c, heads = self.dim, self.heads
        q, k, v = q.reshape(b, n, c), k.reshape(b, n, c), v.reshape(b, n, c)
        ones = torch.ones(b, 1, n, dtype=k.dtype, device=k.device)
        k_mean = (ones @ k * (1.0 / n)).transpose(-2, -1)  # (B, C, 1)
        per_head = self.same_head[:, :: c // heads]  # (C, heads): channel in head
        z = 1.0 / (q @ (k_mean * per_head) + 1e-6)  # (B, N, heads)
        kv = (k * cos).transpose(-2, -1) @ v + self.swap_full @ ((k * sin).transpose(-2, -1) @ v)
        kv = kv * (self.same_head * (1.0 / n))  # (B, C, C), block diagonal
        out = (q * cos) @ kv + (q * sin) @ (self.swap_full @ kv)
        return (out.reshape(b, n, heads, c // heads) * z.unsqueeze(-1)).reshape(-1, c)


class ExportStage(nn.Module):
    """:class:`~mlla_mm.models.backbones.mlla.MLLAStage` of :class:`ExportBlock` s: same call
    (``(B, H, W, C)`` tokens in and out; ``downsample`` kept for the backbone to call), RoPE
    tables computed once for all blocks."""

    def __init__(self, stage: MLLAStage) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ExportBlock(block) for block in stage.blocks)
        self.downsample = stage.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.blocks:
            return x
        b, h, w, c = x.shape
        first = self.blocks[0]
        tables = rope_head_tables(h, w, c, first.heads, x)
        if first.full_width:  # (heads, N, d) -> (N, C)
            tables = tuple(t.transpose(0, 1).reshape(h * w, c) for t in tables)
        t = x.reshape(-1, c)
        for block in self.blocks:
            t = block(t, b, h, w, *tables)
        return t.reshape(b, h, w, c)


def _fold_batch_norms(module: nn.Module) -> None:
    """Fold the eval-mode BatchNorm of every :class:`ConvLayer` into its convolution."""
    for m in module.modules():
        if isinstance(m, ConvLayer) and isinstance(m.norm, nn.BatchNorm2d):
            m.conv = fuse_conv_bn_eval(m.conv, m.norm)
            m.norm = None


def export_friendly(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every MLLA backbone inside rewritten for ONNX
    runtimes: stages of :class:`ExportStage`, BatchNorm folded into the convolutions.

    ``model`` may be an :class:`MLLA` or any module holding one (a segmentor, a detector, the
    wrappers of :mod:`mlla_mm.deploy.wrappers`, ``MaskRCNNGraph``).
    Inference only: the copy's parameters do not require gradients. Models without an MLLA are
    returned as they are.
    """
    if not any(isinstance(m, MLLA) for m in model.modules()):
        return model
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for backbone in [m for m in model.modules() if isinstance(m, MLLA)]:
        for m in backbone.modules():  # the fused path expects the BatchNorms folded here
            if hasattr(m, 'use_fast_path'):
                m.use_fast_path = False
        _fold_batch_norms(backbone)
        for i, stage in enumerate(backbone.layers):
            if isinstance(stage, MLLAStage):
                backbone.layers[i] = ExportStage(stage)
    return model
