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
equivalent built from the same parameters. Common to both layouts (``layout=``):

* RoPE tables are computed once per stage, already in the layout of the per-head products, and
  RoPE is moved off the token tensors: with ``q_rope = q * cos + swap(q * sin_signed)``
  (``swap`` exchanging the channels of each pair), ``q_rope @ kv = (q * cos) @ kv +
  (q * sin_signed) @ (P @ kv)`` and ``kv = (k * cos)^T v + P @ ((k * sin_signed)^T v)``, where
  ``P`` is the pair-swap permutation of a head (``d x d``): the swap acts on the small ``d x d``
  matrices, the big tensors only get multiplied by tables;
* the normaliser's ``mean(k)`` is no strided ``ReduceMean`` over the token axis (slow in
  onnxruntime): a matrix-vector product (nhwc), a mean over the contiguous token axis (nchw);
* q and k are two linears (the rows of the ``qk`` weight), so no slicing of their output;
* BatchNorm is folded into the preceding convolution (stem, patch merging);
* the affine part of each stage's output LayerNorm is a 1x1 depthwise convolution
  (:class:`OutputNorm`): under a bf16 precision hint OpenVINO keeps every node between an output
  and the last convolution or matrix product before it in float32, and with a LayerNorm there
  that reached back through the whole chain of residual additions, each with reorders.

``layout='nchw'`` (the default, :class:`ExportStageNCHW`): tokens stay ``(B, C, H, W)`` through a
stage, so the depthwise convolutions (CPE, DWC, LePE) need no transposes, the linears are 1x1
convolutions (both runtimes keep them in their blocked or channels-last layouts, fused with bias,
residual add and activation where they can), LayerNorm is a reduction over the channel axis
(:func:`_normalise_channels`), the patch mergings and output norms work on the NCHW views, so that
the transposes between stages cancel in both runtimes (:class:`ExportPatchMerging`), and
the per-head layout ``(B, heads, d, H * W)`` of the attention products is a reshape. The products
are taken transposed (``kv^T = v @ k_rope^T``, ``out = kv^T @ q_rope``), the cosine and sine
products of q (and of k) stacked into one ``(B, heads, 2d, N)`` tensor so that each product is one
``MatMul``, the normaliser folded into that same element-wise pass on q, and the RoPE tables made
from the sines and cosines of the ``dim / 2 x (H + W)`` distinct angles (no ``Expand``: OpenVINO
runs it, and ``Sin``/``Cos``, with reference kernels).

``layout='nhwc'`` (:class:`ExportStage`): tokens stay a 2-D ``(B * H * W, C)`` matrix between the
depthwise convolutions (a transpose to NCHW and back around each), every linear is one ``Gemm``
with bias and activation fused; stages with few heads compute the products for all heads at once.
Slower than ``nchw`` in onnxruntime and OpenVINO on the CPU measured (``docs/deployment.md``).

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

from mlla_mm.models.backbones.mlla import MLLA, ConvLayer, MLLABlock, MLLAStage, PatchMerging

__all__ = [
    'FULL_WIDTH_HEADS',
    'LAYOUTS',
    'ExportBlock',
    'ExportBlockNCHW',
    'ExportPatchMerging',
    'ExportStage',
    'ExportStageNCHW',
    'OutputNorm',
    'export_friendly',
    'rope_channel_tables',
    'rope_head_tables',
]

#: Token layouts of :func:`export_friendly`, the default first.
LAYOUTS = ('nchw', 'nhwc')

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


def rope_channel_tables(h, w, dim: int, like: torch.Tensor, base: float = 10000.0):
    """:func:`rope_head_tables` in the channel-major layout ``(dim, h * w)`` (reshape to
    ``(heads, d, h * w)``): sine and cosine of the ``dim / 2 x (h + w)`` distinct angles, then
    expanded over the grid (exactly the values of :func:`rope_head_tables`)."""
    k_max = dim // 4
    theta = 1.0 / (base ** (torch.arange(k_max, dtype=torch.float32) / k_max))
    theta = theta.repeat_interleave(2).to(like.device)[:, None]  # (dim / 2, 1)
    rows = theta * torch.arange(h, device=like.device, dtype=torch.float32)  # (dim / 2, h)
    cols = theta * torch.arange(w, device=like.device, dtype=torch.float32)  # (dim / 2, w)
    sign = (1.0 - 2.0 * (torch.arange(dim, device=like.device) % 2)).to(torch.float32)[:, None]

    def grid(f):  # broadcast by adding zeros: OpenVINO runs Expand with a reference kernel
        r, c = f(rows), f(cols)
        r, c = r[:, :, None] + 0.0 * c[:, None, :], c[:, None, :] + 0.0 * r[:, :, None]
        return torch.cat([r, c]).reshape(dim, h * w)

    return grid(torch.cos).to(like.dtype), (grid(torch.sin) * sign).to(like.dtype)


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


class _BlockModules(nn.Module):
    """What both rewrites of :class:`~mlla_mm.models.backbones.mlla.MLLABlock` take over from
    ``block`` as they are: the depthwise convolutions (CPE, DWC, LePE), the norms and SiLU."""

    def __init__(self, block: MLLABlock) -> None:
        super().__init__()
        attn = block.attn
        self.dim, self.heads = attn.dim, attn.num_heads
        self.cpe1, self.cpe2, self.dwc, self.lepe = block.cpe1, block.cpe2, block.dwc, attn.lepe
        self.norm1, self.norm2, self.act = block.norm1, block.norm2, block.act


class ExportBlock(_BlockModules):
    """:class:`~mlla_mm.models.backbones.mlla.MLLABlock`, rewritten for ONNX runtimes (see the
    module docstring); shares ``block``'s modules, except ``qk``, split into ``q`` and ``k``."""

    def __init__(self, block: MLLABlock) -> None:
        super().__init__(block)
        attn = block.attn
        self.in_proj, self.act_proj, self.out_proj = block.in_proj, block.act_proj, block.out_proj
        self.mlp = block.mlp
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


def _conv1x1(linear: nn.Linear, rows: slice | None = None) -> nn.Conv2d:
    """``linear`` (or its output rows ``rows``) as a 1x1 convolution on NCHW tokens."""
    weight = linear.weight if rows is None else linear.weight[rows]
    bias = linear.bias if rows is None or linear.bias is None else linear.bias[rows]
    out = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=bias is not None)
    out.weight = nn.Parameter(weight.detach()[:, :, None, None].clone(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return out


def _normalise_channels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without its affine part over the channels of NCHW tokens: ``ReduceMean`` over
    axis 1, as ``(x - mean) / sqrt(mean((x - mean)^2) + eps)``, the form of OpenVINO's
    ``MVNFusion``. OpenVINO's CPU plugin runs ``MVN`` over trailing axes only (of a 4-D tensor:
    ``[1, 2, 3]`` or ``[2, 3]``), so it decomposes this one again; compiled for a static shape it
    fuses the elementwise part into one subgraph. A transpose to ``(B, H * W, C)`` for an
    ``MVN`` over the last axis and back measured slower (OpenVINO with dynamic sizes, and
    onnxruntime), and no faster with static ones."""
    xc = x - x.mean(1, keepdim=True)
    return xc / torch.sqrt(xc.pow(2).mean(1, keepdim=True) + eps)


def _layer_norm_nchw(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` over the channels of NCHW tokens (:func:`_normalise_channels`, then the
    affine part)."""
    y = _normalise_channels(x, norm.eps)
    return y * norm.weight[:, None, None] + norm.bias[:, None, None]


class ExportBlockNCHW(_BlockModules):
    """:class:`~mlla_mm.models.backbones.mlla.MLLABlock` on NCHW tokens ``(B, C, H, W)``: the
    depthwise convolutions need no transposes, the linears are 1x1 convolutions, LayerNorm is a
    reduction over the channel axis, and the per-head layout ``(B, heads, d, N)`` is a reshape."""

    def __init__(self, block: MLLABlock) -> None:
        super().__init__(block)
        attn = block.attn
        self.in_proj, self.act_proj = _conv1x1(block.in_proj), _conv1x1(block.act_proj)
        self.out_proj = _conv1x1(block.out_proj)
        self.q = _conv1x1(attn.qk, slice(0, self.dim))
        self.k = _conv1x1(attn.qk, slice(self.dim, 2 * self.dim))
        self.fc1, self.fc2 = _conv1x1(block.mlp.fc1), _conv1x1(block.mlp.fc2)
        self.gelu = block.mlp.act
        d = self.dim // self.heads
        eye_swap = torch.cat([torch.eye(d), _pair_swap(d)])  # (2d, d): [I; P]
        self.register_buffer('eye_swap', eye_swap, persistent=False)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, C, H, W)`` -> the same; ``cos_sin``: the tables of
        :func:`rope_channel_tables` stacked as ``(1, heads, 2, d, H * W)``."""
        x = x + self.cpe1(x)
        xn = _layer_norm_nchw(self.norm1, x)
        gate = self.act(self.act_proj(xn))
        a = self.act(self.dwc(self.in_proj(xn)))
        x = x + self.out_proj(self._attention(a, cos_sin) * gate)
        x = x + self.cpe2(x)
        return x + self.fc2(self.gelu(self.fc1(_layer_norm_nchw(self.norm2, x))))

    def _attention(self, a: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """:func:`~mlla_mm.models.backbones.mlla.linear_attention` + LePE on NCHW tokens ``a``,
        transposed: per head, with q, k, v as ``d x N`` matrices, ``out = kv^T @ q_rope`` and
        ``kv^T = v @ k_rope^T`` (``d x d``), so that every product reads the channel-major tokens
        as they are."""
        b, c, h, w = a.shape
        n, heads, d = h * w, self.heads, self.dim // self.heads
        q = F.elu(self.q(a)) + 1.0
        k = F.elu(self.k(a)) + 1.0
        lepe = self.lepe(a)

        # per-head layout, a reshape: (B, heads, 1, d, N) for q and k, one tensor each for both
        # of their uses below (OpenVINO reorders its channels-last q, k to the planar layout of
        # MatMul once per distinct consumer shape: two reshapes, two copies)
        q, k = q.reshape(b, heads, 1, d, n), k.reshape(b, heads, 1, d, n)
        v = a.reshape(b, heads, d, n)
        k_mean = k.mean(-1, keepdim=True)  # (B, heads, 1, d, 1): over the contiguous token axis
        z = 1.0 / (k_mean.transpose(-2, -1) @ q + 1e-6)  # (B, heads, 1, 1, N), un-rotated q, k
        # RoPE'd q and k: both table products in one (B, heads, 2d, N) tensor, so that each
        # product with kv^T is one MatMul over 2d rows; [I; P] and [I, P] apply the pair swap
        k_cs = (k * cos_sin).reshape(b, heads, 2 * d, n)
        # the normaliser z scales the columns (tokens) of the output: applied to q_rope instead,
        # in the same pass as the tables
        q_cs = (q * cos_sin * z).reshape(b, heads, 2 * d, n)
        kv_t = (v @ k_cs.transpose(-2, -1)) @ self.eye_swap * (1.0 / n)  # (B, heads, d, d)
        out = (kv_t @ self.eye_swap.transpose(0, 1)) @ q_cs
        return out.reshape(b, c, h, w) + lepe


class ExportPatchMerging(nn.Module):
    """:class:`~mlla_mm.models.backbones.mlla.PatchMerging` (same call: ``(B, H, W, C)`` ->
    ``(B, ceil(H / 2), ceil(W / 2), 2C)``) that pads and convolves the NCHW view: the transposes
    on either side then meet the stages' inverse ones and cancel in the exported graph (the
    original pads the channels-last tensor, between them)."""

    def __init__(self, merging: PatchMerging) -> None:
        super().__init__()
        self.conv = merging.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        h, w = x.shape[2:]
        x = F.pad(x, (0, w - w // 2 * 2, 0, h - h // 2 * 2))  # odd sizes: as PatchMerging
        return self.conv(x).permute(0, 2, 3, 1)


class ExportStageNCHW(nn.Module):
    """:class:`~mlla_mm.models.backbones.mlla.MLLAStage` of :class:`ExportBlockNCHW` s: same call
    (``(B, H, W, C)`` tokens in and out, one transpose each way, which cancel with those of
    :class:`ExportPatchMerging` and :class:`OutputNorm`; ``downsample`` kept for the backbone to
    call), NCHW tokens inside, RoPE tables computed once for all blocks."""

    def __init__(self, stage: MLLAStage) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ExportBlockNCHW(block) for block in stage.blocks)
        merging = stage.downsample
        self.downsample = ExportPatchMerging(merging) if merging is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.blocks:
            return x
        b, h, w, c = x.shape
        heads = self.blocks[0].heads
        cos_sin = torch.stack(rope_channel_tables(h, w, c, x)).reshape(2, heads, c // heads, h * w)
        cos_sin = cos_sin.transpose(0, 1).unsqueeze(0)  # (1, heads, 2, d, N)
        t = x.permute(0, 3, 1, 2)
        for block in self.blocks:
            t = block(t, cos_sin)
        return t.permute(0, 2, 3, 1)


class OutputNorm(nn.Module):
    """A stage's output LayerNorm (channels-last tokens in and out) with its affine part as a 1x1
    depthwise convolution: OpenVINO keeps the graph's tail (every node between an output and
    the last convolution or matrix product before it) in float32 under a bf16 precision hint;
    ending in a LayerNorm, that tail reached back through the whole chain of residual additions
    (measured: the residual adds in float32, with bf16 <-> f32 reorders around each).

    The norm runs on the NCHW view (:func:`_normalise_channels`): after an
    :class:`ExportStageNCHW` the transposes on either side cancel with the stage's and the
    backbone's."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        c = norm.normalized_shape[0]
        self.eps = norm.eps
        self.affine = nn.Conv2d(c, c, 1, groups=c)
        self.affine.weight = nn.Parameter(norm.weight.detach().reshape(c, 1, 1, 1).clone(), False)
        self.affine.bias = nn.Parameter(norm.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _normalise_channels(x.permute(0, 3, 1, 2), self.eps)
        return self.affine(x).permute(0, 2, 3, 1)


def _fold_batch_norms(module: nn.Module) -> None:
    """Fold the eval-mode BatchNorm of every :class:`ConvLayer` into its convolution."""
    for m in module.modules():
        if isinstance(m, ConvLayer) and isinstance(m.norm, nn.BatchNorm2d):
            m.conv = fuse_conv_bn_eval(m.conv, m.norm)
            m.norm = None


def export_friendly(model: nn.Module, layout: str = 'nchw') -> nn.Module:
    """A copy of ``model`` (in eval mode) with every MLLA backbone inside rewritten for ONNX
    runtimes: stages of :class:`ExportStageNCHW` (``layout='nchw'``) or :class:`ExportStage`
    (``'nhwc'``), output norms of :class:`OutputNorm`, BatchNorm folded into the convolutions.

    ``model`` may be an :class:`MLLA` or any module holding one (a segmentor, a detector, the
    wrappers of :mod:`mlla_mm.deploy.wrappers`, ``MaskRCNNGraph``).
    Inference only: the copy's parameters do not require gradients. Models without an MLLA are
    returned as they are.
    """
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
    if not any(isinstance(m, MLLA) for m in model.modules()):
        return model
    stage_type = ExportStageNCHW if layout == 'nchw' else ExportStage
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
                backbone.layers[i] = stage_type(stage)
        for name, norm in list(backbone.named_children()):
            if name.startswith('norm') and isinstance(norm, nn.LayerNorm):
                setattr(backbone, name, OutputNorm(norm))
    return model
