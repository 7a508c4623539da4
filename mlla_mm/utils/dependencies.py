"""The optional libraries: import guards whose message names the extra that installs them."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

__all__ = [
    'EXTRAS',
    'MIN_TORCH',
    'check_torch_version',
    'install_command',
    'missing_message',
    'require',
]

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
    'onnxscript': ('onnxscript', 'deploy'),
    'pycocotools': ('pycocotools', 'det'),
    'matplotlib': ('matplotlib', 'bench'),
    'psutil': ('psutil', 'bench'),
    'timm': ('timm', 'bench'),
}
# pip distribution -> import name, for the messages of libraries that name the distribution
DISTRIBUTIONS = {dist.split('=')[0]: package for package, (dist, _) in EXTRAS.items()}


def _checkout() -> Path | None:
    """The checkout this package runs from (an editable install or none), else None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / 'setup.py').is_file() and (root / 'mlla_mm').is_dir() else None


def install_command(extra: str) -> str:
    """The pip command that installs an extra of this package, as it is installed here.

    Args:
        extra: E.g. ``'deploy'`` or ``'det,seg,cls'``.

    Returns:
        str: ``pip install "mlla_mm[deploy]"`` for an installed wheel, or ``pip install -e
        "<checkout>[deploy]"`` when the package runs from a checkout.
    """
    checkout = _checkout()
    if checkout is not None:
        return f'pip install -e "{checkout}[{extra}]"'
    return f'pip install "mlla_mm[{extra}]"'


def missing_message(package: str, feature: str = '') -> str:
    """The one-line message for a missing optional library: what needs it and how to install it.

    Args:
        package: Top-level module name, e.g. ``'onnx'``.
        feature: What needs it (e.g. ``'detection configs'``).

    Returns:
        str: Starts with ``mlla_mm needs`` (the tools print such errors without a traceback).
    """
    dist, extra = EXTRAS.get(package, (package, 'all'))
    need = f' for {feature}' if feature else ''
    note = ' (mmcv with its compiled ops: see docs/installation.md)' if package == 'mmcv' else ''
    return (
        f'mlla_mm needs {package}{need}, which is not installed; install it with '
        f'`{install_command(extra)}`{note} (package: {dist})'
    )


def require(package: str, feature: str = '') -> ModuleType:
    """Import ``package`` or fail with a message naming it and the command that installs it.

    Args:
        package: Top-level module name, e.g. ``'mmdet'``.
        feature: What needs it, for the message (e.g. ``'detection configs'``).

    Returns:
        ModuleType: The imported module.

    Raises:
        ImportError: One line, starting with ``mlla_mm needs``, naming the extra to install.
    """
    try:
        return importlib.import_module(package)
    except ImportError as e:
        top = (e.name or package).split('.')[0]
        if top != package.split('.')[0] and top in EXTRAS:
            package = top  # the library is there, one of its own optional imports is not
        raise ImportError(missing_message(package.split('.')[0], feature)) from e
