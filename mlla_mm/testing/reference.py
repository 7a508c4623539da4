"""A plain transcription of the official MLLA equations: the numerical reference and the baseline.

``PlainMLLA`` follows the official downstream backbone (LeapLabTHU/MLLA,
``downstream/*/backbones/mlla.py``) step by step: tokens as (B, N, C) with NCHW permutes around
every depthwise conv, RoPE recomputed in every block, BatchNorm applied as a separate op. It has
the same parameter names as :class:`mlla_mm.MLLA`, so ``PlainMLLA(...).load_state_dict(
mlla.state_dict())`` gives a model whose outputs the optimised one must reproduce. The tests use
it as the reference and ``tools/benchmark.py`` as the baseline to beat.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['PlainMLLA', 'plain_rope']


def plain_rope(x: torch.Tensor, h: int, w: int, base: float = 10000.0) -> torch.Tensor:
    """RoPE of the official ``rope()`` on (B, h, w, C), recomputed on every call."""
    c = x.shape[-1]
    k_max = c // 4
    theta = 1 / (base ** (torch.arange(k_max, device=x.device) / k_max))
    grid = torch.meshgrid(
        [torch.arange(h, device=x.device), torch.arange(w, device=x.device)], indexing='ij'
    )
    angles = torch.cat([t.unsqueeze(-1) * theta for t in grid], dim=-1)
    cos, sin = torch.cos(angles).unsqueeze(-1), torch.sin(angles).unsqueeze(-1)
    x = x.reshape(*x.shape[:-1], -1, 2)
    re, im = x[..., :1], x[..., 1:]
    return torch.cat([re * cos - im * sin, im * cos + re * sin], dim=-1).flatten(-2)


class _Conv(nn.Module):
    def __init__(self, cin, cout, k, stride=1, pad=0, groups=1, bias=True, norm=True, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(cout) if norm else None
        self.act = nn.ReLU() if act else None

    def forward(self, x):
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return self.act(x) if self.act is not None else x


class _Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qk = nn.Linear(dim, dim * 2)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x, hw):
        b, n, c = x.shape
        h, w = hw
        heads, d = self.num_heads, c // self.num_heads
        qk = self.qk(x).reshape(b, n, 2, c).permute(2, 0, 1, 3)
        q, k, v = F.elu(qk[0]) + 1.0, F.elu(qk[1]) + 1.0, x
        q_rope = plain_rope(q.reshape(b, h, w, c), h, w).reshape(b, n, heads, d).permute(0, 2, 1, 3)
        k_rope = plain_rope(k.reshape(b, h, w, c), h, w).reshape(b, n, heads, d).permute(0, 2, 1, 3)
        q = q.reshape(b, n, heads, d).permute(0, 2, 1, 3)
        k = k.reshape(b, n, heads, d).permute(0, 2, 1, 3)
        v = v.reshape(b, n, heads, d).permute(0, 2, 1, 3)
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = (k_rope.transpose(-2, -1) * (n**-0.5)) @ (v * (n**-0.5))
        x = (q_rope @ kv * z).transpose(1, 2).reshape(b, n, c)
        v = v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.lepe(v).permute(0, 2, 3, 1).reshape(b, n, c)


def _nchw(x, hw):
    b, n, c = x.shape
    return x.reshape(b, *hw, c).permute(0, 3, 1, 2)


class _Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.attn = _Attention(dim, num_heads)
        self.out_proj = nn.Linear(dim, dim)
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x, hw):
        x = x + self.cpe1(_nchw(x, hw)).flatten(2).permute(0, 2, 1)
        shortcut = x
        x = self.norm1(x)
        act_res = F.silu(self.act_proj(x))
        x = F.silu(self.dwc(_nchw(self.in_proj(x), hw))).permute(0, 2, 3, 1).flatten(1, 2)
        x = self.out_proj(self.attn(x, hw) * act_res)
        x = shortcut + x
        x = x + self.cpe2(_nchw(x, hw)).flatten(2).permute(0, 2, 1)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class _Merge(nn.Module):
    def __init__(self, dim):
        super().__init__()
        hid = dim * 8
        self.conv = nn.Sequential(
            _Conv(dim, hid, 1, norm=False),
            _Conv(hid, hid, 3, 2, 1, groups=hid, norm=False),
            _Conv(hid, 2 * dim, 1, act=False),
        )

    def forward(self, x, hw):
        b, n, c = x.shape
        h, w = hw
        x = F.pad(x.reshape(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        x = self.conv(x.permute(0, 3, 1, 2))
        return x.flatten(2).permute(0, 2, 1), tuple(x.shape[2:])


class PlainMLLA(nn.Module):
    """Official-equation MLLA (inference and training), same state-dict keys as ``mlla_mm.MLLA``.

    Args:
        embed_dims: Width of stage 0.
        depths: Blocks per stage.
        num_heads: Heads per stage.
        out_indices: Stages to return, each through ``norm{i}``.
        in_channels: Input channels.
        mlp_ratio: MLP expansion.
    """

    def __init__(
        self,
        embed_dims: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        out_indices: Sequence[int] = (0, 1, 2, 3),
        in_channels: int = 3,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices)
        c, mid = embed_dims, embed_dims // 2
        self.patch_embed = nn.Module()
        self.patch_embed.conv1 = _Conv(in_channels, mid, 3, 2, 1, bias=False)
        self.patch_embed.conv2 = nn.Sequential(
            _Conv(mid, mid, 3, 1, 1, bias=False), _Conv(mid, mid, 3, 1, 1, bias=False, act=False)
        )
        self.patch_embed.conv3 = nn.Sequential(
            _Conv(mid, c * 4, 3, 2, 1, bias=False), _Conv(c * 4, c, 1, bias=False, act=False)
        )
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stage = nn.Module()
            stage.blocks = nn.ModuleList(_Block(c * 2**i, heads, mlp_ratio) for _ in range(depth))
            stage.downsample = _Merge(c * 2**i) if i < len(depths) - 1 else None
            self.layers.append(stage)
        for i in self.out_indices:
            self.add_module(f'norm{i}', nn.LayerNorm(c * 2**i))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, w = x.shape[-2:]
        if w % 4:
            x = F.pad(x, (0, 4 - w % 4))
        if h % 4:
            x = F.pad(x, (0, 0, 0, 4 - h % 4))
        pe = self.patch_embed
        x = pe.conv1(x)
        x = pe.conv2(x) + x
        x = pe.conv3(x)
        hw = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        outs = []
        for i, stage in enumerate(self.layers):
            for block in stage.blocks:
                x = block(x, hw)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(x)
                outs.append(out.view(-1, *hw, out.shape[-1]).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x, hw = stage.downsample(x, hw)
        return tuple(outs)
