"""MESA: the official MLLA ImageNet recipe's self-distillation from the EMA of the weights.

The official ``main.py`` (LeapLabTHU/MLLA, ``train_one_epoch``) adds, from epoch
``int(0.25 * EPOCHS)`` on (75 of 300), a second soft-target cross-entropy against the EMA model's
prediction on the same (Mixup/CutMix-mixed) batch::

    ema_output = model_ema.ema(samples).softmax(dim=-1)     # no gradient, EMA in eval mode
    loss = criterion(outputs, targets) + criterion(outputs, ema_output) * mesa

with ``criterion = SoftTargetCrossEntropy()`` (Mixup is on) and ``mesa`` = 1.0 / 1.5 / 2.0 for
MLLA-T / S / B (``AUG.MESA`` in ``cfgs/mlla_*.yaml``). No temperature, no KL: the plain
cross-entropy ``mean_b sum_k -softmax(t_b)_k * log_softmax(s_b)_k``.

Here it is two pieces that a config selects:

* :class:`MESAImageClassifier`, mmpretrain's ``ImageClassifier`` (same arguments, same state
  dict) whose ``loss`` returns the label term as ``loss_cls`` and, while a teacher is attached,
  that term as ``loss_mesa``;
* :class:`~mlla_mm.engine.hooks.MESAHook` (:mod:`mlla_mm.engine.hooks.mesa_hook`), which
  attaches the ``EMAHook``'s averaged model as the teacher from the start epoch on.

Needs mmpretrain (``pip install -e ".[cls]"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlla_mm.registry import MODELS
from mlla_mm.utils import require

require('mmpretrain', 'MESA (mlla_mm.models.classifiers)')
from mmpretrain.models import ImageClassifier  # noqa: E402

__all__ = ['MESAImageClassifier', 'mesa_loss']


def mesa_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, ratio: float
) -> torch.Tensor:
    """``ratio`` times the soft-target cross-entropy of the student against the teacher.

    ``ratio * mean_b sum_k -softmax(teacher)_bk * log_softmax(student)_bk``, in float32 (as
    autocast runs softmax and log_softmax); the teacher's logits are detached.

    Args:
        student_logits: (B, K) logits that receive the gradient.
        teacher_logits: (B, K) logits of the teacher on the same inputs.
        ratio: Weight of the term (the official ``AUG.MESA``).

    Returns:
        torch.Tensor: The scalar loss.
    """
    target = teacher_logits.detach().float().softmax(dim=-1)
    log_prob = F.log_softmax(student_logits.float(), dim=-1)
    return ratio * torch.sum(-target * log_prob, dim=-1).mean()


@MODELS.register_module()
class MESAImageClassifier(ImageClassifier):
    """mmpretrain's ``ImageClassifier`` plus the MESA term while a teacher is attached.

    Takes exactly ``ImageClassifier``'s arguments and has its state dict. ``loss`` returns the
    head's loss as ``loss_cls``, so that the ``loss`` mmengine logs is the total that is
    optimised; with a teacher attached (:meth:`set_mesa`, which :class:`MESAHook` calls) it adds
    ``loss_mesa = mesa_loss(student, teacher, ratio)``, where the teacher sees the same
    preprocessed (mixed) inputs, runs in eval mode and gets no gradient.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.head, '_get_loss'):
            raise TypeError(
                f'MESAImageClassifier needs an mmpretrain ClsHead (with _get_loss), got '
                f'{type(self.head).__name__}'
            )
        # A plain attribute (not a submodule): the teacher stays out of state_dict() and
        # parameters(), so optimisers, DDP and checkpoints never see it.
        self._mesa: tuple[nn.Module, float] | None = None

    @property
    def mesa_ratio(self) -> float:
        """Weight of the MESA term now (0.0 while no teacher is attached)."""
        return 0.0 if self._mesa is None else self._mesa[1]

    def set_mesa(self, teacher: nn.Module | None, ratio: float = 0.0) -> None:
        """Attach (or with ``teacher=None`` detach) the teacher.

        Args:
            teacher: A classifier whose ``teacher(inputs, mode='tensor')`` gives logits (the EMA
                copy of this model); put in eval mode here.
            ratio: Weight of the term; 0 detaches the teacher.
        """
        if teacher is None or ratio == 0:
            self._mesa = None
            return
        if ratio < 0:
            raise ValueError(f'MESA ratio must be >= 0, got {ratio}')
        teacher.eval()
        self._mesa = (teacher, float(ratio))

    def loss(self, inputs: torch.Tensor, data_samples: list) -> dict:
        """``loss_cls`` (the head's loss), plus ``loss_mesa`` while a teacher is attached."""
        teacher_logits = None
        if self._mesa is not None:
            with torch.no_grad():
                teacher_logits = self._mesa[0](inputs, mode='tensor')
        cls_score = self.head(self.extract_feat(inputs))
        losses = self.head._get_loss(cls_score, data_samples)
        # mmengine logs the total of every '*loss*' entry as 'loss'; a head entry named 'loss'
        # would overwrite it in the log.
        if 'loss' in losses:
            losses['loss_cls'] = losses.pop('loss')
        if teacher_logits is not None:
            losses['loss_mesa'] = mesa_loss(cls_score, teacher_logits, self._mesa[1])
        return losses
