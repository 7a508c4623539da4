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
