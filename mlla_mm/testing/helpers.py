"""Small helpers shared by the backbone tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ['TINY_ARCH', 'randomise_bn', 'rel_err']

# An MLLA small enough for fast tests, with every stage and several heads.
TINY_ARCH = dict(embed_dims=32, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64, whatever the dtypes of ``a`` and ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomise_bn(model: nn.Module, seed: int = 1) -> torch.Generator:
    """Give every ``BatchNorm2d`` of ``model`` non-trivial statistics and affine parameters, so
    that BatchNorm folding and padding are really exercised.

    Returns:
        torch.Generator: The generator drawn from (seeded with ``seed``), for further draws.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return g
