"""The package itself: the backbone needs only torch and mmengine; the task pieces fail with an
install hint when their library is missing."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

BLOCK = ('mmcv', 'mmdet', 'mmseg', 'mmpretrain', 'torchvision', 'onnx', 'onnxruntime')


def _run_without_openmmlab(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where the optional libraries cannot be imported."""
    prelude = textwrap.dedent(
        f"""
        import sys

        # as if not installed: importing raises ImportError, importlib.util.find_spec gives None
        for name in {BLOCK!r}:
            sys.modules[name] = None
        """
    )
    return subprocess.run(
        [sys.executable, '-c', prelude + textwrap.dedent(code)], capture_output=True, text=True
    )


def test_backbone_needs_only_torch_and_mmengine():
    out = _run_without_openmmlab(
        """
        import torch
        import mlla_mm
        from mmengine.registry import MODELS

        model = MODELS.build(dict(type='mlla_mm.MLLA', arch='tiny')).eval()
        with torch.no_grad():
            feats = model(torch.randn(1, 3, 64, 96))
        print([tuple(f.shape) for f in feats])
        loaded = [m for m, mod in sys.modules.items() if mod is not None]
        print(sorted(m for m in loaded if m.split('.')[0] in {'mmcv', 'mmdet', 'mmseg'}))
        """
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == '[(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]'
    assert lines[1] == '[]'


@pytest.mark.parametrize(
    'package,extra', [('mmdet', 'det'), ('mmseg', 'seg'), ('mmpretrain', 'cls')]
)
def test_missing_library_names_the_install_command(package, extra):
    out = _run_without_openmmlab(
        f"""
        from mlla_mm.utils import require
        try:
            require({package!r}, 'a test')
        except ImportError as e:
            print(e)
        """
    )
    assert out.returncode == 0, out.stderr
    assert f'mlla_mm needs {package} for a test' in out.stdout
    assert f'pip install -e "{ROOT}[{extra}]"' in out.stdout  # from a checkout: editable
    assert len(out.stdout.strip().splitlines()) == 1


def test_installed_package_names_its_extra(monkeypatch):
    """Installed from a wheel (no checkout around it), the message names the wheel's extra."""
    from mlla_mm.utils import dependencies

    monkeypatch.setattr(dependencies, '_checkout', lambda: None)
    with pytest.raises(ImportError) as err:
        dependencies.require('no_such_module_mlla', 'a test')
    assert str(err.value).startswith('mlla_mm needs no_such_module_mlla for a test')
    assert dependencies.missing_message('onnx', 'ONNX export').endswith(
        'install it with `pip install "mlla_mm[deploy]"` (package: onnx)'
    )
    assert 'pip install "mlla_mm[det]"' in dependencies.missing_message('mmdet')


def test_torch_floor_is_stated_and_checked():
    """setup.py states the oldest torch the code runs on, and an older one fails clearly."""
    import re

    from mlla_mm.utils import MIN_TORCH, check_torch_version

    setup = (Path(__file__).parents[1] / 'setup.py').read_text()
    floor = re.search(r"'torch>=([\d.]+)'", setup).group(1)
    assert tuple(int(p) for p in floor.split('.')) == MIN_TORCH == (2, 3)
    assert hasattr(torch.compiler, 'is_compiling')  # the API that sets the floor
    with pytest.raises(ImportError, match=r'needs torch >= 2.3.*found torch 2.2.1'):
        check_torch_version('2.2.1+cpu')
    check_torch_version('2.3.0')
    check_torch_version(torch.__version__)
