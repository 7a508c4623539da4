"""The one registry of mlla_mm.

``MODELS`` is a child of mmengine's root ``MODELS`` registry with scope ``mlla_mm``, so
``type='mlla_mm.MLLA'`` resolves from mmdet, mmseg and mmpretrain configs alike once the package
is imported (``custom_imports=dict(imports=['mlla_mm'], allow_failed_imports=False)``).
"""

from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import Registry

__all__ = ['MODELS']

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='mlla_mm', locations=['mlla_mm.models'])
