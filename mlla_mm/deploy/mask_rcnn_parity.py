"""The exported Mask R-CNN against mmdet: the same images through onnxruntime and
``model.predict``, detections matched.

:func:`check_detector_parity` runs both and matches the detections (:class:`DetParity`);
:func:`detection_check_images` gives real photographs (``skimage.data``) and toy-set images
resized as the config's test pipeline does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from mlla_mm.deploy.mask_rcnn_export import onnx_session
from mlla_mm.utils import require

__all__ = [
    'DetParity',
    'assert_det_parity',
    'benchmark_detector',
    'check_detector_parity',
    'compare_detections',
    'detection_check_images',
    'mmdet_predict',
    'resize_for_test',
]


def mmdet_predict(
    detector: nn.Module, image: np.ndarray, ori_shape: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
    """mmdet's own inference (``data_preprocessor`` then ``predict``) on one image.

    Args:
        detector: The mmdet detector, eval mode.
        image: (H, W, 3) uint8, as the test pipeline gives it after ``Resize`` (BGR for mmcv).
        ori_shape: (H, W) before ``Resize``: results at that size (``predict(rescale=True)``,
            with ``Resize``'s scale factor); without it, at the input size (``rescale=False``).

    Returns:
        dict: ``boxes`` (N, 4), ``scores`` (N,), ``labels`` (N,), ``masks`` (N, H, W) bool.
    """
    from mmdet.structures import DetDataSample

    h, w = image.shape[:2]
    ori_h, ori_w = (h, w) if ori_shape is None else ori_shape
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(h, w), ori_shape=(ori_h, ori_w), scale_factor=(w / ori_w, h / ori_h)
        )
    )
    inputs = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    with torch.no_grad():
        data = detector.data_preprocessor({'inputs': [inputs], 'data_samples': [sample]}, False)
        rescale = ori_shape is not None
        result = detector.predict(data['inputs'], data['data_samples'], rescale=rescale)[0]
    inst = result.pred_instances
    return dict(
        boxes=inst.bboxes.numpy(), scores=inst.scores.numpy(), labels=inst.labels.numpy(),
        masks=inst.masks.numpy().astype(bool).reshape(-1, ori_h, ori_w),
    )  # fmt: skip


def _onnx_predict(session, image: np.ndarray) -> dict[str, np.ndarray]:
    x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
    out = session.run(None, {session.get_inputs()[0].name: x})
    return dict(zip([o.name for o in session.get_outputs()], out))


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of x1 y1 x2 y2 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-12)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@dataclass
class DetParity:
    """onnxruntime against mmdet's ``predict`` on one image.

    Detections of either side scoring above ``score_thr`` are matched one to one (highest score
    first) to a detection of the other side with the same label and the highest box IoU (any
    score: a detection at 0.301 on one side and 0.299 on the other is a match, not a miss).
    """

    name: str
    height: int
    width: int
    score_thr: float
    reference: int  # mmdet detections above score_thr
    matched: int
    missing: int  # mmdet's above the threshold, without an ONNX match
    extra: int  # ONNX's above the threshold, without an mmdet match
    min_box_iou: float = 1.0
    max_score_diff: float = 0.0
    min_mask_iou: float = 1.0
    total: tuple = (0, 0)  # all detections (mmdet, ONNX)
    onnx_ms: float = 0.0
    torch_ms: float = 0.0
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        s = (
            f'{self.name} {self.height}x{self.width}: {self.matched}/{self.reference} matched '
            f'above {self.score_thr:g}, {self.missing} missing, {self.extra} extra'
        )
        if self.matched:
            s += (
                f'; min box IoU {self.min_box_iou:.4f}, max |score diff| '
                f'{self.max_score_diff:.1e}, min mask IoU {self.min_mask_iou:.4f}'
            )
        s += f' ({self.total[0]}/{self.total[1]} detections in all)'
        return s + (f'; FAILED: {"; ".join(self.failures)}' if self.failures else '')


def compare_detections(
    ref: dict, got: dict, name: str = 'image', score_thr: float = 0.3, box_iou: float = 0.99,
    score_tol: float = 1e-3, mask_iou: float = 0.98,
) -> DetParity:  # fmt: skip
    """Match two detection sets (dicts of ``boxes``, ``scores``, ``labels``, ``masks``).

    Returns:
        DetParity: Counts, the worst matched values and the failures against the tolerances.
    """
    h, w = ref['masks'].shape[1:] if len(ref['masks']) else got['masks'].shape[1:]
    ious = _box_iou(ref['boxes'], got['boxes'])
    ious[ref['labels'][:, None] != got['labels'][None]] = -1.0
    pairs, used_ref, used_got = [], set(), set()
    # greedy one-to-one matching of the detections above the threshold, highest score first
    order = [('r', i, s) for i, s in enumerate(ref['scores']) if s > score_thr]
    order += [('g', j, s) for j, s in enumerate(got['scores']) if s > score_thr]
    for side, i, _ in sorted(order, key=lambda t: -t[2]):
        if (side == 'r' and i in used_ref) or (side == 'g' and i in used_got):
            continue
        row = ious[i] if side == 'r' else ious[:, i]
        taken = used_got if side == 'r' else used_ref
        candidates = [(v, j) for j, v in enumerate(row) if j not in taken and v >= 0]
        if not candidates or max(candidates)[0] < 0.5:
            continue
        j = max(candidates)[1]
        r, g = (i, j) if side == 'r' else (j, i)
        pairs.append((r, g))
        used_ref.add(r)
        used_got.add(g)
    missing = sum(1 for i, s in enumerate(ref['scores']) if s > score_thr and i not in used_ref)
    extra = sum(1 for j, s in enumerate(got['scores']) if s > score_thr and j not in used_got)
    result = DetParity(
        name, int(h), int(w), score_thr, int((ref['scores'] > score_thr).sum()), len(pairs),
        missing, extra, total=(len(ref['scores']), len(got['scores'])),
    )  # fmt: skip
    if pairs:
        result.min_box_iou = float(min(ious[r, g] for r, g in pairs))
        result.max_score_diff = float(
            max(abs(ref['scores'][r] - got['scores'][g]) for r, g in pairs)
        )
        result.min_mask_iou = min(_mask_iou(ref['masks'][r], got['masks'][g]) for r, g in pairs)
    if missing or extra:
        result.failures.append(f'{missing} missing / {extra} extra detections')
    if result.min_box_iou < box_iou:
        result.failures.append(f'box IoU {result.min_box_iou:.4f} < {box_iou}')
    if result.max_score_diff > score_tol:
        result.failures.append(f'score diff {result.max_score_diff:.1e} > {score_tol:g}')
    if result.min_mask_iou < mask_iou:
        result.failures.append(f'mask IoU {result.min_mask_iou:.4f} < {mask_iou}')
    return result


def check_detector_parity(
    detector: nn.Module,
    onnx_file: str | os.PathLike,
    images: Sequence[tuple[str, np.ndarray]],
    score_thr: float = 0.3,
    threads: int = 0,
    **tolerances,
) -> list[DetParity]:
    """Run onnxruntime and mmdet's ``predict`` (:func:`mmdet_predict`) on each image; compare.

    Args:
        detector: The mmdet detector that was exported (eval mode).
        onnx_file: The file written by :func:`export_detector_onnx` (with ``masks``).
        images: ``(name, (H, W, 3) uint8 image)`` pairs, as after the test pipeline's ``Resize``
            (see :func:`detection_check_images`).
        score_thr: Detections above it must match (see :class:`DetParity`).
        threads: onnxruntime intra-op threads (0: its default).
        **tolerances: ``box_iou``, ``score_tol``, ``mask_iou`` of :func:`compare_detections`.

    Returns:
        list[DetParity]: One per image, with the run times of each side.
    """
    session = onnx_session(onnx_file, threads)
    if 'masks' not in [o.name for o in session.get_outputs()]:
        raise ValueError(f'{onnx_file} has no masks output: export it with paste_masks=True')
    results = []
    for name, image in images:
        start = time.perf_counter()
        ref = mmdet_predict(detector, image)
        torch_ms = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        got = _onnx_predict(session, image)
        onnx_ms = 1e3 * (time.perf_counter() - start)
        result = compare_detections(ref, got, name, score_thr, **tolerances)
        result.torch_ms, result.onnx_ms = torch_ms, onnx_ms
        results.append(result)
    return results


def assert_det_parity(results: Sequence[DetParity]) -> None:
    """Raise ``AssertionError`` naming the images whose detections do not match."""
    bad = [r for r in results if not r.ok]
    if bad:
        raise AssertionError('ONNX/mmdet detections differ: ' + '; '.join(map(str, bad)))


def benchmark_detector(
    detector: nn.Module, onnx_file: str | os.PathLike, image: np.ndarray, repeats: int = 3,
    threads: int = 0,
) -> dict[str, float]:  # fmt: skip
    """Median latency (ms) of mmdet's eager ``predict`` and of onnxruntime on one image, after
    one warm-up run of each; the two alternate, so a change of machine load hits both."""
    session = onnx_session(onnx_file, threads)
    mmdet_predict(detector, image)
    _onnx_predict(session, image)
    eager, onnx = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        mmdet_predict(detector, image)
        eager.append(time.perf_counter() - start)
        start = time.perf_counter()
        _onnx_predict(session, image)
        onnx.append(time.perf_counter() - start)
    return dict(eager_ms=1e3 * float(np.median(eager)), onnx_ms=1e3 * float(np.median(onnx)))


def _test_resize_scale(cfg) -> tuple | None:
    pipeline = cfg.get('test_pipeline') or cfg.test_dataloader.dataset.pipeline
    for step in pipeline:
        if step.get('type') == 'Resize':
            if not step.get('keep_ratio', False):
                raise ValueError('the test Resize must keep the aspect ratio (keep_ratio=True)')
            return tuple(step['scale'])
    return None


def resize_for_test(image: np.ndarray, cfg) -> np.ndarray:
    """The test pipeline's ``Resize`` (``keep_ratio=True``: mmcv's ``imrescale``, bilinear)."""
    import mmcv

    scale = _test_resize_scale(cfg)
    return image if scale is None else mmcv.imrescale(image, scale, interpolation='bilinear')


def detection_check_images(cfg, photos: bool = True, toy: int = 2, seed: int = 0) -> list:
    """Images to compare on, resized by the config's test pipeline: ``skimage.data`` photographs
    (astronaut, coffee, chelsea; BGR) and ``toy`` toy-set images
    (:mod:`mlla_mm.datasets.toy_coco`), drawn at 128 px and cropped to non-square sizes that are
    not multiples of 32.

    Returns:
        list[tuple[str, np.ndarray]]: ``(name, (H, W, 3) uint8 BGR)`` pairs.
    """
    from mlla_mm.datasets.toy_coco import draw_toy_image

    images = []
    if photos:
        data = require('skimage.data', 'the photographs of the detection check')
        for name in ('astronaut', 'coffee', 'chelsea'):
            images.append((name, getattr(data, name)()[..., ::-1]))
    rng = np.random.default_rng(seed)
    crops = [(128, 100), (112, 128), (128, 128), (100, 120)]
    for i in range(toy):
        img, _ = draw_toy_image(rng, 128)
        h, w = crops[i % len(crops)]
        images.append((f'toy{i}', img[:h, :w, ::-1]))
    return [(n, np.ascontiguousarray(resize_for_test(im, cfg))) for n, im in images]
