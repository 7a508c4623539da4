"""MLLA (Mamba-Like Linear Attention) backbones for the OpenMMLab 2.0 stack.

Importing this package registers ``mlla_mm.MLLA`` in the ``mlla_mm`` registry (a child of
mmengine's ``MODELS``) and allow-lists the types mmengine's Runner pickles into its checkpoints,
so that ``torch.load(weights_only=True)`` (the default from torch 2.6) loads them. Only ``torch``
and ``mmengine`` are needed; the task pieces import mmdet/mmseg/mmpretrain lazily.
"""

from .models import MLLA
from .registry import MODELS
from .safe_load import register_safe_globals

__version__ = '0.1.0'
__all__ = ['MLLA', 'MODELS', 'register_safe_globals', '__version__']

register_safe_globals()
