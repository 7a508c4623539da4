"""Deployment: ONNX export of the backbone and of whole models, and parity checks.

The whole Mask R-CNN as one exportable graph is in :mod:`mlla_mm.deploy.mask_rcnn_graph`.
"""

from .onnx_export import *  # noqa: F401,F403
from .onnx_export import __all__  # noqa: F401
