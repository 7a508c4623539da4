"""Deprecated: moved to mlla_mm.utils.config_check; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.tools_utils', 'mlla_mm.utils.config_check')
from mlla_mm.utils.config_check import *  # noqa: E402,F401,F403
