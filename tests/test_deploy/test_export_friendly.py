"""The deploy-time rewrite (mlla_mm.deploy.export_friendly), both token layouts: exact against
the unmodified PyTorch model in eager mode and exported (onnxruntime, OpenVINO) at two dynamic
sizes; no operator the runtimes ran slowly; OpenVINO's bf16 residual stream; the runtime
benchmark runs."""

import runpy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mmengine.config import Config

from mlla_mm.deploy import (
    assert_parity,
    build_backbone,
    build_whole_model,
    check_onnx_parity,
    export_onnx,
)
from mlla_mm.deploy.export_friendly import (
    LAYOUTS,
    ExportStage,
    ExportStageNCHW,
    OutputNorm,
    export_friendly,
)
from mlla_mm.deploy.mask_rcnn_export import onnx_ops

pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')

ROOT = Path(__file__).parents[2]
# stages 0-1 take the full-width attention products, stages 2-3 (8 heads) the per-head ones
MINI = {'embed_dims': 16, 'depths': (1, 2, 1, 1), 'num_heads': (1, 2, 8, 8)}


def _randomise_batch_norms(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@pytest.fixture(scope='module')
def mini():
    torch.manual_seed(0)
    model = build_backbone(MINI)
    _randomise_batch_norms(model)  # folding must use the running statistics
    return model


@pytest.mark.parametrize('layout', LAYOUTS)
def test_rewrite_is_exact_in_eager_and_leaves_the_model(mini, layout):
    rewritten = export_friendly(mini, layout)
    stage_type = ExportStageNCHW if layout == 'nchw' else ExportStage
    assert all(isinstance(s, stage_type) for s in rewritten.layers)
    assert all(isinstance(getattr(rewritten, f'norm{i}'), OutputNorm) for i in range(4))
    if layout == 'nhwc':
        assert [s.blocks[0].full_width for s in rewritten.layers] == [True, True, False, False]
    assert not any(isinstance(s, (ExportStage, ExportStageNCHW)) for s in mini.layers)
    assert not isinstance(mini.norm0, OutputNorm)
    assert mini.patch_embed.conv1.norm is not None  # the original keeps its BatchNorm
    for shape in [(2, 3, 64, 96), (1, 3, 67, 93)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            for a, b in zip(mini(x), rewritten(x)):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope='module', params=LAYOUTS)
def mini_onnx(mini, tmp_path_factory, request):
    out = tmp_path_factory.mktemp('friendly') / f'mini_{request.param}.onnx'
    export_onnx(export_friendly(mini, request.param), out, (64, 64))
    return out


def test_export_is_exact_at_two_dynamic_sizes(mini, mini_onnx):
    results = check_onnx_parity(mini, mini_onnx, [(96, 160), (77, 130)], batch=2)
    assert_parity(results, 1e-4)


def test_export_has_none_of_the_slow_operators(mini_onnx):
    """What the profiles found slow: RoPE's Gather/Concat of channel pairs, per-block Sin/Cos,
    the strided ReduceMean over tokens, BatchNorm; Sin/Cos once per stage (nchw: of the row and
    the column angles apart, and no Expand: OpenVINO's is a reference kernel); nchw: no
    transposes of the tokens inside the blocks (only operands of the d x d products, which the
    runtimes fold into their MatMul)."""
    ops = onnx_ops(mini_onnx)
    blocks, stages = sum(MINI['depths']), len(MINI['depths'])
    assert not {'BatchNormalization', 'Split'} & set(ops)
    assert ops.get('Gather', 0) <= stages * 40  # shape arithmetic only
    graph = onnx.load(str(mini_onnx)).graph
    reductions = [n for n in graph.node if n.op_type == 'ReduceMean']
    axes = [tuple(a.ints) for n in reductions for a in n.attribute if a.name == 'axes']
    # the output norms (one per stage here) over the channels of NCHW views: mean and variance
    output_norms = [(1,)] * (2 * stages)
    if mini_onnx.stem.endswith('nhwc'):
        assert axes == output_norms
        assert ops.get('Sin', 0) == stages and ops.get('Cos', 0) == stages
        return
    # LayerNorm over the channels (mean and variance); mean(k) over the contiguous token axis
    assert sorted(axes) == sorted([(1,)] * (4 * blocks) + [(-1,)] * blocks + output_norms)
    assert ops.get('Sin', 0) == 2 * stages and ops.get('Cos', 0) == 2 * stages
    assert 'Expand' not in ops
    assert ops['Transpose'] <= 3 * blocks + 6 * stages


@pytest.mark.parametrize('static', [False, True], ids=['dynamic', 'static'])
@pytest.mark.parametrize('shape', [(2, 3, 96, 160), (1, 3, 77, 130)])
def test_openvino_runs_the_export_exactly(mini, mini_onnx, shape, static):
    """The dynamic file in OpenVINO, compiled for its dynamic sizes or for the input's shape
    (``input_shape``: then the compiled model's input is that static shape)."""
    pytest.importorskip('openvino')
    from mlla_mm.deploy.runtimes import make_runner, openvino_model

    x = torch.randn(*shape)
    input_shape = shape if static else None
    run = make_runner('openvino', onnx_file=mini_onnx, threads=1, input_shape=input_shape)
    got = run(x.numpy())
    compiled_input = openvino_model(mini_onnx, 1, input_shape=input_shape).input(0)
    assert compiled_input.get_partial_shape().is_static == static
    with torch.no_grad():
        expected = mini(x)
    for i, e in enumerate(expected):
        a = got[i]
        assert a.shape == tuple(e.shape)
        assert np.abs(a - e.numpy()).max() / np.abs(e.numpy()).max() < 1e-4


def test_runtimes_cancel_the_transposes_between_stages(mini_onnx):
    """nchw: each stage's (B, H, W, C) <-> (B, C, H, W) transposes meet the inverse ones of the
    patch merging, the output norm and the backbone's output, so that neither runtime moves the
    tokens between stages (they did: 3 % of OpenVINO's time at 1280x800)."""
    if mini_onnx.stem.endswith('nhwc'):
        pytest.skip('the nhwc layout transposes around every depthwise convolution')
    ort = pytest.importorskip('onnxruntime')
    options = ort.SessionOptions()
    optimised = mini_onnx.with_name('mini_nchw_ort_optimised.onnx')
    options.optimized_model_filepath = str(optimised)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(mini_onnx), options, providers=['CPUExecutionProvider'])
    graph = onnx.load(str(optimised)).graph
    perms = [tuple(a.ints) for n in graph.node if n.op_type == 'Transpose' for a in n.attribute]
    # left: the operands of the d x d products, the RoPE tables' and F.pad's small arithmetic
    assert not {(0, 2, 3, 1), (0, 3, 1, 2)} & set(perms), perms
    pytest.importorskip('openvino')
    from mlla_mm.deploy.runtimes import openvino_model

    runtime_model = openvino_model(mini_onnx, threads=1).get_runtime_model()
    transposed = [
        op.get_output_partial_shape(0)
        for op in runtime_model.get_ordered_ops()
        if op.get_rt_info()['layerType'].astype(str) == 'Transpose'
    ]
    # token tensors have a dynamic batch size; the tables and constants left do not
    assert transposed and not [shape for shape in transposed if shape[0].is_dynamic], transposed


def test_openvino_bf16_keeps_the_residual_stream_in_bf16(mini_onnx):
    """OutputNorm's purpose: no float32 residual Add left in OpenVINO's bf16 execution graph
    (before it, every one was, with a reorder on each side). Needs a CPU with bf16."""
    ov = pytest.importorskip('openvino')
    if 'BF16' not in ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'):
        pytest.skip('no bf16 on this CPU: OpenVINO runs float32')
    from mlla_mm.deploy.runtimes import openvino_model

    compiled = openvino_model(mini_onnx, threads=1, precision='bf16')
    f32_adds = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        names = info['originalLayersNames'].astype(str)
        residual_add = '/blocks.' in names and '/Add' in names
        precision = info['outputPrecisions'].astype(str)
        if info['layerType'].astype(str) == 'Eltwise' and residual_add and precision == 'f32':
            f32_adds.append(op.get_friendly_name())
    assert not f32_adds


def test_segmentor_with_the_rewrite_is_exact(tmp_path):
    pytest.importorskip('mmseg')
    cfg = Config.fromfile(ROOT / 'configs' / 'toy' / 'upernet_mlla_t_toy.py')
    cfg.model.backbone.arch = MINI
    cfg.model.decode_head.in_channels = [16, 32, 64, 128]
    cfg.model.auxiliary_head.in_channels = 64
    model = build_whole_model(cfg)
    out = tmp_path / 'upernet.onnx'
    export_onnx(export_friendly(model), out, (64, 64))
    assert_parity(check_onnx_parity(model, out, [(96, 160), (77, 130)], batch=1), 1e-4)


def test_benchmark_tool_runs_every_runtime(tmp_path, capsys):
    pytest.importorskip('openvino')
    tool = runpy.run_path(str(ROOT / 'tools' / 'deployment' / 'benchmark_runtimes.py'))
    tool['main']([
        '--models', 'mlla_t', '--size', '96x64', '--threads', '1', '--repeats', '1',
        '--work-dir', str(tmp_path), '--json', str(tmp_path / 'times.json'),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    for runner in ('eager', 'eager-bf16', 'onnxruntime', 'openvino', 'openvino-bf16'):
        assert f'mlla_t {runner} ' in printed, printed
    assert (tmp_path / 'mlla_t.onnx').exists() and (tmp_path / 'times.json').exists()
