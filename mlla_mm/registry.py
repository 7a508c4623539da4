"""The registries of mlla_mm: one child of each mmengine root registry it adds to.

``MODELS`` is a child of mmengine's root ``MODELS`` registry with scope ``mlla_mm``, so
``type='mlla_mm.MLLA'`` resolves from mmdet, mmseg and mmpretrain configs alike once the package
is imported (``custom_imports=dict(imports=['mlla_mm'], allow_failed_imports=False)``).
``HOOKS`` and ``PARAM_SCHEDULERS`` hold the classification training pieces of
:mod:`mlla_mm.engine.hooks` and :mod:`mlla_mm.engine.schedulers` (``type='mlla_mm.MESAHook'``,
``type='mlla_mm.WarmupCosineLR'``); they import those modules on first use.
"""

from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import PARAM_SCHEDULERS as MMENGINE_PARAM_SCHEDULERS
from mmengine.registry import Registry

__all__ = ['HOOKS', 'MODELS', 'PARAM_SCHEDULERS']

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mlla_mm', locations=['mlla_mm.models'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='mlla_mm', locations=['mlla_mm.engine.hooks'])
PARAM_SCHEDULERS = Registry(
    'parameter scheduler',
    parent=MMENGINE_PARAM_SCHEDULERS,
    scope='mlla_mm',
    locations=['mlla_mm.engine.schedulers'],
)
