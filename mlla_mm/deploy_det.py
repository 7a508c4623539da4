"""Deprecated: moved to mlla_mm.deploy.mask_rcnn_graph; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.deploy_det', 'mlla_mm.deploy.mask_rcnn_graph')
from mlla_mm.deploy.mask_rcnn_graph import *  # noqa: E402,F401,F403
