"""Deprecated: split into mlla_mm.deploy.mask_rcnn_{graph,export,parity}; this path works
until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved(
    'mlla_mm.deploy_det',
    'mlla_mm.deploy.mask_rcnn_graph',
    'mlla_mm.deploy.mask_rcnn_export',
    'mlla_mm.deploy.mask_rcnn_parity',
)
from mlla_mm.deploy.mask_rcnn_export import *  # noqa: E402,F401,F403
from mlla_mm.deploy.mask_rcnn_graph import *  # noqa: E402,F401,F403
from mlla_mm.deploy.mask_rcnn_parity import *  # noqa: E402,F401,F403
