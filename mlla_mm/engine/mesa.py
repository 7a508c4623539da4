"""Deprecated: split into mlla_mm.models.classifiers.mesa and mlla_mm.engine.hooks.mesa_hook;
this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved(
    'mlla_mm.engine.mesa', 'mlla_mm.models.classifiers.mesa', 'mlla_mm.engine.hooks.mesa_hook'
)
from mlla_mm.engine.hooks.mesa_hook import *  # noqa: E402,F401,F403
from mlla_mm.models.classifiers.mesa import *  # noqa: E402,F401,F403
