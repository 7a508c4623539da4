"""The whole Mask R-CNN as one ONNX graph of standard operators, verified against mmdet.

``image -> boxes, scores, labels, mask probabilities, masks``, with dynamic height and width, made
of standard ONNX operators only (``NonMaxSuppression``, ``RoiAlign`` of opset 16, ``TopK``,
``NonZero``, ``ScatterND``, ...): no custom operator library, no mmdeploy.

:class:`MaskRCNNGraph` is a plain ``nn.Module`` that reuses the detector's own submodules
(backbone, neck, RPN head, box and mask heads, the RoI extractors' settings) and replaces, for
export, the parts of mmdet 3.3's inference that do not trace to ONNX: the data preprocessor
(normalisation and padding), ``RPNHead.predict_by_feat`` (per-level top-k, box decoding, size
filter, per-level NMS), ``SingleRoIExtractor`` (level mapping and RoIAlign),
``BBoxHead.predict_by_feat`` (softmax, per-class box decoding, ``multiclass_nms``) and
``FCNMaskHead.predict_by_feat`` (the mask paste). Each replacement runs the same arithmetic as
mmdet's code, in the same order, and calls mmcv's NMS and RoIAlign kernels in eager mode
(:class:`NMSOp`, :class:`RoIAlignOp`), which export as ONNX ``NonMaxSuppression`` and
``RoiAlign``. In eager mode the module gives mmdet's boxes, scores and labels bit for bit; where
the exported graph is not bit-exact, :data:`DIFFERENCES` says how and why (the tool prints it).

The export is in :mod:`mlla_mm.deploy.mask_rcnn_export`, the checks against mmdet in
:mod:`mlla_mm.deploy.mask_rcnn_parity`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'DIFFERENCES',
    'OUTPUT_NAMES',
    'MaskRCNNGraph',
    'NMSOp',
    'RoIAlignOp',
    'paste_masks',
    'to_original_size',
]


OUTPUT_NAMES = ('boxes', 'scores', 'labels', 'mask_probs', 'masks')

#: Where the exported graph is not bit-exact with mmdet 3.3's inference (printed by the tool).
DIFFERENCES = (
    'batch of 1 image per run (mmdet batches images; the graph runs one at a time)',
    'the masks output is pasted at the network input size (mmdet predict(rescale=False)); '
    'to_original_size() gives boxes and masks at the original size as predict(rescale=True)',
    'mask paste: grid_sample bilinear (align_corners=False) computed as two small matrix '
    "products with the same weights (float rounding only; mmdet's CPU crop to the box +-1 px "
    'is applied too)',
    'RPN top-k per level: ONNX TopK over all anchors then the first nms_pre (mmdet: sort then '
    'the first nms_pre); equal scores may come out in another order',
    'RoI level mapping: log2 exports as log(x) / log(2) (float rounding at level boundaries)',
    'multiclass NMS: mmdet switches to one NMS per class (no coordinate offsets) from 10000 '
    'candidate boxes (split_thr); the graph always uses the class offsets of the smaller case',
    'NMS, RoIAlign (aligned=True -> half_pixel, sampling_ratio 0 = adaptive, avg) and the '
    'convolutions are onnxruntime kernels: float rounding differs from PyTorch/mmcv',
)


def _const(g, value, dtype):
    return g.op('Constant', value_t=torch.tensor(value, dtype=dtype))


class NMSOp(torch.autograd.Function):
    """Greedy NMS: indices of the kept boxes, highest score first, at most ``max_num``.

    Eager: mmcv's ``nms`` (the kernel mmdet's ``batched_nms`` calls). Export: ONNX
    ``NonMaxSuppression`` (one batch, one class; suppression when IoU > ``iou_threshold``, as
    mmcv), whose selected indices come out in the same greedy order.
    """

    @staticmethod
    def forward(ctx, boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                max_num: int) -> torch.Tensor:  # fmt: skip
        from mmcv.ops import nms

        keep = nms(boxes, scores, iou_threshold)[1]
        return keep[:max_num] if max_num > 0 else keep

    @staticmethod
    def symbolic(g, boxes, scores, iou_threshold: float, max_num: int):
        boxes = g.op('Unsqueeze', boxes, _const(g, [0], torch.long))
        scores = g.op('Unsqueeze', scores, _const(g, [0, 1], torch.long))
        limit = max_num if max_num > 0 else 2**62
        selected = g.op(
            'NonMaxSuppression', boxes, scores, _const(g, [limit], torch.long),
            _const(g, [iou_threshold], torch.float32),
        )  # fmt: skip
        return g.op('Gather', selected, _const(g, 2, torch.long), axis_i=1)


class RoIAlignOp(torch.autograd.Function):
    """RoIAlign of boxes (K, 4) of image 0 on ``feat`` (1, C, H, W) -> (K, C, out_h, out_w).

    Eager: mmcv's ``roi_align`` (what mmdet's ``SingleRoIExtractor`` runs). Export: ONNX
    ``RoiAlign`` (opset 16), ``coordinate_transformation_mode='half_pixel'`` for mmcv's
    ``aligned=True`` (``'output_half_pixel'`` otherwise), ``mode='avg'``; ``sampling_ratio`` 0
    means adaptive (``ceil(roi size / output size)`` samples per bin) in both.
    """

    @staticmethod
    def forward(ctx, feat, boxes, out_h: int, out_w: int, spatial_scale: float,
                sampling_ratio: int, aligned: bool) -> torch.Tensor:  # fmt: skip
        from mmcv.ops import roi_align

        rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
        return roi_align(feat, rois, (out_h, out_w), spatial_scale, sampling_ratio, 'avg', aligned)

    @staticmethod
    def symbolic(g, feat, boxes, out_h, out_w, spatial_scale, sampling_ratio, aligned):
        count = g.op(
            'Slice', g.op('Shape', boxes), _const(g, [0], torch.long), _const(g, [1], torch.long)
        )
        batch_indices = g.op('ConstantOfShape', count, value_t=torch.tensor([0], dtype=torch.long))
        return g.op(
            'RoiAlign', feat, boxes, batch_indices,
            coordinate_transformation_mode_s='half_pixel' if aligned else 'output_half_pixel',
            mode_s='avg', output_height_i=out_h, output_width_i=out_w,
            sampling_ratio_i=sampling_ratio, spatial_scale_f=spatial_scale,
        )  # fmt: skip


def _decode(priors, deltas, means, stds, clip_hw, wh_ratio_clip=16 / 1000):
    """``delta2bbox`` of mmdet 3.3 (``DeltaXYWHBBoxCoder``, no centre clamp), out of place, with
    the clip bounds as tensors (the input size of the traced graph)."""
    deltas = deltas.reshape(-1, 4)
    denorm = deltas * deltas.new_tensor(stds).view(1, -1) + deltas.new_tensor(means).view(1, -1)
    dxy, dwh = denorm[:, :2], denorm[:, 2:]
    pxy = (priors[:, :2] + priors[:, 2:]) * 0.5
    pwh = priors[:, 2:] - priors[:, :2]
    dxy_wh = pwh * dxy
    max_ratio = np.abs(np.log(wh_ratio_clip))
    dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + dxy_wh
    gwh = pwh * dwh.exp()
    boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
    if clip_hw is None:
        return boxes
    h, w = clip_hw
    bound = torch.stack([w, h, w, h]).to(boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), bound)


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(
            f"MaskRCNNGraph cannot export this detector: {what}. It rewrites mmdet 3.3's "
            'Mask R-CNN inference (RPNHead, StandardRoIHead with SingleRoIExtractor/RoIAlign, '
            'BBoxHead with DeltaXYWHBBoxCoder, FCNMaskHead); change the config or export the '
            'backbone + neck only (mlla_mm.deploy.DetectorFeatures)'
        )


def _nms_iou(nms_cfg, where: str) -> float:
    cfg = dict(nms_cfg)
    _check(cfg.pop('type', 'nms') == 'nms', f'{where}.nms.type must be "nms" (got {nms_cfg})')
    _check(not cfg.pop('class_agnostic', False), f'{where}.nms.class_agnostic is not supported')
    cfg.pop('split_thr', None)
    iou = cfg.pop('iou_threshold', None)
    _check(iou is not None and not cfg, f'{where}.nms: only iou_threshold is supported ({nms_cfg})')
    return float(iou)


def _coder(coder, where: str) -> tuple:
    _check(type(coder).__name__ == 'DeltaXYWHBBoxCoder', f'{where} needs DeltaXYWHBBoxCoder')
    _check(coder.clip_border and not coder.add_ctr_clamp, f'{where}: clip_border only')
    return tuple(coder.means), tuple(coder.stds)


def _roi_layers(extractor, where: str) -> list[tuple]:
    _check(type(extractor).__name__ == 'SingleRoIExtractor', f'{where} must be SingleRoIExtractor')
    layers = []
    for layer in extractor.roi_layers:
        _check(type(layer).__name__ == 'RoIAlign', f'{where} must use RoIAlign layers')
        _check(layer.pool_mode == 'avg', f'{where}: RoIAlign pool_mode must be "avg"')
        out_h, out_w = layer.output_size
        layers.append(
            (int(out_h), int(out_w), float(layer.spatial_scale), int(layer.sampling_ratio),
             bool(layer.aligned))
        )  # fmt: skip
    return layers


class MaskRCNNGraph(nn.Module):
    """An mmdet 3.3 Mask R-CNN as ``image -> (boxes, scores, labels, mask_probs, masks)``.

    The module holds the detector's backbone, neck, RPN head, box head and mask head (shared, not
    copied) and the test-time settings of its config (``test_cfg``, the data preprocessor).

    Input: ``image`` (1, 3, H, W) float32, the image as the test pipeline gives it to the data
    preprocessor (channel order of the loaded file, BGR for mmcv, 0..255, after ``Resize``; any
    H and W). The graph normalises, pads to the preprocessor's size divisor, and runs inference.

    Outputs, N detections (N <= ``test_cfg.rcnn.max_per_img``), highest score first:

    * ``boxes`` (N, 4) float32, x1 y1 x2 y2 in input pixels (mmdet's ``rescale=False``);
    * ``scores`` (N,) float32, ``labels`` (N,) int64;
    * ``mask_probs`` (N, 28, 28) float32, the mask head's probabilities of each detection's class
      (``mask_size``);
    * ``masks`` (N, H, W) bool, pasted at the input size and thresholded at ``mask_thr_binary``
      (when ``paste_masks``; with ``paste_masks=False`` the output is left out).

    Args:
        detector: An mmdet ``MaskRCNN`` (``TwoStageDetector``) in eval mode (kept as
            ``self.detector``, the reference of :func:`check_detector_parity`).
        paste_masks: Paste the full-size ``masks`` in the graph (the largest tensor of the run:
            N x H x W floats before thresholding).
    """

    def __init__(self, detector: nn.Module, paste_masks: bool = True) -> None:
        super().__init__()
        _check(hasattr(detector, 'rpn_head') and hasattr(detector, 'roi_head'),
               'it is not a two-stage detector with an RPN')  # fmt: skip
        rpn, roi = detector.rpn_head, detector.roi_head
        test_cfg = detector.test_cfg
        object.__setattr__(self, 'detector', detector)  # for parity checks; not a submodule
        self.backbone = detector.backbone
        self.neck = detector.neck if getattr(detector, 'with_neck', False) else None
        self.rpn_head = rpn
        self.bbox_head = roi.bbox_head
        self.mask_head = getattr(roi, 'mask_head', None)
        self.paste_masks = paste_masks
        _check(self.mask_head is not None, 'the RoI head has no mask head (not a Mask R-CNN)')
        _check(type(roi).__name__ == 'StandardRoIHead', 'roi_head must be StandardRoIHead')
        _check(not roi.with_shared_head, 'RoI heads with a shared head are not supported')

        # data preprocessor (DetDataPreprocessor at test time)
        pre = detector.data_preprocessor
        _check(not getattr(pre, 'batch_augments', None), 'batch_augments must be None')
        self.register_buffer('mean', pre.mean.view(1, -1, 1, 1).clone(), persistent=False)
        self.register_buffer('std', pre.std.view(1, -1, 1, 1).clone(), persistent=False)
        self.swap_rgb = bool(pre._channel_conversion)
        self.pad_divisor = int(pre.pad_size_divisor)
        self.pad_value = float(pre.pad_value)
        _check(bool(pre._enable_normalize), 'the data preprocessor must normalise')

        # RPN
        _check(type(rpn).__name__ == 'RPNHead', 'rpn_head must be RPNHead')
        _check(rpn.use_sigmoid_cls, 'rpn_head must use sigmoid scores')
        rpn_cfg = test_cfg.rpn
        self.rpn_means, self.rpn_stds = _coder(rpn.bbox_coder, 'rpn_head.bbox_coder')
        self.rpn_nms_pre = int(rpn_cfg.get('nms_pre', -1))
        self.rpn_max = int(rpn_cfg.max_per_img)
        self.rpn_iou = _nms_iou(rpn_cfg.nms, 'test_cfg.rpn')
        self.min_bbox_size = float(rpn_cfg.get('min_bbox_size', -1))

        # box head
        bbox = self.bbox_head
        _check(not bbox.custom_cls_channels, 'bbox_head: custom classification activations')
        _check(bbox.with_reg, 'bbox_head must regress boxes')
        self.bbox_means, self.bbox_stds = _coder(bbox.bbox_coder, 'bbox_head.bbox_coder')
        self.num_classes = int(bbox.num_classes)
        rcnn_cfg = test_cfg.rcnn
        self.score_thr = float(rcnn_cfg.score_thr)
        self.rcnn_iou = _nms_iou(rcnn_cfg.nms, 'test_cfg.rcnn')
        self.max_per_img = int(rcnn_cfg.max_per_img)
        self.mask_thr = float(rcnn_cfg.mask_thr_binary)
        _check(self.mask_thr >= 0, 'test_cfg.rcnn.mask_thr_binary must be >= 0')
        _check(type(self.mask_head).__name__ == 'FCNMaskHead', 'mask_head must be FCNMaskHead')
        up = self.mask_head.scale_factor if self.mask_head.upsample_method else 1
        self.mask_size = tuple(int(s * up) for s in self.mask_head.roi_feat_size)  # (28, 28)

        # RoI extractors
        self.bbox_rois = _roi_layers(roi.bbox_roi_extractor, 'bbox_roi_extractor')
        self.mask_rois = _roi_layers(roi.mask_roi_extractor, 'mask_roi_extractor')
        self.finest_scale = (
            float(roi.bbox_roi_extractor.finest_scale),
            float(roi.mask_roi_extractor.finest_scale),
        )

    # ---------------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """See the class docstring."""
        hw = torch._shape_as_tensor(image)[2:4]  # traced as ONNX Shape: dynamic in the graph
        feats = self.extract_feat(self.preprocess(image))
        proposals = self.propose(feats, hw)
        boxes, scores, labels = self.detect(feats, proposals, hw)
        probs = self.mask_probs(feats, boxes, labels)
        if not self.paste_masks:
            return boxes, scores, labels, probs
        masks = paste_masks(probs, boxes, image.shape[2], image.shape[3], self.mask_thr)
        return boxes, scores, labels, probs, masks

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """``DetDataPreprocessor`` at test time: channel swap, normalise, pad bottom/right."""
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise ValueError(f'image must be (1, 3, H, W), got {tuple(image.shape)}')
        x = image.float()
        if self.swap_rgb:
            x = x[:, [2, 1, 0]]
        x = (x - self.mean) / self.std
        h, w = x.shape[-2:]
        d = self.pad_divisor
        if d > 1:  # non-negative floor divisions only (ONNX integer division truncates)
            pad = (0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h)
            x = F.pad(x, pad, value=self.pad_value)
        return x

    def extract_feat(self, x: torch.Tensor) -> tuple:
        x = self.backbone(x)
        return tuple(self.neck(x)) if self.neck is not None else tuple(x)

    def propose(self, feats: tuple, hw: torch.Tensor) -> torch.Tensor:
        """``RPNHead.predict_by_feat`` + ``_bbox_post_process`` for one image: (K, 4) boxes."""
        cls_scores, bbox_preds = self.rpn_head(feats)
        sizes = [s.shape[-2:] for s in cls_scores]
        priors = self.rpn_head.prior_generator.grid_priors(
            sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device
        )
        all_scores, all_deltas, all_priors, all_levels = [], [], [], []
        for level, (cls, reg, anchors) in enumerate(zip(cls_scores, bbox_preds, priors)):
            scores = cls[0].permute(1, 2, 0).reshape(-1).sigmoid()
            deltas = reg[0].permute(1, 2, 0).reshape(-1, 4)
            if self.rpn_nms_pre > 0:
                # mmdet sorts only when a level has more than nms_pre anchors; sorting always
                # (then slicing, which keeps all when fewer) is needed for one graph of any size
                scores, order = scores.sort(descending=True)
                order, scores = order[: self.rpn_nms_pre], scores[: self.rpn_nms_pre]
                deltas, anchors = deltas[order], anchors[order]
            all_scores.append(scores)
            all_deltas.append(deltas)
            all_priors.append(anchors)
            all_levels.append(torch.full_like(scores, level))
        scores = torch.cat(all_scores)
        levels = torch.cat(all_levels)
        boxes = _decode(torch.cat(all_priors), torch.cat(all_deltas), self.rpn_means,
                        self.rpn_stds, (hw[0], hw[1]))  # fmt: skip
        if self.min_bbox_size >= 0:
            w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            valid = ((w > self.min_bbox_size) & (h > self.min_bbox_size)).nonzero()[:, 0]
            boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
        keep = _batched_nms(boxes, scores, levels, self.rpn_iou, self.rpn_max)
        return boxes[keep]

    def _roi_feats(self, feats: tuple, boxes: torch.Tensor, layers: list, finest: float):
        """``SingleRoIExtractor.forward``: each box pooled from its FPN level."""
        num_levels = len(layers)
        out_h, out_w = layers[0][:2]
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        target = torch.floor(torch.log2(scale / finest + 1e-6)).clamp(min=0, max=num_levels - 1)
        target = target.long()
        out = feats[0].new_zeros(boxes.shape[0], feats[0].shape[1], out_h, out_w)
        for i, (oh, ow, spatial_scale, ratio, aligned) in enumerate(layers):
            inds = (target == i).nonzero()[:, 0]
            pooled = RoIAlignOp.apply(feats[i], boxes[inds], oh, ow, spatial_scale, ratio, aligned)
            out = out.index_put((inds,), pooled)
        return out

    def detect(self, feats: tuple, proposals: torch.Tensor, hw: torch.Tensor) -> tuple:
        """``StandardRoIHead.predict_bbox`` + ``BBoxHead.predict_by_feat`` (``multiclass_nms``)."""
        roi_feats = self._roi_feats(feats, proposals, self.bbox_rois, self.finest_scale[0])
        cls_score, bbox_pred = self.bbox_head(roi_feats)
        scores = F.softmax(cls_score, dim=-1)
        k, c = scores.shape[0], self.num_classes
        if self.bbox_head.reg_class_agnostic:
            priors = proposals
        else:
            priors = proposals[:, None].expand(k, c, 4).reshape(-1, 4)  # repeat_interleave
        boxes = _decode(priors, bbox_pred, self.bbox_means, self.bbox_stds, (hw[0], hw[1]))
        boxes = boxes.reshape(k, -1, 4).expand(k, c, 4).reshape(-1, 4)
        scores = scores[:, :-1]
        labels = torch.arange(c, device=scores.device).view(1, -1).expand_as(scores).reshape(-1)
        scores = scores.reshape(-1)
        valid = (scores > self.score_thr).nonzero()[:, 0]
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        keep = _batched_nms(boxes, scores, labels, self.rcnn_iou, self.max_per_img)
        return boxes[keep], scores[keep], labels[keep]

    def mask_probs(self, feats: tuple, boxes: torch.Tensor, labels: torch.Tensor):
        """``StandardRoIHead.predict_mask`` up to the paste: (N, 28, 28) probabilities."""
        roi_feats = self._roi_feats(feats, boxes, self.mask_rois, self.finest_scale[1])
        probs = self.mask_head(roi_feats).sigmoid()
        if self.mask_head.class_agnostic:
            return probs[:, 0]
        index = labels.view(-1, 1, 1, 1).expand(-1, 1, probs.shape[2], probs.shape[3])
        return torch.gather(probs, 1, index)[:, 0]


def _batched_nms(boxes, scores, idxs, iou: float, max_num: int) -> torch.Tensor:
    """mmcv's ``batched_nms`` (offset per group, one NMS), then the first ``max_num``.

    ``boxes.max()`` is taken with a 0 appended, which is the same for clipped (non-negative)
    boxes and defined for none.
    """
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    return NMSOp.apply(boxes + offsets[:, None], scores, iou, max_num)


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, img_h, img_w, threshold: float = 0.5):
    """``FCNMaskHead``'s paste of (N, h, w) mask probabilities into (N, img_h, img_w) bool masks.

    mmdet's ``_do_paste_mask`` samples each mask with ``grid_sample`` (bilinear,
    ``align_corners=False``, zero padding) at the pixel centres, normalised to the box; that grid
    is separable, so the same bilinear weights are applied as two matrix products (rows, then
    columns) - exact up to float rounding, standard ONNX operators, and no N x H x W x 2 grid. As
    mmdet on the CPU, each mask is zero outside its box widened by one pixel (rounded outwards).

    Args:
        probs: (N, h, w) probabilities. boxes: (N, 4) x1 y1 x2 y2 in output pixels.
        img_h, img_w: Output size (ints, or traced sizes).
        threshold: ``mask_thr_binary``: a pixel is in the mask where the value is >= threshold.

    Returns:
        Tensor: (N, img_h, img_w) bool.
    """
    x0, y0, x1, y1 = boxes[:, 0:1], boxes[:, 1:2], boxes[:, 2:3], boxes[:, 3:4]
    wy = _paste_weights(torch.arange(img_h, device=boxes.device), y0, y1, img_h, probs.shape[1])
    wx = _paste_weights(torch.arange(img_w, device=boxes.device), x0, x1, img_w, probs.shape[2])
    pasted = torch.matmul(torch.matmul(wy, probs), wx.transpose(1, 2))
    return pasted >= threshold


def to_original_size(
    outputs: dict,
    ori_shape: Sequence[int],
    input_shape: Sequence[int] | None = None,
    threshold: float = 0.5,
) -> dict:
    """Boxes and masks of the graph's outputs at the original image size, as mmdet's
    ``predict(rescale=True)`` gives them: boxes divided by the ``Resize`` scale factor, masks
    pasted from ``mask_probs`` at the original size (not the input-size ``masks`` resized).

    Args:
        outputs: The graph's outputs by name (numpy arrays or tensors).
        ori_shape: (H, W) of the image before the test pipeline's ``Resize``.
        input_shape: (H, W) of the graph's input; default: the size of ``outputs['masks']``
            (needed for a graph exported without ``masks``).
        threshold: ``test_cfg.rcnn.mask_thr_binary``.

    Returns:
        dict: ``boxes`` (N, 4) float32 and ``masks`` (N, H, W) bool numpy arrays, ``scores`` and
        ``labels`` as given.
    """
    in_h, in_w = input_shape if input_shape is not None else outputs['masks'].shape[1:]
    ori_h, ori_w = ori_shape
    scale = torch.tensor([in_w / ori_w, in_h / ori_h], dtype=torch.float32).repeat(1, 2)
    boxes = torch.as_tensor(np.asarray(outputs['boxes'])) / scale
    probs = torch.as_tensor(np.asarray(outputs['mask_probs']))
    return dict(
        boxes=boxes.numpy(), scores=np.asarray(outputs['scores']),
        labels=np.asarray(outputs['labels']),
        masks=paste_masks(probs, boxes, ori_h, ori_w, threshold).numpy(),
    )  # fmt: skip


def _paste_weights(pixels, lo, hi, size, cells: int) -> torch.Tensor:
    """(N, len(pixels), cells) bilinear weights of the mask cells at the pixel centres."""
    coord = pixels.to(torch.float32) + 0.5
    g = (coord - lo) / (hi - lo) * 2 - 1  # grid_sample's normalised coordinate (N, P)
    g = torch.where(torch.isinf(g), torch.zeros_like(g), g)  # mmdet zeroes inf (empty boxes)
    src = ((g + 1) * cells - 1) / 2  # grid_sample's unnormalisation, align_corners=False
    cell = torch.arange(cells, device=pixels.device).to(torch.float32)
    weights = (1 - (src[..., None] - cell).abs()).clamp(min=0)
    # mmdet's CPU paste (skip_empty): only pixels in [floor(lo) - 1, ceil(hi) + 1) of the box
    start = (torch.floor(lo) - 1).clamp(min=0)
    end = torch.minimum(torch.ceil(hi) + 1, torch.zeros_like(hi) + size)
    inside = (pixels.to(torch.float32) >= start) & (pixels.to(torch.float32) < end)
    return weights * inside[..., None].to(weights.dtype)
