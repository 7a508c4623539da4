"""Deprecated: moved to mlla_mm.apis.conversion; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.convert', 'mlla_mm.apis.conversion')
from mlla_mm.apis.conversion import *  # noqa: E402,F401,F403
