"""Tests of ``mlla_mm.analysis.flops`` and ``tools/analysis/get_flops.py``: the ATen-level count
agrees with the hand count of the equations, sees the attention products, and gives the paper's
figures."""

import json
import math
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mlla_mm.analysis.flops import backbone_flops, config_flops, count_flops, mlla_macs

ROOT = Path(__file__).parents[2]
TINY = {'embed_dims': 32, 'depths': (1, 2, 2, 1), 'num_heads': (1, 2, 4, 8)}
LAYOUTS = ROOT / 'tests' / 'data' / 'mlla_official_layouts.json'


def official_params(layout: str) -> int:
    with open(LAYOUTS) as f:
        shapes = json.load(f)[layout]
    buffers = ('num_batches_tracked', 'running_mean', 'running_var', 'rope.rotations')
    return sum(math.prod(s) for k, s in shapes.items() if not k.endswith(buffers))


@pytest.mark.parametrize('num_classes', [0, 10])
@pytest.mark.parametrize('hw,batch', [((67, 93), 2), ((64, 64), 1)])
def test_counter_agrees_with_hand_count(hw, batch, num_classes):
    report = backbone_flops(TINY, *hw, num_classes=num_classes, batch_size=batch)
    hand = mlla_macs(**TINY, height=hw[0], width=hw[1], num_classes=num_classes, batch_size=batch)
    assert report.by_kind == {k: v for k, v in hand.items() if k != 'total'}
    assert report.macs == hand['total']
    assert report.input_shape == (batch, 3, *hw)


def test_autograd_path_counts_the_same():
    """With autograd the backbone takes other code paths (4-D attention products, unfused
    linears); the count is the same."""
    from mlla_mm import MLLA
    from mlla_mm.analysis.flops import MacCounting

    for train in (False, True):
        model = MLLA(arch=TINY, drop_path_rate=0.0).train(train)
        with MacCounting(model) as counting:
            outs = model(torch.zeros(2, 3, 40, 56))
        assert outs[0].requires_grad
        hand = mlla_macs(**TINY, height=40, width=56, batch_size=2)
        assert counting.macs == hand['total']
        assert counting.by_kind['attention'] == hand['attention']
        assert counting.by_kind['conv'] == hand['conv']


def test_paper_figures_mlla_t_classifier():
    """MLLA-T at 224x224 with its 1000-class head: the paper's "25M params, 4.2G FLOPs"."""
    report = backbone_flops('tiny', 224, 224, num_classes=1000)
    # exactly the official ImageNet checkpoint's parameters (24.39M, which the paper rounds to 25M)
    assert report.params == official_params('cls_tiny')
    assert report.params == pytest.approx(25e6, rel=0.03)
    assert report.macs / 1e9 == pytest.approx(4.2, rel=0.03)
    # the linear-attention products, which module-hook counters miss: 2 N C d + N C per block
    assert (
        report.by_kind['attention']
        == mlla_macs(64, (2, 4, 8, 4), (2, 4, 8, 16), 224, 224)['attention']
    )
    assert report.by_kind['attention'] > 0.02 * 1e9 * 4


def test_softmax_attention_and_inplace_products_are_counted():
    class ToyAttention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(2, 3, 50, 16)
    k, v = torch.randn(2, 3, 70, 16), torch.randn(2, 3, 70, 8)
    report = count_flops(ToyAttention(), (q, k, v))
    assert report.by_kind == {'attention': 2 * 3 * 50 * 70 * (16 + 8)}

    class InPlace(nn.Module):
        def forward(self, a, b):
            out = torch.zeros(a.shape[0], b.shape[1])
            out.addmm_(a, b)
            c = torch.zeros(2, a.shape[0], b.shape[1])
            c.baddbmm_(a.expand(2, -1, -1), b.expand(2, -1, -1))
            return out, c

    report = count_flops(InPlace(), (torch.randn(5, 7), torch.randn(7, 3)))
    assert report.by_kind == {'other_matmul': 3 * 5 * 7 * 3}


def test_get_flops_tool_arch_mode(tmp_path, capsys):
    tool = runpy.run_path(str(ROOT / 'tools' / 'analysis' / 'get_flops.py'))
    out = tmp_path / 'flops.json'
    result = tool['main'](['--arch', 'tiny', '--shape', '64', '96', '--json', str(out)])
    printed = capsys.readouterr().out
    assert 'attention' in printed and 'GMACs' in printed
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved['input_shape'] == [1, 3, 64, 96]
    hand = mlla_macs(64, (2, 4, 8, 4), (2, 4, 8, 16), 64, 96)
    assert saved['macs'] == hand['total']
    assert saved['by_kind']['attention'] == hand['attention']
    assert saved['params'] == pytest.approx(23.88e6, rel=1e-3)


def test_mask_rcnn_mlla_t_paper_figures():
    """Mask R-CNN MLLA-T at 1280x800: the paper's 44M params and 255G FLOPs (mmdet's convention:
    RoI heads on the RPN's proposals)."""
    pytest.importorskip('mmdet')
    report = config_flops(str(ROOT / 'configs' / 'mask_rcnn_mlla_t.py'), 800, 1280)
    assert report.params / 1e6 == pytest.approx(44, rel=0.03)
    assert report.macs / 1e9 == pytest.approx(255, rel=0.04)
    backbone = mlla_macs(64, (2, 4, 8, 4), (2, 4, 8, 16), 800, 1280)
    assert report.by_kind['attention'] == backbone['attention']
