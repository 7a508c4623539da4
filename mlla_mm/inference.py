"""Inference on one image with any config of this package, drawn by the library's visualizer.

:func:`inference_image` dispatches on the config's ``default_scope`` through :data:`INFERENCERS`
(``scope -> function``); a new task adds one function and one entry.
"""

from __future__ import annotations

import os.path as osp
from typing import Callable

import numpy as np
from mmengine.config import Config

from mlla_mm.utils import require

__all__ = ['INFERENCERS', 'inference_image']

_MIN_DRAW_SIDE = 512  # detections on smaller images are drawn on an enlarged copy


def _load_rgb(img: str) -> np.ndarray:
    mmcv = require('mmcv', 'image demos')
    if not osp.isfile(img):
        raise FileNotFoundError(f'image {img!r} does not exist')
    return mmcv.imconvert(mmcv.imread(img), 'bgr', 'rgb')


def _infer_det(cfg: Config, checkpoint: str, img: str, out_file: str, device: str, **kw) -> dict:
    """Detection / instance segmentation with mmdet; draws boxes and masks above ``score_thr``."""
    apis = require('mmdet.apis', 'detection demos')
    from mmdet.registry import VISUALIZERS

    score_thr = kw.get('score_thr', 0.3)
    model = apis.init_detector(cfg, checkpoint, device=device)
    result = apis.inference_detector(model, img)
    inst = result.pred_instances
    visualizer = VISUALIZERS.build(model.cfg.visualizer)
    visualizer.dataset_meta = model.dataset_meta
    image, drawn = _load_rgb(img), result
    # Small images are drawn enlarged (whole pixels), so that labels and scores stay legible.
    scale = -(-_MIN_DRAW_SIDE // max(image.shape[:2]))
    if scale > 1:
        image = image.repeat(scale, 0).repeat(scale, 1)
        big = inst.clone()
        big.bboxes = inst.bboxes * scale
        if 'masks' in inst:
            big.masks = inst.masks.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        drawn = result.clone()
        drawn.pred_instances = big
    visualizer.add_datasample(
        'result',
        image,
        data_sample=drawn,
        draw_gt=False,
        show=False,
        out_file=out_file,
        pred_score_thr=score_thr,
    )
    keep = inst.scores >= score_thr
    classes = model.dataset_meta['classes']
    return dict(
        task='detection',
        out_file=out_file,
        detections=[
            dict(label=classes[int(label)], score=float(score), bbox=[float(v) for v in box])
            for label, score, box in zip(inst.labels[keep], inst.scores[keep], inst.bboxes[keep])
        ],
    )


def _infer_seg(cfg: Config, checkpoint: str, img: str, out_file: str, device: str, **kw) -> dict:
    """Semantic segmentation with mmseg; draws the label map over the image."""
    apis = require('mmseg.apis', 'segmentation demos')

    model = apis.init_model(cfg, checkpoint, device=device)
    result = apis.inference_model(model, img)
    apis.show_result_pyplot(
        model, img, result, show=False, out_file=out_file, opacity=kw.get('opacity', 0.5)
    )
    labels = result.pred_sem_seg.data.cpu().numpy().ravel()
    classes = model.dataset_meta['classes']
    ids, counts = np.unique(labels, return_counts=True)
    return dict(
        task='segmentation',
        out_file=out_file,
        class_fractions={
            classes[int(i)]: float(c) / labels.size for i, c in zip(ids, counts) if i < len(classes)
        },
    )


def _infer_cls(cfg: Config, checkpoint: str, img: str, out_file: str, device: str, **kw) -> dict:
    """Image classification with mmpretrain; draws and returns the ``topk`` (default 5) classes."""
    apis = require('mmpretrain.apis', 'classification demos')
    from mmpretrain.visualization import UniversalVisualizer

    model = apis.get_model(cfg, checkpoint, device=device)
    sample = apis.ImageClassificationInferencer(model)(img, return_datasamples=True)[0]
    scores, labels = sample.pred_score.topk(min(kw.get('topk', 5), sample.pred_score.numel()))
    classes = model._dataset_meta.get('classes') or [str(i) for i in range(len(sample.pred_score))]
    sample.set_pred_label(labels)  # draw all top-k, not only the best
    UniversalVisualizer().visualize_cls(
        _load_rgb(img), sample, classes=classes, draw_gt=False, out_file=out_file
    )
    return dict(
        task='classification',
        out_file=out_file,
        topk=[dict(label=classes[int(i)], score=float(s)) for s, i in zip(scores, labels)],
    )


INFERENCERS: dict[str, Callable[..., dict]] = {
    'mmdet': _infer_det,
    'mmseg': _infer_seg,
    'mmpretrain': _infer_cls,
}


def inference_image(
    config: str | Config,
    checkpoint: str,
    img: str,
    out_file: str,
    device: str = 'cpu',
    **kwargs,
) -> dict:
    """Run a model on one image and draw the result into ``out_file``.

    Args:
        config: Config file or object; its ``default_scope`` picks the task.
        checkpoint: Checkpoint written by ``tools/train.py`` (loaded with ``weights_only``).
        img: Image file.
        out_file: Where to write the drawing (PNG/JPEG).
        device: Torch device.
        **kwargs: Task options (``score_thr`` for detection, ``opacity`` for segmentation,
            ``topk`` for classification).

    Returns:
        dict: What was found (task-specific), plus ``task`` and ``out_file``.
    """
    import mlla_mm  # noqa: F401  (checkpoint allow-list, registry)

    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    scope = cfg.get('default_scope')
    if scope not in INFERENCERS:
        raise ValueError(
            f'default_scope={scope!r}: image demos support configs of {sorted(INFERENCERS)}'
        )
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
    _load_rgb(img)  # fail early on a missing / unreadable image
    return INFERENCERS[scope](cfg, checkpoint, img, out_file, device, **kwargs)
