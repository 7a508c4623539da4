"""The hook of MESA: the EMA model of the weights as the teacher of
:class:`~mlla_mm.models.classifiers.MESAImageClassifier`, from the official start epoch on."""

from __future__ import annotations

from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner import EpochBasedTrainLoop
from torch import nn

from mlla_mm.registry import HOOKS

__all__ = ['MESAHook']


@HOOKS.register_module()
class MESAHook(Hook):
    """Switch MESA on from ``begin_epoch``, with the ``EMAHook``'s averaged model as teacher.

    Needs ``model.type='mlla_mm.MESAImageClassifier'`` and an ``EMAHook`` with
    ``update_buffers=True`` (the teacher's BatchNorm statistics are then the average of the
    model's, as timm's ``ModelEma`` of the official code keeps them) in ``custom_hooks``.

    Args:
        ratio: Weight of the MESA term (official: 1.0 / 1.5 / 2.0 for MLLA-T / S / B); 0 turns
            MESA off.
        begin_epoch: First epoch (0-based, as ``runner.epoch``) with MESA. None: the official
            ``int(0.25 * max_epochs)``, i.e. 75 of 300.
    """

    priority = 'NORMAL'

    def __init__(self, ratio: float, begin_epoch: int | None = None) -> None:
        if ratio < 0:
            raise ValueError(f'MESAHook ratio must be >= 0, got {ratio}')
        if begin_epoch is not None and begin_epoch < 0:
            raise ValueError(f'MESAHook begin_epoch must be >= 0, got {begin_epoch}')
        self.ratio = float(ratio)
        self.begin_epoch = begin_epoch
        self._teacher: nn.Module | None = None

    def start_epoch(self, max_epochs: int) -> int:
        """The first epoch with MESA for a run of ``max_epochs`` epochs."""
        return int(0.25 * max_epochs) if self.begin_epoch is None else self.begin_epoch

    @staticmethod
    def _model(runner) -> nn.Module:
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def before_train(self, runner) -> None:
        """Find the teacher and check that the model and the loop support MESA."""
        model = self._model(runner)
        if not hasattr(model, 'set_mesa'):
            raise TypeError(
                f'MESAHook needs model.type="mlla_mm.MESAImageClassifier" (an ImageClassifier '
                f'whose loss adds the MESA term), got {type(model).__name__}'
            )
        ema = [h for h in runner.hooks if isinstance(h, EMAHook)]
        if not ema:
            raise RuntimeError(
                "MESAHook's teacher is the EMA of the weights: add dict(type='EMAHook', "
                'momentum=..., update_buffers=True) to custom_hooks'
            )
        if not ema[0].ema_model.update_buffers:
            raise ValueError(
                'MESAHook needs EMAHook(update_buffers=True): without it the teacher keeps the '
                'BatchNorm statistics it was created with (the official timm ModelEma averages '
                'the buffers too)'
            )
        if not isinstance(runner.train_loop, EpochBasedTrainLoop):
            raise TypeError(
                f'MESAHook switches on by epoch and needs an EpochBasedTrainLoop, got '
                f'{type(runner.train_loop).__name__}'
            )
        self._teacher = ema[0].ema_model.module
        print_log(
            f'MESA: ratio {self.ratio:g} from epoch {self.start_epoch(runner.max_epochs)} '
            '(0-based), teacher = EMA model',
            logger='current',
        )

    def before_train_epoch(self, runner) -> None:
        """Attach the teacher from the start epoch on (also after a resume)."""
        on = self.ratio > 0 and runner.epoch >= self.start_epoch(runner.max_epochs)
        self._model(runner).set_mesa(self._teacher if on else None, self.ratio)

    def after_train(self, runner) -> None:
        """Detach the teacher."""
        self._model(runner).set_mesa(None)
