"""Export of :class:`~mlla_mm.deploy.mask_rcnn_graph.MaskRCNNGraph` to ONNX, and the file's
operators and onnxruntime session."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

from mlla_mm.deploy.mask_rcnn_graph import OUTPUT_NAMES, MaskRCNNGraph
from mlla_mm.utils import require

__all__ = ['export_detector_onnx', 'onnx_ops', 'onnx_session']


def export_detector_onnx(
    graph: MaskRCNNGraph,
    out_file: str | os.PathLike,
    shape: Sequence[int] = (224, 224),
    opset: int = 17,
) -> list[str]:
    """Export :class:`MaskRCNNGraph` to ONNX (TorchScript exporter), dynamic height and width.

    Args:
        graph: The module to export.
        out_file: The ``.onnx`` file to write.
        shape: (H, W) of the example image the graph is traced with (random pixels 0..255).
        opset: ONNX opset, >= 16 (``RoiAlign`` with ``half_pixel``).

    Returns:
        list[str]: The output names (input: ``'image'``).
    """
    if opset < 16:
        raise ValueError(f'opset must be >= 16 (RoiAlign half_pixel mode), got {opset}')
    graph = graph.eval()
    image = torch.rand(1, 3, *shape, generator=torch.Generator().manual_seed(0)) * 255
    names = list(OUTPUT_NAMES[: 5 if graph.paste_masks else 4])
    axes = {'image': {2: 'height', 3: 'width'}}
    for name in names:
        axes[name] = {0: 'detections'}
    if graph.paste_masks:
        axes['masks'].update({1: 'height', 2: 'width'})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')
        torch.onnx.export(
            graph, (image,), str(out_file), dynamo=False, opset_version=opset,
            input_names=['image'], output_names=names, dynamic_axes=axes,
        )  # fmt: skip
    _set_static_dims(out_file, dict(boxes=(1, (4,)), mask_probs=(1, graph.mask_size)))
    return names


def _set_static_dims(onnx_file, dims: dict) -> None:
    """Write the fixed output dims the exporter's shape inference lost (e.g. boxes (N, 4))."""
    onnx = require('onnx', 'ONNX export')
    proto = onnx.load(str(onnx_file))
    for value in proto.graph.output:
        if value.name in dims:
            start, sizes = dims[value.name]
            for i, size in enumerate(sizes):
                dim = value.type.tensor_type.shape.dim[start + i]
                dim.Clear()
                dim.dim_value = size
    onnx.save(proto, str(onnx_file))


def onnx_ops(onnx_file: str | os.PathLike) -> dict[str, int]:
    """Operator types of an ONNX graph (sub-graphs included) with their counts, by domain-less
    name; a custom domain is written ``domain::Op``."""
    onnx = require('onnx', 'ONNX export')
    counts: dict[str, int] = {}

    def visit(graph) -> None:
        for node in graph.node:
            name = f'{node.domain}::{node.op_type}' if node.domain else node.op_type
            counts[name] = counts.get(name, 0) + 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g)

    visit(onnx.load(str(onnx_file), load_external_data=False).graph)
    return counts


def onnx_session(onnx_file: str | os.PathLike, threads: int = 0):
    """An onnxruntime CPU session of ``onnx_file`` (``threads`` intra-op threads, 0: default)."""
    ort = require('onnxruntime', 'ONNX parity checks')
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_file), options, providers=['CPUExecutionProvider'])
