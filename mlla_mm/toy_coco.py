"""Deprecated: moved to mlla_mm.datasets.toy_coco; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.toy_coco', 'mlla_mm.datasets.toy_coco')
from mlla_mm.datasets.toy_coco import *  # noqa: E402,F401,F403
