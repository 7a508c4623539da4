"""MLLA (Mamba-Like Linear Attention) backbones for the OpenMMLab 2.0 stack.

Importing this package registers ``mlla_mm.MLLA`` in the ``mlla_mm`` registry (a child of
mmengine's ``MODELS``) and allow-lists the types mmengine's Runner pickles into its checkpoints,
so that ``torch.load(weights_only=True)`` (the default from torch 2.6) loads them. Only ``torch``
and ``mmengine`` are needed; the task pieces import mmdet/mmseg/mmpretrain lazily. It also lets
configs inherit the shipped configs as ``_base_ = 'mlla_mm::NAME'``
(:mod:`mlla_mm.utils.resources`).
"""

import torch as _torch

from .utils import check_torch_version as _check_torch_version
from .utils.resources import check_tool_checkout as _check_tool_checkout
from .utils.resources import register_config_prefix as _register_config_prefix

_check_tool_checkout()
_check_torch_version(_torch.__version__)

from .models import MLLA  # noqa: E402
from .registry import MODELS  # noqa: E402
from .utils.safe_load import (  # noqa: E402
    CheckpointFileError,
    register_checkpoint_check,
    register_safe_globals,
)

__version__ = '0.1.0'
__all__ = [
    'MLLA',
    'MODELS',
    'CheckpointFileError',
    'MLLAInferencer',
    'register_safe_globals',
    '__version__',
]


def __getattr__(name: str):
    # Lazy: the inferencer (mlla_mm/inference.py) needs mmdet/mmseg/mmpretrain only when used.
    if name == 'MLLAInferencer':
        from .apis.inference import MLLAInferencer

        return MLLAInferencer
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


register_safe_globals()
register_checkpoint_check()
_register_config_prefix()
