"""Deprecated: moved to mlla_mm.utils.resources; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.resources', 'mlla_mm.utils.resources')
from mlla_mm.utils.resources import *  # noqa: E402,F401,F403
