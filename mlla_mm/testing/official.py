"""Stand-ins for the official MLLA checkpoints, which these machines cannot download."""

from __future__ import annotations

import torch

__all__ = ['fake_official_state_dict']


def fake_official_state_dict(layout: dict, seed: int = 0) -> dict:
    """Random tensors with every key and shape of an official checkpoint layout.

    Args:
        layout: ``{key: shape}``, one entry of ``tests/data/mlla_official_layouts.json``.
        seed: Seed of the values.

    Returns:
        dict: A state dict: BatchNorm counters are integers, variances positive, the rest small.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout.items():
        if key.endswith('num_batches_tracked'):
            sd[key] = torch.tensor(7)
        elif key.endswith('running_var'):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=g) * 0.05
    return sd
