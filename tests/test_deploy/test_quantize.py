"""int8 post-training quantisation (mlla_mm.deploy.quantize): NNCF on the rewritten export,
calibrated on toy images through the detector's data preprocessor; the int8 graph stays close
to float32 on validation images in onnxruntime and OpenVINO (x86 int8 kernels, no AMX needed),
and the detector runs with an ONNX backbone in mmdet's test loop."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config

from mlla_mm.deploy import build_whole_model, export_onnx
from mlla_mm.deploy.export_friendly import export_friendly

pytest.importorskip('onnxruntime')
pytest.importorskip('nncf')
pytest.importorskip('mmdet')

ROOT = Path(__file__).parents[2]
MINI = {'embed_dims': 16, 'depths': (1, 1, 1, 1), 'num_heads': (1, 2, 2, 4)}


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """The toy detector config on a small toy set, MINI backbone, random weights."""
    from mlla_mm.datasets.toy_coco import make_toy_coco

    root = tmp_path_factory.mktemp('toy_coco')
    make_toy_coco(str(root), num_train=8, num_val=4)
    cfg = Config.fromfile(ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py')
    cfg.model.backbone.arch = MINI
    cfg.model.neck.in_channels = [16, 32, 64, 128]
    for split in ('train', 'val', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = str(root) + '/'
        cfg[f'{split}_dataloader'].num_workers = 0
        cfg[f'{split}_dataloader'].persistent_workers = False
    for name in ('val_evaluator', 'test_evaluator'):
        cfg[name].ann_file = str(root / 'annotations' / 'instances_val.json')
    torch.manual_seed(0)
    detector = build_whole_model(cfg).detector
    return cfg, detector


def test_int8_backbone_stays_close_to_float(toy, tmp_path):
    from mlla_mm.deploy.quantize import backbone_inputs, quantize_onnx
    from mlla_mm.deploy.runtimes import make_runner, runtimes_available

    cfg, detector = toy
    fp32, int8 = tmp_path / 'fp32.onnx', tmp_path / 'int8.onnx'
    export_onnx(export_friendly(detector.backbone), fp32, (128, 128))
    calibration = backbone_inputs(cfg, detector, 'train', 8)
    assert calibration[0].shape[:2] == (1, 3) and calibration[0].dtype == np.float32
    quantize_onnx(fp32, int8, calibration)
    import onnx

    graph = onnx.load(str(int8)).graph
    assert {'QuantizeLinear', 'DequantizeLinear'} <= {n.op_type for n in graph.node}
    # the default preset: symmetric activations (zero points 0), which OpenVINO's int8
    # convolutions take; with asymmetric ones it ran the 1x1 convolutions in float32
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    activation_zero_points = [
        initializers[n.input[2]]
        for n in graph.node
        if n.op_type == 'QuantizeLinear' and n.input[0] not in initializers
    ]
    assert activation_zero_points and not any(z.any() for z in activation_zero_points)
    if runtimes_available(['openvino-int8']):
        from mlla_mm.deploy.runtimes import openvino_model

        kernels = [
            op.get_rt_info()['primitiveType'].astype(str).lower()
            for op in openvino_model(int8, 1).get_runtime_model().get_ordered_ops()
            if op.get_rt_info()['layerType'].astype(str) in ('Convolution', 'GroupConvolution')
        ]
        int8_kernels = [k for k in kernels if k.endswith(('i8', 'u8'))]
        assert len(int8_kernels) > len(kernels) / 2, kernels
    val = backbone_inputs(cfg, detector, 'val', 2)
    for runtime in runtimes_available(['onnxruntime-int8', 'openvino-int8']):
        run = make_runner(runtime, onnx_file=int8, threads=1)
        for x in val:
            with torch.no_grad():
                expected = [e.numpy() for e in detector.backbone(torch.from_numpy(x))]
            got = run(x)
            got = list(got.values()) if hasattr(got, 'values') else got
            for e, g in zip(expected, got):
                cos = float((e * g).sum() / np.linalg.norm(e) / np.linalg.norm(g))
                assert cos > 0.99, (runtime, cos)


def test_quantize_onnx_refuses_an_unknown_preset(tmp_path):
    from mlla_mm.deploy.quantize import quantize_onnx

    with pytest.raises(ValueError, match='preset'):
        quantize_onnx(tmp_path / 'fp32.onnx', tmp_path / 'int8.onnx', [], preset='fast')


def test_detector_evaluates_with_an_onnx_backbone(toy, tmp_path):
    from mlla_mm.deploy.quantize import OnnxBackbone, evaluate_detector

    cfg, detector = toy
    fp32 = tmp_path / 'fp32.onnx'
    export_onnx(export_friendly(detector.backbone), fp32, (128, 128))
    own = detector.backbone
    metrics = evaluate_detector(cfg, detector, tmp_path / 'eval', OnnxBackbone(fp32))
    assert detector.backbone is own
    assert any(k.endswith('bbox_mAP_50') for k in metrics)
