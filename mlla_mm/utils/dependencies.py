"""Import guards for the optional OpenMMLab libraries."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ['EXTRAS', 'MIN_TORCH', 'check_torch_version', 'require']

# The oldest torch the package runs on: torch.compiler.is_compiling() (the backbone's tracing
# checks) appeared in torch 2.3. setup.py states the same floor.
MIN_TORCH = (2, 3)


def check_torch_version(version: str) -> None:
    """Raise ImportError, naming the floor and the fix, if ``version`` is older than MIN_TORCH."""
    try:
        have = tuple(int(p) for p in version.split('+')[0].split('.')[:2])
    except ValueError:  # a development build with an unusual version string: do not block it
        return
    if have < MIN_TORCH:
        floor = '.'.join(map(str, MIN_TORCH))
        raise ImportError(
            f'mlla_mm needs torch >= {floor} (it uses torch.compiler.is_compiling), found torch '
            f'{version}; upgrade with `pip install "torch>={floor}"`'
        )


# package -> (pip distribution, extra of this package that installs it)
EXTRAS = {
    'mmcv': ('mmcv==2.1.0', 'det,seg,cls'),
    'mmdet': ('mmdet==3.3.0', 'det'),
    'mmseg': ('mmsegmentation==1.2.2', 'seg'),
    'mmpretrain': ('mmpretrain==1.2.0', 'cls'),
    'onnx': ('onnx', 'deploy'),
    'onnxruntime': ('onnxruntime', 'deploy'),
}


def require(package: str, feature: str = '') -> ModuleType:
    """Import ``package`` or fail with a message naming it and the command that installs it.

    Args:
        package: Top-level module name, e.g. ``'mmdet'``.
        feature: What needs it, for the message (e.g. ``'detection configs'``).
    """
    try:
        return importlib.import_module(package)
    except ImportError as e:
        dist, extra = EXTRAS.get(package, (package, 'all'))
        need = f' for {feature}' if feature else ''
        raise ImportError(
            f'mlla_mm needs {package}{need}, which is not importable ({e}). Install it with '
            f'`pip install -e ".[{extra}]"` (or `make setup`, which builds the pinned stack; '
            f'mmcv needs ops: see README "Installation"); package: {dist}'
        ) from e
