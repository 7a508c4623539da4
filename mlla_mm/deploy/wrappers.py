"""What is exported: the backbone, or a whole segmentor, classifier or detector as a module that
maps an NCHW image batch to tensors.

:func:`build_backbone` / :func:`build_whole_model` build it from an arch name or a config, with
this package's or the official checkpoints. A segmentor exports to its logits at input
resolution, a classifier to its logits, Mask R-CNN whole (:class:`MaskRCNNGraph` of
:mod:`mlla_mm.deploy.mask_rcnn_graph`); :class:`DetectorFeatures` is the backbone + neck only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config

from mlla_mm.models.backbones.mlla import MLLA
from mlla_mm.utils import require
from mlla_mm.utils.config_loader import load_config

__all__ = [
    'ClassifierLogits',
    'DetectorFeatures',
    'SegmentorLogits',
    'build_backbone',
    'build_whole_model',
    'load_backbone_weights',
]


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
    cfg = config if isinstance(config, Config) else load_config(config)
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

    from mlla_mm.utils.scope import setup_scope

    cfg = load_config(config)
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
