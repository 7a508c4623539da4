"""Let ``torch.load(weights_only=True)`` read checkpoints written by mmengine's Runner.

From torch 2.6, ``torch.load`` defaults to ``weights_only=True``: only tensors, containers and
allow-listed types may be unpickled. mmengine 0.10.7 stores a ``HistoryBuffer`` per logged scalar
in the message hub and numpy arrays, scalars and dtypes in ``meta`` and the buffers, so its own
checkpoints no longer load. We allow-list exactly those types, and nothing callable: the safety of
``weights_only`` stays on, and a pickle that smuggles in an arbitrary callable is still refused.
"""

from __future__ import annotations

import pickle
from typing import Callable

import numpy as np
import torch

__all__ = ['register_safe_globals', 'safe_globals']


def _numpy_globals() -> list:
    """Numpy types that appear in pickled arrays, scalars and dtypes, under both module paths."""
    try:  # numpy >= 2 moved ``numpy.core`` to ``numpy._core``; old pickles use the old path.
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    found = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        found.append(fn)
        for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
            found.append((fn, f'{module}.{fn.__name__}'))
    # The dtype classes (``numpy.dtypes.Float64DType`` ...), needed to rebuild dtype objects.
    found.extend({type(np.dtype(t)) for t in np.sctypeDict.values()})
    return found


# Built into HistoryBuffer (registered by its __init__, so absent before the first instance).
_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_method(owner: type, name: str) -> Callable:
    """Stand-in for ``getattr`` that only resolves ``HistoryBuffer``'s statistics methods.

    ``HistoryBuffer.__getstate__`` stores its statistics methods (``HistoryBuffer.min``,
    ``.max``, ``.current``, ``.mean`` and any registered ones); pickle writes each of these
    functions as ``getattr(HistoryBuffer, 'min')``. Allow-listing the real ``getattr`` would
    let a checkpoint reach any attribute of any allowed object, so the pickled ``getattr`` is
    mapped to this function, which resolves nothing else.
    """
    from mmengine.logging import HistoryBuffer

    methods = {m: getattr(HistoryBuffer, m) for m in _HISTORY_BUFFER_STATISTICS}
    methods.update(HistoryBuffer._statistics_methods)  # custom ones registered by the user
    method = methods.get(name) if owner is HistoryBuffer else None
    if method is None or not callable(method):
        raise pickle.UnpicklingError(
            f'Refusing getattr({owner!r}, {name!r}) in a checkpoint: only the statistics methods '
            f'of mmengine HistoryBuffer ({sorted(methods)}) may be '
            'looked up by attribute'
        )
    return method


def safe_globals() -> list:
    """Every global that mmengine Runner checkpoints need besides tensors and containers."""
    from mmengine.logging import HistoryBuffer

    getattr_names = ('__builtin__.getattr', 'builtins.getattr')  # pickle protocol 2 / >= 3
    return [
        HistoryBuffer,
        *((_history_buffer_method, name) for name in getattr_names),
        *_numpy_globals(),
    ]


def register_safe_globals() -> None:
    """Allow-list the types of :func:`safe_globals` for ``torch.load(weights_only=True)``.

    Idempotent; a no-op on torch versions without ``torch.serialization.add_safe_globals``.
    """
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is not None:
        add(safe_globals())
