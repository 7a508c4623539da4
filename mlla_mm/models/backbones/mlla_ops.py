"""Deprecated alias of :mod:`mlla_mm.models.backbones.fast_path` (the old module name).

The capability flags and the memory helpers keep working from here for one release.
"""

from .fast_path import CAPS, Capabilities, keep_freed_memory, release_workspace, workspace

__all__ = ['CAPS', 'Capabilities', 'keep_freed_memory', 'release_workspace', 'workspace']
