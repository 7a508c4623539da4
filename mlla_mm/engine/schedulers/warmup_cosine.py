"""The official MLLA ImageNet learning-rate schedule as an mmengine parameter scheduler.

The official ``lr_scheduler.py`` (inherited from the Swin Transformer code) builds timm's
``CosineLRScheduler(t_initial=EPOCHS * n_iter, warmup_t=WARMUP_EPOCHS * n_iter,
warmup_lr_init=WARMUP_LR, lr_min=MIN_LR, cycle_limit=1, t_in_epochs=False)`` and steps it every
iteration. Its cosine counts from iteration 0, not from the end of the warm-up, which mmengine's
``LinearLR`` + ``CosineAnnealingLR`` pair cannot express; :class:`WarmupCosineLR` does.
"""

from __future__ import annotations

import math

from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler

from mlla_mm.registry import PARAM_SCHEDULERS

__all__ = ['WarmupCosineLR']


@PARAM_SCHEDULERS.register_module()
class WarmupCosineLR(LRSchedulerMixin, _ParamScheduler):
    """Linear warm-up, then a cosine whose phase counts from step 0 (timm's CosineLRScheduler).

    With ``base`` each parameter group's initial lr, ``w = warmup_start_ratio * base``,
    ``m = eta_min_ratio * base``, ``W = warmup`` and ``T = T_max``, the lr at step ``t`` (counted
    from ``begin``) is::

        w + (base - w) * t / W                       for t < W
        m + (base - m) * (1 + cos(pi * t / T)) / 2   for W <= t < T
        m                                            for t >= T

    So the warm-up ends at ``base`` and the next step is already on the cosine at ``t = W``
    (0.989 * base for the official 20 of 300 epochs). The ratios (rather than absolute lrs) keep
    the official linear scaling rule: ``WARMUP_LR`` and ``MIN_LR`` scale with the batch size
    exactly like the base lr, so ``auto_scale_lr`` scales all three.

    Args:
        optimizer: Wrapped optimizer or optimizer.
        warmup: ``W``, the warm-up length in steps (epochs when ``by_epoch``; converted with
            ``convert_to_iter_based=True`` as ``int(warmup * epoch_length)``, as the official
            code does).
        warmup_start_ratio: Warm-up start lr over the base lr (official: WARMUP_LR / BASE_LR).
        eta_min_ratio: Final lr over the base lr (official: MIN_LR / BASE_LR).
        T_max: ``T``, the length of the cosine counted from ``begin``; ``end - begin`` if None.
        begin: First step the scheduler acts on.
        end: Step after the last one it acts on (the runner's max epochs/iterations if unset).
        last_step: For resuming without a state dict.
        by_epoch: Whether ``begin``, ``end``, ``warmup`` and ``T_max`` count epochs.
        verbose: Log every update.

    Raises:
        ValueError: If ``warmup`` is negative or not shorter than ``T_max``, or a ratio is
            negative.
    """

    def __init__(
        self,
        optimizer,
        warmup: int,
        warmup_start_ratio: float,
        eta_min_ratio: float,
        T_max: int | None = None,
        begin: int = 0,
        end: int = INF,
        last_step: int = -1,
        by_epoch: bool = True,
        verbose: bool = False,
    ) -> None:
        T_max = T_max if T_max is not None else end - begin
        if not 0 <= warmup < T_max:
            raise ValueError(
                f'WarmupCosineLR needs 0 <= warmup < T_max, got warmup={warmup}, T_max={T_max}; '
                'T_max defaults to end - begin (the max epochs when end is not set)'
            )
        if warmup_start_ratio < 0 or eta_min_ratio < 0:
            raise ValueError(
                'WarmupCosineLR ratios are fractions of the base lr and cannot be negative, got '
                f'warmup_start_ratio={warmup_start_ratio}, eta_min_ratio={eta_min_ratio}'
            )
        self.warmup = warmup
        self.warmup_start_ratio = warmup_start_ratio
        self.eta_min_ratio = eta_min_ratio
        self.T_max = T_max
        super().__init__(
            optimizer, begin=begin, end=end, last_step=last_step, by_epoch=by_epoch, verbose=verbose
        )

    @classmethod
    def build_iter_from_epoch(
        cls,
        *args,
        warmup: int,
        T_max: int | None = None,
        begin: int = 0,
        end: int = INF,
        by_epoch: bool = True,
        epoch_length: int | None = None,
        **kwargs,
    ) -> WarmupCosineLR:
        """Build the iteration-based scheduler from epoch counts (``convert_to_iter_based``)."""
        if not by_epoch:
            raise ValueError('convert_to_iter_based needs an epoch-based config (by_epoch=True)')
        if not epoch_length or epoch_length <= 0:
            raise ValueError(f'epoch_length must be a positive integer, got {epoch_length}')
        return cls(
            *args,
            warmup=int(warmup * epoch_length),
            T_max=None if T_max is None else int(T_max * epoch_length),
            begin=int(begin * epoch_length),
            end=end if end == INF else int(end * epoch_length),
            by_epoch=False,
            **kwargs,
        )

    def _get_value(self) -> list[float]:
        """The closed-form lr of every parameter group at ``self.last_step``."""
        t = self.last_step
        values = []
        for base in self.base_values:
            if t < self.warmup:
                start = base * self.warmup_start_ratio
                values.append(start + (base - start) * t / self.warmup)
            elif t < self.T_max:
                low = base * self.eta_min_ratio
                values.append(low + 0.5 * (base - low) * (1 + math.cos(math.pi * t / self.T_max)))
            else:
                values.append(base * self.eta_min_ratio)
        return values
