"""Old import paths of the public API, kept for one release (until mlla_mm 0.2).

Each old module (``mlla_mm/inference.py``, ...) is a small shim: it calls :func:`moved`, which
warns once with a ``DeprecationWarning`` naming the new path, re-exports the new module's public
names and forwards any other attribute to it.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from types import FrameType, ModuleType
from typing import Any, Callable

__all__ = ['moved']

_IMPORT_MACHINERY = ('importlib', '_frozen_importlib')


def _importer(old: str) -> FrameType | None:
    """The frame of the code that imported ``old`` (the first outside the import system)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get('__name__', '')
        if name not in (old, __name__) and not name.startswith(_IMPORT_MACHINERY):
            return frame
        frame = frame.f_back
    return None


def moved(old: str, *new: str) -> Callable[[str], Any]:
    """Warn that module ``old`` moved to ``new``; return a ``__getattr__`` for the old module.

    The warning is skipped when mlla_mm's own code still imports the old path (nothing for the
    user to change). Call it as the first statement of the shim::

        __getattr__ = moved(__name__, 'mlla_mm.apis.inference')
        from mlla_mm.apis.inference import *  # noqa: E402,F401,F403

    Args:
        old: The old module name, e.g. ``'mlla_mm.inference'``.
        *new: The module(s) that now hold its names, searched in order.

    Returns:
        A module ``__getattr__`` that finds any name (private ones too) in the new modules.
    """
    frame = _importer(old)
    importer = frame.f_globals.get('__name__', '') if frame is not None else ''
    if frame is not None and not (importer.startswith('mlla_mm.') or importer == 'mlla_mm'):
        # Attributed to the importing line (as stacklevel would, past importlib's frames).
        warnings.warn_explicit(
            f'{old} moved to {" / ".join(new)}; the old path works until mlla_mm 0.2',
            DeprecationWarning,
            frame.f_code.co_filename,
            frame.f_lineno,
            module=importer,
            registry=frame.f_globals.setdefault('__warningregistry__', {}),
        )
    modules: list[ModuleType] = [importlib.import_module(name) for name in new]

    def __getattr__(name: str) -> Any:
        for module in modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f'module {old!r} has no attribute {name!r}')

    return __getattr__
