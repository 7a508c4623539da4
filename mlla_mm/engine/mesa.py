"""Deprecated: moved to mlla_mm.models.classifiers.mesa; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.engine.mesa', 'mlla_mm.models.classifiers.mesa')
from mlla_mm.models.classifiers.mesa import *  # noqa: E402,F401,F403
