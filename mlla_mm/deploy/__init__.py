"""Deployment of MLLA models: ONNX export with verified onnxruntime parity, and ``torch.compile``.

* :mod:`~mlla_mm.deploy.wrappers`: what is exported (the backbone, whole segmentors,
  classifiers and detectors), from an arch name or a config, with either kind of checkpoint;
* :mod:`~mlla_mm.deploy.onnx_export`: ONNX files with dynamic batch, height and width;
* :mod:`~mlla_mm.deploy.parity`: onnxruntime against PyTorch at other input sizes;
* :mod:`~mlla_mm.deploy.compile`: eager against ``torch.compile`` (dynamic shapes);
* :mod:`~mlla_mm.deploy.mask_rcnn_graph`: the whole Mask R-CNN as one graph of standard ONNX
  operators, with its export (:mod:`~mlla_mm.deploy.mask_rcnn_export`) and its checks against
  mmdet (:mod:`~mlla_mm.deploy.mask_rcnn_parity`).

The names of the first four are importable from here.
"""

from .compile import benchmark_compile
from .onnx_export import (
    EXPORTERS,
    ShapeGenericAdaptiveAvgPool2d,
    export_onnx,
    onnx_io_dims,
    require_exporter,
)
from .parity import ParityResult, assert_parity, check_onnx_parity, default_check_shapes
from .wrappers import (
    ClassifierLogits,
    DetectorFeatures,
    SegmentorLogits,
    build_backbone,
    build_whole_model,
    load_backbone_weights,
)

__all__ = [
    'EXPORTERS',
    'ClassifierLogits',
    'DetectorFeatures',
    'ParityResult',
    'SegmentorLogits',
    'ShapeGenericAdaptiveAvgPool2d',
    'assert_parity',
    'benchmark_compile',
    'build_backbone',
    'build_whole_model',
    'check_onnx_parity',
    'default_check_shapes',
    'export_onnx',
    'load_backbone_weights',
    'onnx_io_dims',
    'require_exporter',
]
