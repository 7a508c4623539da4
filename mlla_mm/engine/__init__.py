"""Training pieces of the official MLLA ImageNet recipe for mmengine/mmpretrain.

* :class:`~mlla_mm.engine.hooks.MESAHook` (:mod:`mlla_mm.engine.hooks`) with
  :class:`~mlla_mm.models.classifiers.MESAImageClassifier` (:mod:`mlla_mm.models.classifiers`):
  MESA, the self-distillation from the EMA model of the official ``main.py``.
* :class:`~mlla_mm.engine.schedulers.WarmupCosineLR` (:mod:`mlla_mm.engine.schedulers`): the
  official per-iteration schedule (timm's ``CosineLRScheduler``).

The classification configs import this module (``custom_imports``); it registers the hook, the
scheduler and the classifier (which needs mmpretrain), so configs written for the earlier
``mlla_mm/engine/mesa.py`` keep working.
"""

from mlla_mm.models.classifiers import MESAImageClassifier, mesa_loss

from .hooks import MESAHook
from .schedulers import WarmupCosineLR

__all__ = ['MESAHook', 'MESAImageClassifier', 'WarmupCosineLR', 'mesa_loss']
