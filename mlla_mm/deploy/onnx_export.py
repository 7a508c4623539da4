"""ONNX export with dynamic batch, height and width.

MLLA needs no custom operator (no selective-scan kernel, RoPE in real arithmetic), so the backbone
and the whole models of :mod:`mlla_mm.deploy.wrappers` export to plain ONNX. UperNet's
``AdaptiveAvgPool2d`` pyramid pooling is swapped for an exact, shape-generic equivalent before
export (:class:`ShapeGenericAdaptiveAvgPool2d`). Mask R-CNN has its own export
(:mod:`mlla_mm.deploy.mask_rcnn_export`).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from mlla_mm.deploy.wrappers import ClassifierLogits, SegmentorLogits
from mlla_mm.models.backbones.mlla import MLLA
from mlla_mm.utils import require

__all__ = [
    'EXPORTERS',
    'ShapeGenericAdaptiveAvgPool2d',
    'export_onnx',
    'onnx_io_dims',
    'require_exporter',
]


EXPORTERS = ('torchscript', 'dynamo')


def _pool_matrix(size, out: int, like: torch.Tensor) -> torch.Tensor:
    """(out, size) averaging matrix of adaptive pooling: row ``i`` averages the input range
    ``[floor(i * size / out), ceil((i + 1) * size / out))``, as ``adaptive_avg_pool2d`` does."""
    idx = torch.arange(size, device=like.device)
    i = torch.arange(out, device=like.device)
    start = torch.div(i * size, out, rounding_mode='floor')
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode='floor')
    inside = (idx[None, :] >= start[:, None]) & (idx[None, :] < end[:, None])
    weights = inside.to(like.dtype)
    return weights / weights.sum(1, keepdim=True)


class ShapeGenericAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as two averaging-matrix products built from the input's shape.

    Both ONNX exporters bake the input size of an adaptive pooling into the graph (the TorchScript
    one refuses dynamic sizes, the dynamo one exports index tables of the example size that fail at
    other sizes), which breaks UperNet's pyramid pooling. This equivalent (exact up to float
    rounding) is traced as shape arithmetic and exports for any size.
    """

    def __init__(self, output_size) -> None:
        super().__init__()
        size = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
        self.output_size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        oh = h if self.output_size[0] is None else self.output_size[0]
        ow = w if self.output_size[1] is None else self.output_size[1]
        return _pool_matrix(h, oh, x) @ x @ _pool_matrix(w, ow, x).transpose(0, 1)


def _exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``AdaptiveAvgPool2d`` made shape-generic (if it has any)."""
    if not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d):
                setattr(module, name, ShapeGenericAdaptiveAvgPool2d(child.output_size))
    return model


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _output_names(model: nn.Module, outputs: tuple) -> list[str]:
    if isinstance(model, MLLA):
        return [f'stage{i}' for i in model.out_indices]
    if isinstance(model, (SegmentorLogits, ClassifierLogits)):
        return ['logits']
    return [f'feat{i}' for i in range(len(outputs))]


def require_exporter(exporter: str = 'torchscript') -> None:
    """Fail with one line naming the ``deploy`` extra if the libraries of ``exporter`` are missing.

    Raises:
        ImportError: ``onnx`` (both exporters) or ``onnxscript`` (``'dynamo'``) is not installed.
    """
    require('onnx', 'ONNX export')
    if exporter == 'dynamo':
        require('onnxscript', 'the dynamo ONNX exporter')


def export_onnx(
    model: nn.Module,
    out_file: str | os.PathLike,
    shape: Sequence[int] = (224, 224),
    batch: int = 2,
    exporter: str = 'torchscript',
    opset: int | None = None,
) -> list[str]:
    """Export ``model`` (NCHW image -> tensor or tuple of tensors) to ONNX with dynamic batch,
    height and width.

    Args:
        model: E.g. :func:`build_backbone` (one output per stage in ``out_indices``, stage order)
            or :func:`build_whole_model`. Not modified.
        out_file: Where to write the ``.onnx`` file.
        shape: (H, W) of the example input the graph is traced with.
        batch: Batch of the example input; 2 or more (``torch.export`` fixes a batch of 1).
        exporter: ``'torchscript'`` (``torch.onnx.export(dynamo=False)``, seconds) or
            ``'dynamo'`` (``torch.export``-based, minutes on a CPU: symbolic-shape reasoning).
            The TorchScript tracer runs with autograd on, so the out-of-place code paths are
            traced: it mis-records in-place updates of views (MLLA's no-grad fast paths).
        opset: ONNX opset (default: 17 for TorchScript, the exporter's own for dynamo).

    Returns:
        list[str]: The output names (input: ``'input'``).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f'exporter must be one of {EXPORTERS}, got {exporter!r}')
    if batch < 2:
        raise ValueError('export with batch >= 2: a batch of 1 is traced as a constant')
    require_exporter(exporter)
    model.eval()  # (not chained: some backbones, e.g. mmdet's Swin, return None from train())
    model = _exportable(model)
    x = torch.randn(batch, 3, *shape)
    with torch.no_grad():
        outputs = _as_tuple(model(x))
    names = _output_names(model, outputs)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', (DeprecationWarning, FutureWarning, UserWarning))
        if exporter == 'torchscript':
            axes = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
            for name, out in zip(names, outputs):
                axes[name] = {0: 'batch'}
                if out.dim() == 4:
                    axes[name].update({2: f'{name}_height', 3: f'{name}_width'})
            with torch.enable_grad():
                torch.onnx.export(
                    model, (x,), out_file, dynamo=False, opset_version=opset or 17,
                    input_names=['input'], output_names=names, dynamic_axes=axes,
                )  # fmt: skip
        else:
            dim = torch.export.Dim
            dynamic = {0: dim('batch', min=1, max=1024), 2: dim('height', min=33, max=16384)}
            dynamic[3] = dim('width', min=33, max=16384)
            with torch.no_grad():
                torch.onnx.export(
                    model, (x,), out_file, dynamo=True, opset_version=opset,
                    input_names=['input'], output_names=names, dynamic_shapes=(dynamic,),
                    external_data=False, verbose=False,
                )  # fmt: skip
    return names


def onnx_io_dims(onnx_file: str | os.PathLike) -> dict[str, list]:
    """Input and output dims of an ONNX file: an int for a fixed dim, a name for a dynamic one."""
    onnx = require('onnx', 'ONNX export')
    proto = onnx.load(str(onnx_file), load_external_data=False)
    dims = {}
    for value in [*proto.graph.input, *proto.graph.output]:
        shape = value.type.tensor_type.shape.dim
        dims[value.name] = [d.dim_param if d.dim_param else d.dim_value for d in shape]
    return dims
