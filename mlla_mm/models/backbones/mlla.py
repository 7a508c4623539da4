"""MLLA: Mamba-Like Linear Attention backbone.

Paper: "Demystify Mamba in Vision: A Linear Attention Perspective", Dongchen Han et al.,
NeurIPS 2024, https://arxiv.org/abs/2405.16605. Official code (MIT licence):
https://github.com/LeapLabTHU/MLLA. This is an independent implementation of the same equations
with the same parameter names, so the official checkpoints load unchanged:

* any input size (padding as the official downstream code does), with RoPE computed for the actual
  token grid in real arithmetic (no complex tensors: ONNX- and half-precision-friendly) and cached
  per (height, width, channels, device, dtype), never stored in the state dict;
* tokens stay channels-last (B, H, W, C) through a stage; depthwise convs see a channels-last NCHW
  view, so no permute copies; BatchNorm folded into the conv at inference;
* the linear-attention normaliser and KV product run in float32 under autocast;
* OpenMMLab backbone arguments: ``out_indices``, ``frozen_stages``, ``norm_eval``, ``with_cp``,
  ``init_cfg`` and ``get_layer_depth`` for layer-wise learning-rate decay.
"""

from __future__ import annotations

from collections.abc import Sequence

import os
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch.nn.modules.batchnorm import _BatchNorm

from mlla_mm.registry import MODELS

__all__ = ['MLLA', 'rope_tables', 'convert_official_state_dict']


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
    tables = _ROPE_CACHE.get(key)
    if tables is None:
        if len(_ROPE_CACHE) > 256:
            _ROPE_CACHE.clear()
        tables = _ROPE_CACHE[key] = _rope_angles(h, w, dim, base, device, dtype)
    return tables


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
    caching = not (torch.compiler.is_compiling() or torch.jit.is_tracing())
    key = (h, w, dim, torch.device(device), dtype)
    tables = _ROPE_PAIR_CACHE.get(key) if caching else None
    if tables is None:
        cos, sin = rope_tables(h, w, dim, device, dtype)
        tables = (
            torch.stack([cos, cos], dim=-1).flatten(-2),
            torch.stack([-sin, sin], dim=-1).flatten(-2),
        )
        if caching:
            if len(_ROPE_PAIR_CACHE) > 256:
                _ROPE_PAIR_CACHE.clear()
            _ROPE_PAIR_CACHE[key] = tables
    return tables


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)`` along the last dimension (a copy)."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


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
    weight = conv.weight
    if residual:
        weight = weight + _identity_taps(conv)
    out = F.conv2d(
        x.permute(0, 3, 1, 2), weight, conv.bias, conv.stride, conv.padding, conv.dilation,
        conv.groups,
    )  # fmt: skip
    return out.permute(0, 2, 3, 1)


def _linear_residual(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x)``; without autograd the product accumulates into ``residual``."""
    if (
        torch.is_grad_enabled()
        or not (residual.dtype == x.dtype == linear.weight.dtype)
        or not residual.is_contiguous()
    ):
        return residual + linear(x)
    out = residual.view(-1, residual.shape[-1])
    out.addmm_(x.reshape(-1, x.shape[-1]), linear.weight.t())
    if linear.bias is not None:
        out.add_(linear.bias)
    return residual


def _check_checkpoint_file(path) -> None:
    """Fail early and clearly on a missing file or one that is not a PyTorch checkpoint."""
    if not isinstance(path, (str, os.PathLike)) or '://' in str(path):
        return  # remote or exotic sources are left to mmengine's loaders
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'Pretrained checkpoint {str(path)!r} does not exist; set '
            "init_cfg=dict(type='Pretrained', checkpoint=...) to an existing .pth file"
        )
    with open(path, 'rb') as f:
        head = f.read(2)
    if not (zipfile.is_zipfile(path) or head[:1] == b'\x80'):  # torch.save zip or legacy pickle
        raise ValueError(
            f'{str(path)!r} is not a PyTorch checkpoint (neither a torch.save zip archive nor a '
            'pickle). Pass an official MLLA .pth, a file written by mmengine, or one converted '
            'with tools/model_converters/mlla2mm.py.'
        )


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None and not self.norm.training:
            x = self._conv_bn_folded(x)
        else:
            x = self.conv(x)
            if self.norm is not None:
                x = self.norm(x)
        if self.act is None:
            return x
        return F.relu(x, inplace=not torch.is_grad_enabled())

    def _conv_bn_folded(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.norm
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


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
        x = F.pad(x, (0, (-w) % 4, 0, (-h) % 4))  # bottom/right zero padding to a multiple of 4
        # channels-last convs: oneDNN's fastest path, and the NHWC tokens come out copy-free
        x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        y = self.conv2(x)
        x = y.add_(x) if not torch.is_grad_enabled() else y + x
        return self.conv3(x).permute(0, 2, 3, 1)


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
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))  # odd sizes: pad *before* the 1x1 conv
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


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

        q and k come out of one GEMM as a (B, H, W, 2, C) tensor and are rotated together with
        per-channel RoPE tables. Per image and head, three BLAS products on strided views do the
        rest without a transpose copy: ``k_r^T v`` (d x d), the normaliser ``q . mean(k)`` and
        ``LePE(v) += (z * q_r) (k_r^T v)``, accumulated into the LePE output without autograd
        (out-of-place with autograd, same arithmetic).
        """
        b, h, w, c = x.shape
        n, heads = h * w, self.num_heads
        d = c // heads
        no_grad = not torch.is_grad_enabled()
        qk = self.qk(x)
        with torch.autocast(x.device.type, enabled=False):
            dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            v = x.to(dtype)
            qk = F.elu(qk.to(dtype), inplace=no_grad).add_(1.0).view(b, h, w, 2, c)
            cos2, sin2 = rope_pair_tables(h, w, c, x.device, dtype)
            rot = (qk * cos2.unsqueeze(2)).addcmul_(swap_pairs(qk), sin2.unsqueeze(2))
            qk, rot, v = qk.view(b, n, 2, c), rot.view(b, n, 2, c), v.reshape(b, n, c)
            lepe = dwconv_nhwc(x.to(dtype), self.lepe)  # float32 weights, float32 input
            out = lepe.reshape(b, n, c) if no_grad else None
            parts = []  # with autograd: per image, the heads' products, concatenated
            for i in range(b):
                for j in range(heads):
                    cols = slice(j * d, (j + 1) * d)
                    k_mean = qk[i, :, 1, cols].mean(0, keepdim=True).t()  # (d, 1)
                    z = torch.mm(qk[i, :, 0, cols], k_mean).add_(1e-6).reciprocal_()  # (n, 1)
                    kv = torch.mm(rot[i, :, 1, cols].t(), v[i, :, cols]).mul_(1.0 / n)  # (d, d)
                    q_z = rot[i, :, 0, cols] * z
                    if no_grad:
                        out[i, :, cols].addmm_(q_z, kv)
                    else:
                        parts.append(torch.mm(q_z, kv))
            if not no_grad:
                per_image = [torch.cat(parts[i * heads : (i + 1) * heads], -1) for i in range(b)]
                out = torch.stack(per_image) + lepe.reshape(b, n, c)
        return out.view(b, h, w, c).to(x.dtype)

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
        gate = F.silu(self.act_proj(x), inplace=no_grad)
        x = F.silu(dwconv_nhwc(self.in_proj(x), self.dwc), inplace=no_grad)
        x = self.attn(x)
        x = x.mul_(gate) if no_grad else x * gate
        if isinstance(self.drop_path, nn.Identity) or not self.training:
            x = _linear_residual(x, self.out_proj, shortcut)
        else:
            x = shortcut + self.drop_path(self.out_proj(x))
        x = dwconv_nhwc(x, self.cpe2, residual=True)
        hidden = self.mlp.act(self.mlp.fc1(self.norm2(x)))
        if isinstance(self.drop_path, nn.Identity) or not self.training:
            return _linear_residual(hidden, self.mlp.fc2, x)
        return x + self.drop_path(self.mlp.fc2(hidden))


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
                x = cp.checkpoint(block, x, use_reentrant=False)
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
        with_cp: Activation checkpointing per block (saves memory, costs a recomputation).
        checkpoint_key: Entry of an official ImageNet checkpoint to load the weights from:
            ``'model'``, or the EMA weights (``'model_ema'``/``'state_dict_ema'``) on request.
        init_cfg: mmengine init config, e.g. ``dict(type='Pretrained', checkpoint=PATH)`` with an
            official MLLA ImageNet or downstream checkpoint, or this package's own.

    Shapes:
        Input (B, in_channels, H, W) of any H, W >= the largest output stride; outputs a tuple of
        (B, C_i, ceil(H / 2**(i+2)), ceil(W / 2**(i+2))) tensors for ``i`` in ``out_indices``.
    """

    arch_zoo = {
        **dict.fromkeys(['t', 'tiny'], dict(embed_dims=64, depths=(2, 4, 8, 4), num_heads=(2, 4, 8, 16))),
        **dict.fromkeys(['s', 'small'], dict(embed_dims=64, depths=(3, 6, 21, 6), num_heads=(2, 4, 8, 16))),
        **dict.fromkeys(['b', 'base'], dict(embed_dims=96, depths=(3, 6, 21, 6), num_heads=(3, 6, 12, 24))),
    }  # fmt: skip
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
        init_cfg: dict | list | None = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self.checkpoint_key = checkpoint_key
        self.arch = self._parse_arch(arch)
        embed_dims, depths, num_heads = (self.arch[k] for k in ('embed_dims', 'depths', 'num_heads'))
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
            raise KeyError(f'Custom MLLA arch is missing {sorted(missing)}; got keys {sorted(arch)}')
        if len(arch['depths']) != cls.num_stages or len(arch['num_heads']) != cls.num_stages:
            raise ValueError('Custom MLLA arch needs 4 depths and 4 num_heads')
        return dict(arch)

    # ----------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Official init (truncated normal Linear, unit LayerNorm), then ``init_cfg``."""
        pretrained = isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained'
        if not pretrained:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
            self._is_init = True
        if pretrained:
            _check_checkpoint_file(self.init_cfg.get('checkpoint'))
        if self.init_cfg is not None:
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
                f'entries are {entries}. Official ImageNet files keep the weights in \'model\' '
                '(and EMA weights, where saved, in \'model_ema\' or \'state_dict_ema\').'
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
        converted = convert_official_state_dict(
            {k[len(prefix) :]: v for k, v in own.items()}, out_indices=self.out_indices
        )
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        state_dict.update({prefix + k: v for k, v in converted.items()})
        self._check_shapes(converted)

    def _check_shapes(self, state_dict: dict) -> None:
        expected = self.state_dict()
        for key, value in state_dict.items():
            if key in expected and tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f'Checkpoint does not fit this MLLA (embed_dims={self.embed_dims}, '
                    f'depths={self.depths}, num_heads={self.num_heads}): {key!r} has shape '
                    f'{tuple(value.shape)}, expected {tuple(expected[key].shape)}. Is it a '
                    'checkpoint of another variant? Set `arch` to match it.'
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
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x).permute(0, 3, 1, 2).contiguous())
            if i == max(self.out_indices):
                break
            x = stage.downsample(x)
        return tuple(outs)

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

