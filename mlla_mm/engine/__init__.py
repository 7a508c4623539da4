"""Training pieces of the official MLLA ImageNet recipe for mmengine/mmpretrain.

* :class:`MESAHook` + :class:`MESAImageClassifier`: MESA, the self-distillation from the EMA
  model of the official ``main.py``.
* :class:`WarmupCosineLR`: the official per-iteration schedule (timm's ``CosineLRScheduler``).

The classification configs import this module (``custom_imports``); it needs mmpretrain.
"""

from mlla_mm.models.classifiers.mesa import MESAHook, MESAImageClassifier, mesa_loss
from .schedulers import WarmupCosineLR

__all__ = ['MESAHook', 'MESAImageClassifier', 'WarmupCosineLR', 'mesa_loss']
