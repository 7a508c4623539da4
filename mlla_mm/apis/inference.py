"""Inference with any config of this package: build the model once, run it on images, draw.

:class:`MLLAInferencer` builds a detector, segmentor or classifier from a config and checkpoint
(the task comes from the config's ``default_scope``) and takes image files, folders, numpy
arrays and lists of them, in batches::

    from mlla_mm import MLLAInferencer

    inferencer = MLLAInferencer('configs/toy/mask_rcnn_mlla_t_toy.py', 'iter_250.pth')
    result = inferencer('demo.png', out_file='demo_pred.png')   # one image -> one dict
    results = inferencer('images/', batch_size=4, out_dir='vis/')  # a folder -> a list

:func:`inference_image` is the one-call form of the image demo (it builds the model each time).
"""

from __future__ import annotations

import contextlib
import os
import os.path as osp
import sys
import warnings
from typing import Any

import numpy as np
from mmengine.config import Config

from mlla_mm.apis.images import IMAGE_SUFFIXES, ImageInput, _is_batch, read_images
from mlla_mm.utils import require
from mlla_mm.utils.checkpoint_check import check_checkpoint as _check_checkpoint
from mlla_mm.utils.config_loader import load_config
from mlla_mm.utils.errors import InputError
from mlla_mm.utils.scope import setup_scope

__all__ = [
    'IMAGE_SUFFIXES',
    'TASKS',
    'InputError',
    'MLLAInferencer',
    'inference_image',
    'read_images',
    'summarise',
]

# default_scope -> task
TASKS = {'mmdet': 'detection', 'mmseg': 'segmentation', 'mmpretrain': 'classification'}
_SKIP_HINT = 'pass check_checkpoint=False (--skip-checkpoint-check) to run it anyway'
_MIN_DRAW_SIDE = 512  # detections on smaller images are drawn on an enlarged copy


# ------------------------------------------------------------------------------------------
# The inferencer
# ------------------------------------------------------------------------------------------
def _test_pipeline(cfg: Config) -> list[dict]:
    """The config's test pipeline without image loading and annotations (we pass arrays)."""
    ds = cfg.get('test_dataloader', {}).get('dataset', {})
    while isinstance(ds, dict) and 'pipeline' not in ds and isinstance(ds.get('dataset'), dict):
        ds = ds['dataset']  # dataset wrappers
    pipeline = ds.get('pipeline') if isinstance(ds, dict) else None
    pipeline = pipeline or cfg.get('test_pipeline')
    if not pipeline:
        raise InputError('the config has no test pipeline (test_dataloader.dataset.pipeline)')
    keep = []
    for t in pipeline:
        kind = str(t.get('type', ''))
        if 'LoadAnnotations' in kind or kind.split('.')[-1] in (
            'LoadImageFromFile',
            'LoadImageFromNDArray',
            'InferencerLoader',
        ):
            continue
        keep.append(dict(t))
    return keep


class MLLAInferencer:
    """Detection, segmentation or classification with a config of this package.

    The model is built and its checkpoint loaded once; every call runs the config's test
    pipeline and the model on a batch of images, and returns plain numpy results:

    * detection: ``bboxes`` (N, 4) x1y1x2y2 in image pixels, ``scores`` (N,), ``labels`` (N,),
      ``label_names``, and ``masks`` (N, H, W) bool for instance segmentation; only detections
      with a score >= ``score_thr``;
    * segmentation: ``sem_seg`` (H, W) int64 class indices at the image's size, and
      ``class_fractions`` (class name -> share of the pixels);
    * classification: ``topk_labels``, ``topk_scores`` and ``topk_names`` (best first), and
      ``scores`` (all classes).

    Every result also has ``task``, ``img_path`` (None for arrays), ``img_shape`` (H, W) and,
    when drawn, ``out_file``.

    Args:
        config: Config file, ``mlla_mm::NAME`` (a shipped config) or ``Config`` object
            (``default_scope`` mmdet, mmseg or mmpretrain).
        checkpoint: Checkpoint of ``tools/train.py`` (or converted with
            ``tools/model_converters/mlla2mm.py``); None keeps random weights (with a warning).
        device: Torch device, e.g. ``'cpu'`` or ``'cuda:0'``.
        cfg_options: Config overrides, as ``--cfg-options`` of the tools.
        check_checkpoint: Refuse a checkpoint that does not fill the model (e.g. one of
            another task: a detector's on a segmentation config) instead of running with
            random weights in the missing places.

    Raises:
        CheckpointMismatchError: The checkpoint lacks weights of the model, or their shapes
            differ (with ``check_checkpoint``).

    Example:
        >>> inferencer = MLLAInferencer('mlla_mm::upernet_mlla_t.py', 'upernet.pth')
        >>> result = inferencer(cv2.imread('street.jpg'), out_file='street_seg.png')
        >>> result['sem_seg'].shape
        (512, 683)
    """

    def __init__(
        self,
        config: str | os.PathLike | Config,
        checkpoint: str | os.PathLike | None = None,
        device: str = 'cpu',
        cfg_options: dict | None = None,
        check_checkpoint: bool = True,
    ) -> None:
        cfg = load_config(config, cfg_options)
        self.scope = setup_scope(cfg)  # imports and registers the library, and mlla_mm
        self.task = TASKS[self.scope]
        if checkpoint is not None:
            checkpoint = os.fspath(checkpoint)
            if '://' not in checkpoint and not osp.isfile(checkpoint):
                raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
        else:
            warnings.warn(
                'MLLAInferencer: no checkpoint, the model keeps its random weights', stacklevel=2
            )
        self.cfg = cfg
        self.device = device
        # The libraries print "Loads checkpoint by local backend" while loading: keep stdout for
        # the caller's own output (the image demo prints JSON there).
        with contextlib.redirect_stdout(sys.stderr):
            self.model = self._build(cfg, checkpoint, device)
            if checkpoint is not None and check_checkpoint:
                _check_checkpoint(self.model, checkpoint, skip_hint=_SKIP_HINT)
        self.model.eval()
        meta = dict(getattr(self.model, 'dataset_meta', None) or {})
        if checkpoint is None or not meta.get('classes'):
            meta.update(_config_metainfo(cfg))
        self.dataset_meta = meta
        self.classes = tuple(meta.get('classes') or ())
        from mmengine.dataset import Compose
        from mmengine.registry import DefaultScope

        with DefaultScope.overwrite_default_scope(self.scope):
            self.pipeline = Compose(_test_pipeline(cfg))
        self._visualizer = None

    def _build(self, cfg: Config, checkpoint: str | None, device: str):
        if self.scope == 'mmdet':
            model = require('mmdet.apis', 'detection').init_detector(cfg, checkpoint, device=device)
        elif self.scope == 'mmseg':
            model = require('mmseg.apis', 'segmentation').init_model(cfg, checkpoint, device=device)
        else:
            apis = require('mmpretrain.apis', 'classification')
            model = apis.get_model(cfg, pretrained=checkpoint or False, device=device)
            if getattr(model, 'dataset_meta', None) is None:
                model.dataset_meta = dict(getattr(model, '_dataset_meta', None) or {})
        return model

    # --------------------------------------------------------------------------------------
    def __call__(
        self,
        inputs: ImageInput,
        batch_size: int = 1,
        score_thr: float = 0.3,
        topk: int = 5,
        out_file: str | None = None,
        out_dir: str | None = None,
        opacity: float = 0.5,
    ) -> dict | list[dict]:
        """Run the model on ``inputs``; optionally draw the results.

        Args:
            inputs: An image file, a folder (its images, sorted by name), an HxWx3 uint8 BGR
                array, an NxHxWx3 batch, or a list of these.
            batch_size: Images per forward pass.
            score_thr: Detection: keep (and draw) detections with at least this score.
            topk: Classification: how many classes to return and draw.
            out_file: Draw the result of a single image into this file.
            out_dir: Draw every result into this folder (named after the input file, or
                ``000000.png``... for arrays).
            opacity: Segmentation: opacity of the drawn label map.

        Returns:
            One result dict for one image (a path or an HxWx3 array), else a list of them in the
            order of the inputs.

        Raises:
            InputError: An input that is not a readable image, or ``out_file`` with several
                images.
        """
        if batch_size < 1:
            raise InputError(f'batch_size={batch_size}: give at least 1')
        images = read_images(inputs)
        single = not _is_batch(inputs)
        if out_file is not None and not single:
            raise InputError(
                f'out_file={out_file!r} with {len(images)} images; use out_dir for several'
            )
        samples = []
        for start in range(0, len(images), batch_size):
            samples.extend(self._forward([img for _, img in images[start : start + batch_size]]))
        results = []
        names = _out_names([path for path, _ in images])
        for i, ((path, img), sample) in enumerate(zip(images, samples)):
            result = self._result(sample, path, img, score_thr=score_thr, topk=topk)
            target = osp.join(out_dir, names[i]) if out_dir else None
            if single and out_file is not None:
                target = out_file
            if target:
                self.draw(img, sample, target, score_thr=score_thr, topk=topk, opacity=opacity)
                result['out_file'] = target
            results.append(result)
        return results[0] if single else results

    def _forward(self, images: list[np.ndarray]) -> list:
        """Data samples of one batch (images of equal size after the pipeline share a pass)."""
        import torch
        from mmengine.dataset import pseudo_collate

        items = []
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            data = dict(img=img, img_shape=(h, w), ori_shape=(h, w), img_path='', img_id=i)
            items.append(self.pipeline(data))
        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple(item['inputs'].shape), []).append(i)
        with torch.no_grad():
            for idx in groups.values():
                samples = self.model.test_step(pseudo_collate([items[i] for i in idx]))
                for i, sample in zip(idx, samples):
                    out[i] = sample
        return out

    def _result(self, sample, path: str | None, img: np.ndarray, score_thr: float, topk: int):
        result: dict[str, Any] = dict(task=self.task, img_path=path, img_shape=img.shape[:2])
        if self.task == 'detection':
            inst = sample.pred_instances
            keep = (inst.scores >= score_thr).cpu()
            labels = inst.labels.cpu()[keep].numpy().astype(np.int64)
            result.update(
                bboxes=inst.bboxes.cpu()[keep].numpy().astype(np.float32),
                scores=inst.scores.cpu()[keep].numpy().astype(np.float32),
                labels=labels,
                label_names=[self._name(i) for i in labels],
            )
            if 'masks' in inst:
                result['masks'] = inst.masks.cpu()[keep].numpy().astype(bool)
        elif self.task == 'segmentation':
            seg = sample.pred_sem_seg.data[0].cpu().numpy().astype(np.int64)
            ids, counts = np.unique(seg, return_counts=True)
            result.update(
                sem_seg=seg,
                class_fractions={
                    self._name(i): float(c) / seg.size
                    for i, c in zip(ids, counts)
                    if i != 255  # mmseg's ignore index
                },
            )
        else:
            scores = sample.pred_score.float().cpu()
            values, labels = scores.topk(min(topk, scores.numel()))
            labels = labels.numpy().astype(np.int64)
            result.update(
                topk_labels=labels,
                topk_scores=values.numpy().astype(np.float32),
                topk_names=[self._name(i) for i in labels],
                scores=scores.numpy().astype(np.float32),
            )
        return result

    def _name(self, index) -> str:
        i = int(index)
        return self.classes[i] if 0 <= i < len(self.classes) else str(i)

    # --------------------------------------------------------------------------------------
    def draw(
        self,
        img: np.ndarray,
        sample,
        out_file: str,
        score_thr: float = 0.3,
        topk: int = 5,
        opacity: float = 0.5,
    ) -> None:
        """Draw a data sample of this model over ``img`` (HxWx3 BGR) into ``out_file``."""
        os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
        rgb = np.ascontiguousarray(img[:, :, ::-1])
        if self.task == 'detection':
            self._draw_det(rgb, sample, out_file, score_thr)
        elif self.task == 'segmentation':
            apis = require('mmseg.apis', 'segmentation')
            self.model.dataset_meta = self.dataset_meta  # show_result_pyplot reads it there
            apis.show_result_pyplot(
                self.model, rgb, sample, opacity=opacity, show=False, out_file=out_file
            )
        else:
            from mmpretrain.visualization import UniversalVisualizer

            scores = sample.pred_score
            drawn = sample.clone()
            drawn.set_pred_label(scores.topk(min(topk, scores.numel())).indices)
            classes = self.classes or [str(i) for i in range(scores.numel())]
            UniversalVisualizer().visualize_cls(
                rgb, drawn, classes=classes, draw_gt=False, out_file=out_file
            )

    def _draw_det(self, rgb: np.ndarray, sample, out_file: str, score_thr: float) -> None:
        if self._visualizer is None:
            from mmdet.registry import VISUALIZERS

            self._visualizer = VISUALIZERS.build(self.model.cfg.visualizer)
            self._visualizer.dataset_meta = self.dataset_meta
        inst, drawn = sample.pred_instances, sample
        # Small images are drawn enlarged (whole pixels), so that labels and scores stay legible.
        scale = -(-_MIN_DRAW_SIDE // max(rgb.shape[:2]))
        if scale > 1:
            rgb = rgb.repeat(scale, 0).repeat(scale, 1)
            big = inst.clone()
            big.bboxes = inst.bboxes * scale
            if 'masks' in inst:
                big.masks = inst.masks.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            drawn = sample.clone()
            drawn.pred_instances = big
        self._visualizer.add_datasample(
            'result',
            rgb,
            data_sample=drawn,
            draw_gt=False,
            show=False,
            out_file=out_file,
            pred_score_thr=score_thr,
        )


def _config_metainfo(cfg: Config) -> dict:
    """``metainfo`` (classes, palette) of the config's test dataset, if it names them."""
    ds = cfg.get('test_dataloader', {}).get('dataset', {})
    while isinstance(ds, dict) and 'metainfo' not in ds and isinstance(ds.get('dataset'), dict):
        ds = ds['dataset']
    meta = ds.get('metainfo') if isinstance(ds, dict) else None
    return dict(meta) if meta else {}


def _out_names(paths: list[str | None]) -> list[str]:
    """Drawing file names: the input's name as PNG, ``{index:06d}.png`` for arrays, unique."""
    names, seen = [], set()
    for i, path in enumerate(paths):
        name = f'{osp.splitext(osp.basename(path))[0]}.png' if path else f'{i:06d}.png'
        if name in seen:
            name = f'{osp.splitext(name)[0]}_{i}.png'
        seen.add(name)
        names.append(name)
    return names


def summarise(result: dict) -> dict:
    """A JSON-ready summary of one result (what ``tools/image_demo.py`` prints): scores rounded
    to 4 decimals, box coordinates to 2."""
    out: dict[str, Any] = dict(task=result['task'], img_path=result['img_path'])
    if 'out_file' in result:
        out['out_file'] = result['out_file']
    if result['task'] == 'detection':
        out['detections'] = [
            dict(label=name, score=round(float(s), 4), bbox=[round(float(v), 2) for v in box])
            for name, s, box in zip(result['label_names'], result['scores'], result['bboxes'])
        ]
    elif result['task'] == 'segmentation':
        out['class_fractions'] = {k: round(v, 4) for k, v in result['class_fractions'].items()}
    else:
        out['topk'] = [
            dict(label=name, score=round(float(s), 4))
            for name, s in zip(result['topk_names'], result['topk_scores'])
        ]
    return out


def inference_image(
    config: str | Config,
    checkpoint: str,
    img: str,
    out_file: str,
    device: str = 'cpu',
    **kwargs,
) -> dict:
    """Run a model on one image and draw the result into ``out_file`` (builds the model each
    call; for more than one image use :class:`MLLAInferencer`).

    Args:
        config: Config file or object; its ``default_scope`` picks the task.
        checkpoint: Checkpoint written by ``tools/train.py`` (loaded with ``weights_only``).
        img: Image file.
        out_file: Where to write the drawing (PNG/JPEG).
        device: Torch device.
        **kwargs: Task options (``score_thr`` for detection, ``opacity`` for segmentation,
            ``topk`` for classification).

    Returns:
        dict: :func:`summarise` of the result: ``task``, ``img_path``, ``out_file`` and
        ``detections`` / ``class_fractions`` / ``topk``.
    """
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
    read_images(img)  # fail early on a missing / unreadable image, before building the model
    inferencer = MLLAInferencer(config, checkpoint, device=device)
    return summarise(inferencer(img, out_file=out_file, **kwargs))
