"""tools/analysis/ab_inference.py times the backbones of a given checkout (here: this one)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ab_inference_times_this_checkout():
    cmd = [sys.executable, str(ROOT / 'tools/analysis/ab_inference.py'), str(ROOT)]
    cmd += ['--sizes', '96x64', '--repeats', '1', '--threads', '1', '--fp32-only']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.strip().splitlines()
    assert line.startswith(f'{ROOT} 96x64 fp32: MLLA-T ') and line.endswith('x')


def test_ab_inference_refuses_a_folder_without_the_package(tmp_path):
    cmd = [sys.executable, str(ROOT / 'tools/analysis/ab_inference.py'), str(tmp_path)]
    out = subprocess.run(cmd + ['--fp32-only'], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and 'not from' in out.stderr
