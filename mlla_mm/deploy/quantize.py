"""Static int8 post-training quantisation of the exported backbone, and its accuracy in the
detector.

Method: NNCF's post-training quantisation of the ONNX graph (``nncf.quantize``, transformer model
type, symmetric activations (:data:`PRESETS`), calibrated on images of the training set as the
detector's data preprocessor hands them to the backbone). It writes a QDQ ONNX file (standard
``QuantizeLinear``/``DequantizeLinear``), so the same file runs in OpenVINO (int8 kernels:
VNNI/AMX) and onnxruntime (QDQ fused into its int8 operators). NNCF rather than onnxruntime's
``quantize_static``: it places the quantisers where OpenVINO's int8 kernels fuse them and keeps
LayerNorm, the ELU and the attention's normaliser in float (its transformer model type), which
``quantize_static`` would quantise node by node.

Accuracy: :class:`OnnxBackbone` puts an ONNX backbone (float or int8, either runtime) into the
PyTorch detector in place of its MLLA, and :func:`evaluate_detector` runs mmdet's test loop and
evaluator on the config's validation set, so float and int8 are compared on the same metric.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from mmengine.config import Config

from mlla_mm.utils import require

__all__ = [
    'FLOAT_NODES',
    'PRESETS',
    'OnnxBackbone',
    'backbone_inputs',
    'evaluate_detector',
    'quantize_detector_backbone',
    'quantize_onnx',
]


#: Nodes of the rewritten backbone export kept in float by default (regular expressions over ONNX
#: node names): the attention products (``k^T v`` sums over every token, and quantising both of
#: its activations cost most of the accuracy), the stem's first convolution (the image) and the
#: output norms (:class:`~.export_friendly.OutputNorm`: a quantiser on its depthwise 1x1
#: convolution's input is rejected by OpenVINO's ONNX reader at dynamic sizes).
#: On the toy detector: everything int8, bbox mAP_50 -0.009 (onnxruntime) / -0.010 (OpenVINO);
#: with these in float -0.003 / -0.004 (docs/deployment.md).
FLOAT_NODES = (r'.*/blocks\.[0-9]+/MatMul.*', r'/patch_embed/conv1/.*', r'/norm[0-9]+/.*')

#: NNCF quantisation presets (``preset=`` of :func:`quantize_onnx`), the default first.
#: ``'performance'``: symmetric int8 activations, which OpenVINO's int8 convolutions take as they
#: are. ``'mixed'`` (NNCF's default for transformers): asymmetric activations, whose zero points
#: OpenVINO's CPU plugin leaves as separate ``Subtract`` nodes before 1x1 convolutions it then
#: runs in float32 (MLLA-T, 1280x800, 2 threads: no faster than the float32 graph).
PRESETS = ('performance', 'mixed')


def backbone_inputs(cfg: Config, detector: nn.Module, split: str = 'train', num: int = 32):
    """The first ``num`` images of ``split`` (``'train'`` or ``'val'``) of the config's dataset,
    loaded with the *test* pipeline and normalised by ``detector.data_preprocessor``: what the
    backbone sees at test time.

    Returns:
        list[np.ndarray]: ``(1, 3, H, W)`` float32 arrays.
    """
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DefaultScope

    from mlla_mm.utils.scope import setup_scope

    scope = setup_scope(cfg)
    datasets = require(f'{scope}.registry', 'the calibration images').DATASETS
    dataset_cfg = cfg[f'{split}_dataloader'].dataset.copy()
    dataset_cfg.pipeline = cfg.test_dataloader.dataset.pipeline
    with DefaultScope.overwrite_default_scope(scope):
        dataset = datasets.build(dataset_cfg)
    out = []
    with torch.no_grad():
        for i in range(min(num, len(dataset))):
            data = detector.data_preprocessor(pseudo_collate([dataset[i]]), False)
            out.append(data['inputs'].float().numpy())
    return out


def quantize_onnx(
    onnx_file: str | os.PathLike,
    out_file: str | os.PathLike,
    calibration: Sequence[np.ndarray],
    ignored_names: Sequence[str] = FLOAT_NODES,
    fast_bias_correction: bool = True,
    preset: str = PRESETS[0],
) -> str:
    """Static int8 PTQ of an ONNX file with NNCF (transformer model type), QDQ ONNX out.

    Args:
        onnx_file: The float32 graph (one input).
        out_file: Where to write the int8 graph.
        calibration: Input arrays (e.g. :func:`backbone_inputs`), all used.
        ignored_names: Node names (regular expressions) to keep in float (default
            :data:`FLOAT_NODES`; patterns that match nothing are ignored).
        fast_bias_correction: NNCF's bias correction variant.
        preset: One of :data:`PRESETS` (symmetric or asymmetric int8 activations).

    Returns:
        str: ``out_file``.
    """
    if preset not in PRESETS:
        raise ValueError(f'preset must be one of {PRESETS}, got {preset!r}')
    onnx = require('onnx', 'int8 quantisation')
    nncf = require('nncf', 'int8 quantisation')
    model = onnx.load(str(onnx_file))
    name = model.graph.input[0].name
    dataset = nncf.Dataset(list(calibration), lambda x: {name: x})
    ignored = None
    if ignored_names:
        ignored = nncf.IgnoredScope(patterns=list(ignored_names), validate=False)
    kwargs = dict(ignored_scope=ignored) if ignored else {}
    quantized = nncf.quantize(
        model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
        fast_bias_correction=fast_bias_correction, preset=nncf.QuantizationPreset(preset),
        **kwargs,
    )  # fmt: skip
    onnx.save(quantized, str(out_file))
    return str(out_file)


class OnnxBackbone(nn.Module):
    """An ONNX backbone (image -> feature maps) called from PyTorch: a drop-in for the detector's
    backbone in evaluation. ``runtime``: an entry of :data:`mlla_mm.deploy.runtimes.RUNTIMES`
    other than the eager ones."""

    def __init__(self, onnx_file: str | os.PathLike, runtime: str = 'onnxruntime', threads=0):
        super().__init__()
        from mlla_mm.deploy.runtimes import make_runner

        self.onnx_file, self.runtime = str(onnx_file), runtime
        self._run = make_runner(runtime, onnx_file=onnx_file, threads=threads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self._run(x.detach().float().cpu().numpy().astype(np.float32))
        if isinstance(outputs, dict) or not isinstance(outputs, (list, tuple)):
            outputs = list(outputs.values()) if hasattr(outputs, 'values') else [outputs]
        return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)

    def extra_repr(self) -> str:
        return f'{self.onnx_file}, runtime={self.runtime}'


def evaluate_detector(
    cfg: Config, detector: nn.Module, work_dir: str | os.PathLike, backbone: nn.Module | None = None
) -> dict:
    """mmdet's test loop and evaluator of ``cfg`` on ``detector``, with ``backbone`` in place of
    its own (then restored).

    Returns:
        dict: The evaluator's metrics (e.g. ``'coco/bbox_mAP_50'``).
    """
    from mmengine.runner import Runner

    own = detector.backbone
    if backbone is not None:
        detector.backbone = backbone
    try:
        runner = Runner(
            model=detector,
            work_dir=str(work_dir),
            test_dataloader=cfg.test_dataloader,
            test_evaluator=cfg.test_evaluator,
            test_cfg=dict(type='TestLoop'),
            default_scope=cfg.get('default_scope', 'mmdet'),
            env_cfg=dict(dist_cfg=dict(backend='gloo')),
            log_level='WARNING',
        )
        return runner.test()
    finally:
        detector.backbone = own


def quantize_detector_backbone(
    config: str | Config,
    checkpoint: str,
    work_dir: str | os.PathLike,
    num_calibration: int = 64,
    runtimes: Sequence[str] = ('onnxruntime', 'openvino'),
    export_shape: Sequence[int] = (224, 224),
    ignored_names: Sequence[str] = FLOAT_NODES,
    preset: str = PRESETS[0],
    log=print,
) -> dict:
    """Export a detector's MLLA backbone (:func:`~.export_friendly.export_friendly`), quantise
    it to int8 (:func:`quantize_onnx` with ``preset``, calibrated on ``num_calibration`` training
    images) and
    evaluate the detector on the config's validation set with the PyTorch backbone, the float
    ONNX backbone and the int8 one in each of ``runtimes``.

    Returns:
        dict: ``{'files': {...}, 'metrics': {'eager': {...}, 'onnxruntime fp32': {...},
        'onnxruntime int8': {...}, ...}}``.
    """
    from mlla_mm.deploy.export_friendly import export_friendly
    from mlla_mm.deploy.onnx_export import export_onnx
    from mlla_mm.deploy.wrappers import build_whole_model
    from mlla_mm.utils.config_loader import load_config

    cfg = config if isinstance(config, Config) else load_config(config)
    detector = build_whole_model(cfg, checkpoint).detector
    os.makedirs(work_dir, exist_ok=True)
    fp32 = os.path.join(work_dir, 'backbone_fp32.onnx')
    int8 = os.path.join(work_dir, 'backbone_int8.onnx')
    export_onnx(export_friendly(detector.backbone), fp32, export_shape)
    log(f'exported {fp32}; calibrating on {num_calibration} training images')
    calibration = backbone_inputs(cfg, detector, 'train', num_calibration)
    quantize_onnx(fp32, int8, calibration, ignored_names, preset=preset)
    log(f'wrote {int8}')
    metrics = {'eager': evaluate_detector(cfg, detector, os.path.join(work_dir, 'eval'))}
    for runtime in runtimes:
        for precision, path in (('fp32', fp32), ('int8', int8)):
            backbone = OnnxBackbone(path, runtime)
            metrics[f'{runtime} {precision}'] = evaluate_detector(
                cfg, detector, os.path.join(work_dir, 'eval'), backbone
            )
            log(f'{runtime} {precision}: {_map50(metrics[f"{runtime} {precision}"])}')
    return dict(files=dict(fp32=fp32, int8=int8), metrics=metrics)


def _map50(metrics: dict):
    return next((v for k, v in metrics.items() if k.endswith('bbox_mAP_50')), None)
