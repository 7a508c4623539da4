"""Deployment of MLLA models: ONNX export with verified onnxruntime parity, and ``torch.compile``.

MLLA needs no custom operator (no selective-scan kernel, RoPE in real arithmetic), so the backbone
and whole models built on it export to plain ONNX:

* :func:`build_backbone` / :func:`build_whole_model` build what is exported, from an arch name or
  a config, with this package's or the official checkpoints;
* :func:`export_onnx` writes an ONNX file with dynamic batch, height and width;
* :func:`check_onnx_parity` runs onnxruntime on input sizes other than the export size and
  compares with PyTorch (:func:`assert_parity` fails above a tolerance);
* :func:`benchmark_compile` times eager against ``torch.compile`` (dynamic shapes) and counts
  graphs and graph breaks.

Whole models: a segmentor exports to its logits at input resolution (UperNet included: its
``AdaptiveAvgPool2d`` pyramid pooling is swapped for an exact, shape-generic equivalent before
export, see :class:`ShapeGenericAdaptiveAvgPool2d`), a classifier to its logits, and Mask R-CNN
whole, image to boxes, scores, labels and masks (:mod:`mlla_mm.deploy.mask_rcnn_graph`, with its own export
and parity functions; :class:`DetectorFeatures` exports the backbone + neck only).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config

from mlla_mm.models.backbones.mlla import MLLA
from mlla_mm.utils import require

__all__ = [
    'EXPORTERS',
    'ParityResult',
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
]

EXPORTERS = ('torchscript', 'dynamo')


# --------------------------------------------------------------------------------------------
# What is exported
# --------------------------------------------------------------------------------------------
def load_backbone_weights(model: MLLA, checkpoint: str) -> None:
    """Load an official or this package's checkpoint into a bare backbone.

    Accepted: the official ImageNet file (``model`` entry), official downstream files and whole
    detector/segmentor/classifier checkpoints written by mmengine (``backbone.*`` keys). The
    backbone's load hook maps the keys (see ``MLLA._load_hook``).

    Raises:
        KeyError: If backbone weights other than the output norms are missing: output norms
            missing from an ImageNet checkpoint (it has ``norm3`` only) are only reported.
    """
    from mlla_mm.apis.conversion import load_official

    state_dict = load_official(checkpoint)
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith('norm')]
    if missing:
        raise KeyError(
            f'{checkpoint!r} does not hold the weights of this MLLA backbone; missing: '
            f'{missing[:8]}{" ..." if len(missing) > 8 else ""}'
        )
    if result.missing_keys:
        warnings.warn(
            f'{checkpoint!r} has no weights for {result.missing_keys}: they keep their '
            'initialisation (an ImageNet checkpoint only has the last output norm)',
            stacklevel=2,
        )


def _backbone_cfg(config: str | Config) -> dict:
    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    backbone = cfg.get('model', {}).get('backbone')
    if not backbone or backbone.get('type') not in ('mlla_mm.MLLA', 'MLLA'):
        raise ValueError(f'the config has no mlla_mm.MLLA backbone (model.backbone = {backbone!r})')
    return backbone.to_dict() if hasattr(backbone, 'to_dict') else dict(backbone)


def build_backbone(
    arch: str | dict | None = 'tiny',
    config: str | Config | None = None,
    checkpoint: str | None = None,
    out_indices: Sequence[int] | None = None,
) -> MLLA:
    """The MLLA backbone to export, in eval mode.

    Args:
        arch: ``'tiny'|'small'|'base'`` or an arch dict; ignored when ``config`` is given.
        config: A config of this package whose ``model.backbone`` is used (its ``init_cfg`` is
            dropped: weights come from ``checkpoint``).
        checkpoint: Official or this package's checkpoint (see :func:`load_backbone_weights`);
            random initialisation without one.
        out_indices: Stages to output (default: the config's, or all four).

    Returns:
        MLLA: The backbone, eval mode, on the CPU.
    """
    kwargs = dict(arch=arch)
    if config is not None:
        kwargs = _backbone_cfg(config)
        kwargs.pop('type')
        kwargs.pop('init_cfg', None)
    kwargs.update(drop_path_rate=0.0, with_cp=False)
    if out_indices is not None:
        kwargs['out_indices'] = tuple(out_indices)
    model = MLLA(**kwargs)
    model.init_weights()
    if checkpoint is not None:
        load_backbone_weights(model, checkpoint)
    return model.eval()


class SegmentorLogits(nn.Module):
    """An mmseg ``EncoderDecoder`` as ``image -> logits`` at input resolution.

    Mirrors ``EncoderDecoder.encode_decode``: the decode head's logits, bilinearly resized to the
    input size (the test-time ``resize`` of the head). Input: normalised (B, 3, H, W) as produced
    by the segmentor's data preprocessor; output: (B, num_classes, H, W).
    """

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.segmentor.decode_head
        logits = head(self.segmentor.extract_feat(x))
        return F.interpolate(
            logits, size=x.shape[2:], mode='bilinear', align_corners=head.align_corners
        )


class ClassifierLogits(nn.Module):
    """An mmpretrain ``ImageClassifier`` as ``image -> logits`` (B, num_classes), pre-softmax."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x, mode='tensor')


class DetectorFeatures(nn.Module):
    """An mmdet detector's backbone + neck: ``image -> (FPN level 0, 1, ...)``.

    For the whole Mask R-CNN see :class:`mlla_mm.deploy.mask_rcnn_graph.MaskRCNNGraph`.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.detector.extract_feat(x))


def _detector_graph(detector: nn.Module) -> nn.Module:
    from mlla_mm.deploy.mask_rcnn_graph import MaskRCNNGraph

    return MaskRCNNGraph(detector)


_WRAPPERS = {'mmseg': SegmentorLogits, 'mmpretrain': ClassifierLogits, 'mmdet': _detector_graph}


def build_whole_model(config: str | Config, checkpoint: str | None = None) -> nn.Module:
    """A whole detector/segmentor/classifier of ``config`` as a tensor-in, tensors-out module.

    Args:
        config: A config of this package (its ``default_scope`` picks mmdet/mmseg/mmpretrain).
        checkpoint: A checkpoint of the whole model written by mmengine (``tools/train.py``, or
            an official one converted with ``tools/model_converters/mlla2mm.py``); the backbone's
            ``init_cfg`` is dropped either way.

    Returns:
        nn.Module: :class:`SegmentorLogits`, :class:`ClassifierLogits` or
        :class:`mlla_mm.deploy.mask_rcnn_graph.MaskRCNNGraph` (the whole detector; export it with
        :func:`mlla_mm.deploy.mask_rcnn_graph.export_detector_onnx`), eval mode, on the CPU.
    """
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import DefaultScope
    from mmengine.runner import load_checkpoint

    from mlla_mm.utils.config_check import setup_scope

    cfg = copy.deepcopy(config) if isinstance(config, Config) else Config.fromfile(config)
    scope = setup_scope(cfg)
    cfg.model.backbone.pop('init_cfg', None)
    cfg.model.backbone['drop_path_rate'] = 0.0
    registry = require(f'{scope}.registry')
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.MODELS.build(cfg.model)
    if checkpoint is None:
        model.init_weights()
    else:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    return _WRAPPERS[scope](revert_sync_batchnorm(model).eval()).eval()


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------
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
    model = _exportable(model.eval())
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


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------
@dataclass
class ParityResult:
    """onnxruntime against PyTorch at one input size.

    ``rel_errors[k]`` is ``max|onnx - torch| / max|torch|`` over output ``k``.
    """

    batch: int
    height: int
    width: int
    output_names: tuple
    rel_errors: tuple

    @property
    def max_rel_err(self) -> float:
        return max(self.rel_errors)

    def __str__(self) -> str:
        errs = ', '.join(f'{n} {e:.2e}' for n, e in zip(self.output_names, self.rel_errors))
        size = f'{self.batch}x3x{self.height}x{self.width}'
        return f'{size}: max rel err {self.max_rel_err:.2e} ({errs})'


def default_check_shapes(shape: Sequence[int]) -> list[tuple[int, int]]:
    """Two check sizes other than ``shape``: a non-square multiple of 32, and a non-square size
    that is not a multiple of 32 (odd in both dims)."""
    h, w = shape
    first = (h, w + 64) if h != w + 64 else (h + 64, w)
    second = (h + 37, w + 11) if h + 37 != w + 11 else (h + 37, w + 43)
    return [first, second]


def check_onnx_parity(
    model: nn.Module,
    onnx_file: str | os.PathLike,
    shapes: Sequence[Sequence[int]],
    batch: int = 3,
    seed: int = 0,
    threads: int = 0,
) -> list[ParityResult]:
    """Run the ONNX file with onnxruntime (CPU) and ``model`` on random inputs and compare.

    Args:
        model: The PyTorch model that was exported (unmodified).
        onnx_file: The ONNX file.
        shapes: (H, W) sizes to check; use sizes the graph was not traced with.
        batch: Batch of the check inputs (default 3: not the export batch).
        seed: Seed of the random normal inputs.
        threads: onnxruntime intra-op threads (0: its default).

    Returns:
        list[ParityResult]: One per size.
    """
    ort = require('onnxruntime', 'ONNX parity checks')
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_file), options, providers=['CPUExecutionProvider'])
    names = tuple(o.name for o in session.get_outputs())
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    results = []
    model = model.eval()
    for h, w in shapes:
        x = torch.randn(batch, 3, h, w, generator=generator)
        with torch.no_grad():
            expected = _as_tuple(model(x))
        got = session.run(None, {input_name: x.numpy()})
        if len(got) != len(expected):
            raise AssertionError(f'ONNX gives {len(got)} outputs, PyTorch {len(expected)}')
        errors = []
        for name, a, b in zip(names, got, expected):
            b = b.numpy()
            if a.shape != b.shape:
                raise AssertionError(
                    f'{name} at {batch}x3x{h}x{w}: ONNX shape {a.shape}, PyTorch {b.shape}'
                )
            errors.append(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
        results.append(ParityResult(batch, h, w, names, tuple(errors)))
    return results


def assert_parity(results: Sequence[ParityResult], tol: float = 1e-4) -> None:
    """Raise ``AssertionError`` if any max relative error exceeds ``tol``."""
    bad = [r for r in results if not r.max_rel_err <= tol]
    if bad:
        raise AssertionError(
            f'ONNX/PyTorch parity above {tol:g}: ' + '; '.join(str(r) for r in bad)
        )


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------
def benchmark_compile(
    model: nn.Module,
    shapes: Sequence[Sequence[int]],
    batch: int = 1,
    backend: str = 'inductor',
    dynamic: bool | None = True,
    repeats: int = 5,
) -> dict:
    """Time eager against ``torch.compile(model, backend, dynamic)`` at each size, no autograd.

    Each size runs once through the compiled model (compiling it if needed: ``compile_s``), then
    ``repeats`` rounds that time eager and compiled back to back, so that a change of machine load
    hits both; ``speedup`` is the median of the per-round ratios. Graph counts come from
    ``torch._dynamo``'s counters, reset first.

    Returns:
        dict: ``rows`` (per size: shape, compile_s, eager_ms, compiled_ms (medians), speedup,
        max_abs_diff), ``graphs`` (compiled graphs: 1 means no recompilation across sizes) and
        ``graph_breaks`` (reason -> count).
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = model.eval()
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)

    def timed(fn, x) -> float:
        start = time.perf_counter()
        fn(x)
        return time.perf_counter() - start

    rows = []
    with torch.no_grad():
        for h, w in shapes:
            x = torch.randn(batch, 3, h, w)
            start = time.perf_counter()
            got = _as_tuple(compiled(x))
            compile_s = time.perf_counter() - start
            expected = _as_tuple(model(x))
            diff = max(float((a - b).abs().max()) for a, b in zip(got, expected))
            rounds = [(timed(model, x), timed(compiled, x)) for _ in range(repeats)]
            eager, fast = (1e3 * float(np.median(t)) for t in zip(*rounds))
            rows.append(
                dict(shape=(batch, 3, h, w), compile_s=compile_s, eager_ms=eager,
                     compiled_ms=fast, speedup=float(np.median([e / c for e, c in rounds])),
                     max_abs_diff=diff)
            )  # fmt: skip
    return dict(
        rows=rows,
        graphs=int(counters['stats']['unique_graphs']),
        graph_breaks=dict(counters['graph_break']),
    )
