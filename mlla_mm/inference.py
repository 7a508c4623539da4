"""Deprecated: moved to mlla_mm.apis.inference; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.inference', 'mlla_mm.apis.inference')
from mlla_mm.apis.inference import *  # noqa: E402,F401,F403
