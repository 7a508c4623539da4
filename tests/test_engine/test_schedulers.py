"""WarmupCosineLR reproduces timm's CosineLRScheduler as the official MLLA code builds it."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip('mmpretrain')

from mmengine.registry import PARAM_SCHEDULERS  # noqa: E402

import mlla_mm.engine  # noqa: E402, F401  (registers mlla_mm.WarmupCosineLR)


def timm_cosine_lr(t: int, base: float, warmup_lr: float, min_lr: float, W: int, T: int) -> float:
    """timm 0.4.12 CosineLRScheduler._get_lr(t) with t_mul=1, decay_rate=1, cycle_limit=1."""
    if t < W:
        step = (base - warmup_lr) / W
        return warmup_lr + t * step
    i = t // T
    if i < 1:
        return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * (t - T * i) / T))
    return min_lr


def lrs_of(cfg: dict, lr: float, epoch_length: int, steps: int) -> list:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = PARAM_SCHEDULERS.build(cfg, default_args=dict(optimizer=opt, epoch_length=epoch_length))
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]['lr'])
        opt.step()
        sched.step()
    return out


def test_matches_timm_cosine_per_iteration():
    # 2 warm-up epochs of 5 iterations, 6 epochs in all: W = 10, T = 30 iterations.
    cfg = dict(
        type='mlla_mm.WarmupCosineLR',
        warmup=2,
        warmup_start_ratio=5e-7 / 5e-4,
        eta_min_ratio=5e-6 / 5e-4,
        by_epoch=True,
        end=6,
        convert_to_iter_based=True,
    )
    got = lrs_of(cfg, lr=1e-3, epoch_length=5, steps=30)
    want = [timm_cosine_lr(t, 1e-3, 1e-6, 1e-5, W=10, T=30) for t in range(30)]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert got[0] == pytest.approx(1e-6)
    # The cosine counts from iteration 0: after the warm-up it starts below the base lr.
    assert got[9] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 9 / 10)
    assert got[10] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 3)))
    assert got[10] < 1e-3 * 0.8


def test_every_param_group_scales_with_its_own_lr():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{'params': params[0]}, {'params': params[1], 'lr': 2.0}], lr=1.0)
    sched = PARAM_SCHEDULERS.build(
        dict(type='mlla_mm.WarmupCosineLR', warmup=2, warmup_start_ratio=0.1, eta_min_ratio=0.0),
        default_args=dict(optimizer=opt),
    )
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([0.1, 0.2])
    sched.step()
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([0.55, 1.1])


@pytest.mark.parametrize(
    'kwargs,match',
    [
        (dict(warmup=6, end=6), 'warmup < T_max'),
        (dict(warmup=1, end=6, eta_min_ratio=-1.0), 'cannot be negative'),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = dict(type='mlla_mm.WarmupCosineLR', warmup_start_ratio=0.1, eta_min_ratio=0.0)
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PARAM_SCHEDULERS.build(cfg, default_args=dict(optimizer=opt))
