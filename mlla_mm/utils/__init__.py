"""Utilities of mlla_mm: optional libraries, shipped resources, checkpoint safety, tool support."""

from .dependencies import EXTRAS, MIN_TORCH, check_torch_version, require

__all__ = ['EXTRAS', 'MIN_TORCH', 'check_torch_version', 'require']
