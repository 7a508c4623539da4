"""Deprecated: moved to mlla_mm.utils.safe_load; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.safe_load', 'mlla_mm.utils.safe_load')
from mlla_mm.utils.safe_load import *  # noqa: E402,F401,F403
