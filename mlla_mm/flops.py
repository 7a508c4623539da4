"""Deprecated: moved to mlla_mm.analysis.flops; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.flops', 'mlla_mm.analysis.flops')
from mlla_mm.analysis.flops import *  # noqa: E402,F401,F403
