"""Deployment: ONNX export with onnxruntime parity at new sizes, torch.compile with dynamic
shapes, and the classification image demo on a real photograph (``skimage.data``)."""

import json
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config

from mlla_mm.deploy import (
    ParityResult,
    ShapeGenericAdaptiveAvgPool2d,
    assert_parity,
    benchmark_compile,
    build_backbone,
    build_whole_model,
    check_onnx_parity,
    default_check_shapes,
    export_onnx,
    onnx_io_dims,
)
from mlla_mm.testing import fake_official_state_dict

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

ROOT = Path(__file__).parents[2]
# Smallest MLLA that still has every stage, heads and padding at each downsampling.
MINI = {'embed_dims': 16, 'depths': (1, 1, 1, 1), 'num_heads': (1, 2, 2, 4)}


def _is_dynamic(dim) -> bool:
    return isinstance(dim, str) and dim != ''


def test_default_check_shapes_are_new_nonsquare_and_off_grid():
    for shape in [(224, 224), (64, 64), (512, 1024), (96, 32)]:
        first, second = default_check_shapes(shape)
        assert shape not in (first, second)
        assert first[0] != first[1] and second[0] != second[1]
        assert second[0] % 32 and second[1] % 32


def test_assert_parity_reports_the_failing_size():
    ok = ParityResult(3, 64, 96, ('stage0',), (1e-7,))
    bad = ParityResult(1, 77, 130, ('stage0',), (2e-3,))
    assert_parity([ok], 1e-4)
    with pytest.raises(AssertionError, match='1x3x77x130'):
        assert_parity([ok, bad], 1e-4)


def test_export_tool_tiny_dynamic_batch_and_size(tmp_path, capsys):
    """tools/deployment/export_onnx.py: MLLA-T exported at 2x3x64x64; the graph has dynamic
    batch/height/width and matches PyTorch at other batches and sizes (non-square, and not a
    multiple of 32)."""
    out = tmp_path / 'mlla_t.onnx'
    tool = runpy.run_path(str(ROOT / 'tools' / 'deployment' / 'export_onnx.py'))
    rc = tool['main'](['--arch', 'tiny', '--shape', '64', '64', '--out', str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert 'parity OK' in printed and '3x3x101x75' in printed

    dims = onnx_io_dims(out)
    assert list(dims) == ['input', 'stage0', 'stage1', 'stage2', 'stage3']  # stage order
    assert [_is_dynamic(d) for d in dims['input']] == [True, False, True, True]
    for i in range(4):
        batch, channels, height, width = dims[f'stage{i}']
        assert channels == 64 * 2**i and all(map(_is_dynamic, (batch, height, width)))


def test_backbone_parity_batch_one_non_square(tmp_path):
    torch.manual_seed(0)
    model = build_backbone(MINI)
    out = tmp_path / 'mini.onnx'
    assert export_onnx(model, out, (64, 64)) == [f'stage{i}' for i in range(4)]
    results = check_onnx_parity(model, out, [(67, 93), (160, 96)], batch=1)
    assert_parity(results, 1e-4)
    assert [(r.batch, r.height, r.width) for r in results] == [(1, 67, 93), (1, 160, 96)]

    other = build_backbone(MINI)  # other random weights: the check does compare numbers
    with pytest.raises(AssertionError, match='parity above'):
        assert_parity(check_onnx_parity(other, out, [(64, 96)], batch=1))


def test_build_backbone_loads_official_and_own_checkpoints(tmp_path):
    layouts = json.loads((ROOT / 'tests' / 'data' / 'mlla_official_layouts.json').read_text())
    official = fake_official_state_dict(layouts['cls_tiny'])
    torch.save({'model': official, 'epoch': 300}, tmp_path / 'MLLA_T.pth')
    with pytest.warns(UserWarning, match='norm0.weight'):  # ImageNet files have norm3 only
        model = build_backbone('tiny', checkpoint=str(tmp_path / 'MLLA_T.pth'))
    assert torch.equal(model.norm3.weight, official['norm.weight'])

    own = {'backbone.' + k: v for k, v in model.state_dict().items()}
    own['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    torch.save({'state_dict': own, 'meta': {}}, tmp_path / 'mask_rcnn.pth')
    config = ROOT / 'configs' / 'mask_rcnn_mlla_t.py'
    again = build_backbone(
        config=Config.fromfile(config), checkpoint=str(tmp_path / 'mask_rcnn.pth')
    )
    assert again.out_indices == (0, 1, 2, 3)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key

    # another variant's file: refused by the backbone's load hook (or, failing that, here)
    with pytest.raises((KeyError, ValueError), match='does not (hold the weights|fit this MLLA)'):
        build_backbone('small', checkpoint=str(tmp_path / 'MLLA_T.pth'))


@pytest.mark.parametrize('size', [(4, 4), (3, 5), (7, 13), (25, 17), (2, 1)])
@pytest.mark.parametrize('output_size', [1, 2, 3, 6, (2, None)])
def test_shape_generic_adaptive_pool_matches_torch(size, output_size):
    x = torch.randn(2, 5, *size)
    expected = nn.AdaptiveAvgPool2d(output_size)(x)
    torch.testing.assert_close(ShapeGenericAdaptiveAvgPool2d(output_size)(x), expected)


def test_segmentor_whole_model_logits_parity(tmp_path):
    """UperNet (toy config, smallest backbone): image -> logits at input resolution, dynamic
    sizes through the pyramid pooling, against the unmodified PyTorch segmentor."""
    pytest.importorskip('mmseg')
    cfg = Config.fromfile(ROOT / 'configs' / 'toy' / 'upernet_mlla_t_toy.py')
    cfg.model.backbone.arch = MINI
    cfg.model.decode_head.in_channels = [16, 32, 64, 128]
    cfg.model.auxiliary_head.in_channels = 64
    model = build_whole_model(cfg)
    out = tmp_path / 'upernet.onnx'
    assert export_onnx(model, out, (64, 64)) == ['logits']
    batch, _, height, width = onnx_io_dims(out)['logits']
    assert all(map(_is_dynamic, (batch, height, width)))
    results = check_onnx_parity(model, out, [(96, 160), (77, 130)], batch=2)
    assert_parity(results, 1e-4)
    # the export swapped the pyramid pooling of a copy, not of the model
    assert not any(isinstance(m, ShapeGenericAdaptiveAvgPool2d) for m in model.modules())


def test_compile_dynamic_shapes_one_graph_no_breaks():
    """torch.compile(dynamic=True): no graph break (RoPE tables, padding), outputs equal to eager,
    and new sizes (odd, non-square) reuse the one compiled graph.

    ``aot_eager`` runs dynamo and AOTAutograd (functionalisation, the symbolic-float pass) as
    inductor does, without its C++ compile (minutes on a CPU). Stages 0-1 hold every kind of
    layer (stem and merging padding, RoPE, attention); later stages only cost tracing time.
    """
    torch.manual_seed(0)
    model = build_backbone(MINI, out_indices=(1,))
    shapes = [(64, 96), (77, 130), (101, 67)]
    stats = benchmark_compile(model, shapes, batch=2, backend='aot_eager', repeats=1)
    assert stats['graph_breaks'] == {}
    assert stats['graphs'] == 1, stats
    for row in stats['rows']:
        assert row['max_abs_diff'] < 1e-4, row


def test_cls_image_demo_top5_on_a_photo(tmp_path, capsys):
    """tools/image_demo.py's classification path on skimage's photo of a cat, with a random MLLA-T
    ImageNet classifier: five ImageNet class names with descending scores, and a drawing."""
    mmcv = pytest.importorskip('mmcv')
    pytest.importorskip('mmpretrain')
    skimage_data = pytest.importorskip('skimage.data')
    from mmpretrain.apis import get_model
    from mmpretrain.datasets.categories import IMAGENET_CATEGORIES

    from mlla_mm.utils.scope import setup_scope

    cfg = Config.fromfile(ROOT / 'configs' / 'mlla_t_in1k.py')
    setup_scope(cfg)
    ckpt, img, drawn = tmp_path / 'cls.pth', tmp_path / 'chelsea.png', tmp_path / 'out.png'
    torch.save({'state_dict': get_model(cfg).state_dict()}, ckpt)
    mmcv.imwrite(skimage_data.chelsea()[..., ::-1], str(img))  # RGB -> BGR file

    demo = runpy.run_path(str(ROOT / 'tools' / 'image_demo.py'))
    config = str(ROOT / 'configs' / 'mlla_t_in1k.py')
    demo['main']([str(img), config, str(ckpt), '--out-file', str(drawn)])
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index('{\n') :])  # after mmengine's log lines
    assert result['task'] == 'classification'
    assert drawn.is_file() and mmcv.imread(str(drawn)).shape[:2] == (300, 451)
    top5 = result['topk']
    assert len(top5) == 5 and all(t['label'] in IMAGENET_CATEGORIES for t in top5)
    scores = [t['score'] for t in top5]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1
