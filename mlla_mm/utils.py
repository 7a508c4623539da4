"""Import guards for the optional OpenMMLab libraries."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ['EXTRAS', 'require']

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
