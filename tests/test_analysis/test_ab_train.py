"""tools/analysis/ab_train.py times MLLA-T's and Swin-T's training steps alternately, and
profiles where their op time goes."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / 'tools/analysis/ab_train.py')]
SMALL = ['--size', '96x64', '--batch-size', '1', '--threads', '1']


def test_ab_train_alternates_the_models_and_prints_the_ratio():
    out = subprocess.run(
        TOOL + SMALL + ['--steps', '1'], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split(' step ')[0] for line in lines[:4]] == ['MLLA-T', 'Swin-T'] * 2
    assert re.fullmatch(r'96x64 b1 fp32: MLLA-T \d+ ms, Swin-T \d+ ms, [\d.]+x', lines[-1])


def test_ab_train_profile_splits_the_op_time_by_kind():
    out = subprocess.run(TOOL + SMALL + ['--profile'], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    # (the profiler may print its own lines too)
    mlla, swin = (line for line in out.stdout.splitlines() if line.startswith(('MLLA', 'Swin')))
    kinds = {k.strip(): int(v) for k, v in re.findall(r'([a-zA-Z ]+) (\d+)[,;]', mlla)}
    assert set(kinds) == {'GEMM', 'depthwise conv', 'other conv', 'C kernels', 'other'}
    assert kinds['GEMM'] > 0 and kinds['depthwise conv'] > 0  # MLLA-T has both
    assert swin.startswith('Swin-T 96x64 b1 fp32 op ms: GEMM ')
    assert ' depthwise conv 0,' in swin  # Swin-T has no depthwise conv


def test_ab_train_profiles_one_model_alone():
    cmd = TOOL + SMALL + ['--profile', '--only', 'swin_t']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert [line[:6] for line in out.stdout.splitlines() if line[:4] in ('MLLA', 'Swin')] == [
        'Swin-T'
    ]
    out = subprocess.run(TOOL + ['--only', 'swin_t'], capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and '--only goes with --profile' in out.stderr


def test_ab_train_counts_each_steps_flops():
    """``--flops``: the module path's training-step FLOPs of both models and, for MLLA-T, what
    its training units run (they recompute part of the forward in backward: more)."""
    out = subprocess.run(TOOL + SMALL + ['--flops'], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    mlla, swin = (line for line in out.stdout.splitlines() if line.startswith(('MLLA', 'Swin')))
    seen, run = map(float, re.fullmatch(
        r'MLLA-T 96x64 b1 training step: ([\d.]+) GFLOP of the module path, ([\d.]+) GFLOP as '
        r'its training units run it', mlla,
    ).groups())  # fmt: skip
    assert run > seen > 0
    assert re.fullmatch(r'Swin-T 96x64 b1 training step: [\d.]+ GFLOP', swin)


def test_step_flops_count_a_depthwise_weight_gradient_per_group():
    """torch's formula counts a grouped conv's weight gradient as a dense conv's; the tool's
    counts each gradient as the forward conv's multiply-adds, and the units' in-place
    ``addmm_`` accumulations too."""
    import importlib.util

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    spec = importlib.util.spec_from_file_location('ab_train', TOOL[1])
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)

        def forward(self, x):
            return (self.conv(x),)

    net, x = Net(), torch.randn(2, 16, 5, 7)
    forward = 2 * x.numel() * 9  # 9 taps per output element
    assert tool.step_flops(net, x, False, units=False) == 2 * forward  # forward, weight's
    x.requires_grad_()
    assert tool.step_flops(net, x, False, units=False) == 3 * forward  # and the input's
    a, b, total = torch.randn(4, 5), torch.randn(5, 6), torch.zeros(4, 6)
    mapping = {torch.ops.aten.addmm_: tool._addmm_flops}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        total.addmm_(a, b)
    assert counter.get_total_flops() == 2 * 4 * 5 * 6
