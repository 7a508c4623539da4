"""The whole Mask R-CNN as one ONNX graph: standard operators, dynamic sizes, and detections that
match mmdet's own inference (boxes, scores, labels, masks) on photographs and toy images."""

import copy
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
pytest.importorskip('mmdet')
pytest.importorskip('mmcv.ops')

from mlla_mm.deploy import build_whole_model, onnx_io_dims  # noqa: E402
from mlla_mm.deploy.mask_rcnn_export import (  # noqa: E402
    export_detector_onnx,
    onnx_session,
)
from mlla_mm.deploy.mask_rcnn_graph import (  # noqa: E402
    OUTPUT_NAMES,
    MaskRCNNGraph,
    paste_masks,
)
from mlla_mm.deploy.mask_rcnn_parity import (  # noqa: E402
    assert_det_parity,
    compare_detections,
    detection_check_images,
    mmdet_predict,
)

ROOT = Path(__file__).parents[2]
TOY = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'
# The smallest MLLA with every stage (see test_deploy.py), heads at 32 channels.
MINI = {'embed_dims': 16, 'depths': (1, 1, 1, 1), 'num_heads': (1, 2, 2, 4)}


def _small_cfg() -> Config:
    cfg = Config.fromfile(TOY)
    cfg.model.backbone.arch = MINI
    cfg.model.neck.in_channels = [16, 32, 64, 128]
    cfg.model.neck.out_channels = 32
    cfg.model.rpn_head.in_channels = cfg.model.rpn_head.feat_channels = 32
    roi = cfg.model.roi_head
    roi.bbox_roi_extractor.out_channels = roi.mask_roi_extractor.out_channels = 32
    roi.bbox_head.in_channels = roi.mask_head.in_channels = 32
    roi.bbox_head.fc_out_channels = 64
    roi.mask_head.conv_out_channels = 32
    return cfg


def _confident(graph: MaskRCNNGraph) -> MaskRCNNGraph:
    """Random weights made confident, so that detections score above 0.3 (0.6-0.9 here, not
    saturated): larger class weights spread the softmax, larger regression weights move the
    boxes off the proposals; the backbone, RPN and mask head keep their initialisation."""
    head = graph.bbox_head
    with torch.no_grad():
        head.fc_cls.weight.mul_(15.0)
        head.fc_reg.weight.mul_(10.0)
    return graph


@pytest.fixture(scope='module')
def small_graph() -> MaskRCNNGraph:
    torch.manual_seed(0)
    return _confident(build_whole_model(_small_cfg()))


def test_graph_eager_matches_mmdet_predict(small_graph):
    """The rewritten inference in eager mode (mmcv kernels) gives mmdet's detections exactly; the
    separable paste gives its masks (up to pixels at the threshold)."""
    cfg = _small_cfg()
    images = detection_check_images(cfg, photos=False, toy=2)
    total = 0
    for _, image in images:
        ref = mmdet_predict(small_graph.detector, image)
        x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float()
        with torch.no_grad():
            boxes, scores, labels, probs, masks = small_graph(x)
        assert torch.equal(labels, torch.from_numpy(ref['labels']))
        assert torch.equal(boxes, torch.from_numpy(ref['boxes']))
        assert torch.equal(scores, torch.from_numpy(ref['scores']))
        assert probs.shape == (len(boxes), 28, 28) and masks.shape == (len(boxes), *image.shape[:2])
        differ = (masks.numpy() != ref['masks']).sum()
        assert differ <= 1e-4 * masks.numel(), differ
        total += int((scores > 0.3).sum())
    assert total > 0  # the comparison covered confident detections


def test_to_original_size_matches_mmdet_rescale(small_graph):
    """Graph outputs mapped to the original image (a photograph, resized by the test pipeline)
    give mmdet's predict(rescale=True): boxes divided by the scale factor, masks pasted there."""
    skimage_data = pytest.importorskip('skimage.data')
    from mlla_mm.deploy.mask_rcnn_graph import to_original_size
    from mlla_mm.deploy.mask_rcnn_parity import resize_for_test

    original = skimage_data.coffee()[..., ::-1]  # 400x600 BGR
    image = np.ascontiguousarray(resize_for_test(original, _small_cfg()))  # 85x128
    ref = mmdet_predict(small_graph.detector, image, ori_shape=original.shape[:2])
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float()
    with torch.no_grad():
        outputs = dict(zip(OUTPUT_NAMES, small_graph(x)))
    got = to_original_size(outputs, original.shape[:2])
    assert len(got['boxes']) > 0 and got['masks'].shape[1:] == (400, 600)
    np.testing.assert_array_equal(got['boxes'], ref['boxes'])
    assert compare_detections(ref, got, score_thr=0.0).ok


def test_unsupported_parts_are_refused(small_graph):
    """Inference settings the graph does not rewrite fail with an error naming them."""
    detector = small_graph.detector
    test_cfg = detector.test_cfg
    try:
        detector.test_cfg = copy.deepcopy(test_cfg)
        detector.test_cfg.rcnn.nms = dict(type='soft_nms', iou_threshold=0.5)
        with pytest.raises(ValueError, match='test_cfg.rcnn.nms.type must be "nms"'):
            MaskRCNNGraph(detector)
    finally:
        detector.test_cfg = test_cfg
    with pytest.raises(ValueError, match=r'image must be \(1, 3, H, W\)'):
        small_graph(torch.zeros(2, 3, 64, 64))


def test_paste_matches_grid_sample():
    """The two-matrix paste equals mmdet's grid_sample paste (its GPU path, no crop)."""
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask

    torch.manual_seed(0)
    probs = torch.rand(5, 28, 28)
    boxes = torch.tensor(
        [[3.2, 4.7, 40.1, 30.3], [0.0, 0.0, 63.0, 47.0], [10.5, 2.0, 11.5, 9.0],
         [50.0, 40.0, 64.0, 48.0], [-3.0, 20.0, 20.0, 60.0]]
    )  # fmt: skip
    expected, _ = _do_paste_mask(probs[:, None], boxes, 48, 64, skip_empty=False)
    got = paste_masks(probs, boxes, 48, 64, threshold=0.5)
    assert (got != (expected >= 0.5)).sum() == 0


def test_compare_detections_flags_differences():
    ref = dict(
        boxes=np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32),
        scores=np.array([0.9, 0.5], np.float32),
        labels=np.array([1, 2]),
        masks=np.zeros((2, 50, 50), bool),
    )
    ref['masks'][0, :10, :10] = ref['masks'][1, 20:40, 20:40] = True
    same = {k: v.copy() for k, v in ref.items()}
    assert compare_detections(ref, same).ok
    moved = {k: v.copy() for k, v in ref.items()}
    moved['boxes'][1] += 1.0
    assert 'box IoU' in str(compare_detections(ref, moved))
    relabelled = {k: v.copy() for k, v in ref.items()}
    relabelled['labels'][0] = 0
    result = compare_detections(ref, relabelled)
    assert (result.missing, result.extra) == (1, 1)
    with pytest.raises(AssertionError, match='missing'):
        assert_det_parity([result])


def test_export_tool_whole_mask_rcnn(tmp_path, capsys, small_graph):
    """tools/deployment/export_onnx.py --whole-model on a detection config: one graph of standard
    operators, traced at 96x96, that matches mmdet's predict() on photographs and toy images of
    other sizes (confident detections compared), and runs with no detection at all."""
    cfg_file, ckpt, out = tmp_path / 'cfg.py', tmp_path / 'det.pth', tmp_path / 'mask_rcnn.onnx'
    _small_cfg().dump(str(cfg_file))
    torch.save({'state_dict': small_graph.detector.state_dict()}, ckpt)
    tool = runpy.run_path(str(ROOT / 'tools' / 'deployment' / 'export_onnx.py'))
    args = ['--config', str(cfg_file), '--whole-model', '--checkpoint', str(ckpt)]
    rc = tool['main']([*args, '--shape', '96', '96', '--out', str(out), '--toy-images', '3'])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert 'parity OK' in printed and 'custom-domain operators: none' in printed
    assert 'NonMaxSuppression' in printed and 'RoiAlign' in printed
    matched = [line for line in printed.splitlines() if 'onnxruntime vs mmdet' in line]
    assert len(matched) == 6  # 3 photographs + 3 toy images
    assert any(' 0/0 matched' not in line for line in matched), printed

    dims = onnx_io_dims(out)
    assert dims['image'][:2] == [1, 3] and all(isinstance(d, str) for d in dims['image'][2:])
    assert dims['boxes'] == ['detections', 4] and dims['mask_probs'] == ['detections', 28, 28]
    assert dims['masks'] == ['detections', 'height', 'width']


def test_export_without_detections(tmp_path):
    """No score above the threshold: the graph runs and gives empty outputs of the right ranks
    (zero-size NonZero, NMS, RoiAlign and paste)."""
    cfg = _small_cfg()
    cfg.model.test_cfg.rcnn.score_thr = 1.0  # softmax scores never exceed it
    torch.manual_seed(0)
    graph = build_whole_model(cfg)
    out = tmp_path / 'none.onnx'
    assert export_detector_onnx(graph, out, (64, 96)) == list(OUTPUT_NAMES)
    image = np.random.default_rng(0).uniform(0, 255, (1, 3, 70, 90)).astype(np.float32)
    session = onnx_session(out)
    got = dict(zip(OUTPUT_NAMES, session.run(None, {'image': image})))
    shapes = {k: v.shape for k, v in got.items()}
    assert shapes == dict(boxes=(0, 4), scores=(0,), labels=(0,), mask_probs=(0, 28, 28),
                          masks=(0, 70, 90)), shapes  # fmt: skip
    assert got['masks'].dtype == bool and got['labels'].dtype == np.int64
