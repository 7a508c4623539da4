"""Small helpers shared by the backbone tests and benchmarks."""

from __future__ import annotations

import torch

__all__ = ['TINY_ARCH', 'rel_err']

# An MLLA small enough for fast tests, with every stage and several heads.
TINY_ARCH = dict(embed_dims=32, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64, whatever the dtypes of ``a`` and ``b``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
