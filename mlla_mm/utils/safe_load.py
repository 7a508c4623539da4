"""Let ``torch.load(weights_only=True)`` read checkpoints written by mmengine's Runner.

From torch 2.6, ``torch.load`` defaults to ``weights_only=True``: only tensors, containers and
allow-listed types may be unpickled. mmengine 0.10.7 stores a ``HistoryBuffer`` per logged scalar
in the message hub and numpy arrays, scalars and dtypes in ``meta`` and the buffers, so its own
checkpoints no longer load. We allow-list exactly those types, and nothing callable: the safety of
``weights_only`` stays on, and a pickle that smuggles in an arbitrary callable is still refused.

It also checks checkpoint files before they are read (:func:`check_checkpoint_file`): a missing,
truncated or corrupt file, or one that is not a checkpoint at all, fails with one message naming
the file and the problem (:class:`CheckpointFileError`), wherever it is loaded from: the
backbone's ``init_cfg``, mmengine's ``load_checkpoint`` (tools, ``Runner``), the converter.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import zipfile
from typing import Callable

import numpy as np
import torch

__all__ = [
    'CheckpointFileError',
    'check_checkpoint_file',
    'register_checkpoint_check',
    'register_safe_globals',
    'safe_globals',
]


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt, or not a checkpoint."""


def _corrupt(path, detail: str) -> CheckpointFileError:
    return CheckpointFileError(
        f'Checkpoint {str(path)!r} is corrupt or truncated ({detail}); download or copy it '
        'again (an interrupted download or a full disk leaves such files)'
    )


def check_checkpoint_file(path, what: str = 'Checkpoint') -> None:
    """Fail early and clearly if ``path`` is not a readable PyTorch checkpoint file.

    A ``torch.save`` zip archive is checked entirely (its directory and the CRC of every
    member, one read of the file); a legacy pickle file by its first byte. Remote sources
    (``http://``, ``open-mmlab://`` ...) and non-path objects are left to their loaders.

    Args:
        path: The file.
        what: What the file is for, at the start of the message (e.g. ``'Pretrained checkpoint'``).

    Raises:
        FileNotFoundError: The file does not exist (the absolute path it resolved to is named).
        CheckpointFileError: It is empty, truncated, corrupt, or not a checkpoint.
    """
    if not isinstance(path, (str, os.PathLike)) or '://' in str(path):
        return
    if not os.path.isfile(path):
        where = '' if os.path.isabs(path) else f' (relative to {os.getcwd()})'
        raise FileNotFoundError(
            f'{what} {str(path)!r} does not exist{where}: give the path of an existing .pth file'
        )
    size = os.path.getsize(path)
    if size == 0:
        raise _corrupt(path, 'the file is empty')
    with open(path, 'rb') as f:
        head = f.read(4)
    if head[:1] == b'\x80':
        return  # legacy (non-zip) torch.save pickle: read errors are reported by the loaders
    if head[:2] != b'PK':
        raise CheckpointFileError(
            f'{what} {str(path)!r} is not a PyTorch checkpoint (neither a torch.save zip archive '
            'nor a pickle). Pass an official MLLA .pth, a file written by mmengine, or one '
            'converted with tools/model_converters/mlla2mm.py.'
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise _corrupt(path, f'the zip archive of torch.save is incomplete: {e}') from e
    if bad is not None:
        raise _corrupt(path, f'member {bad!r} fails its CRC check')


def _is_read_error(error: BaseException) -> bool:
    """Whether an exception of ``torch.load`` comes from unreadable bytes (not from safety)."""
    if isinstance(error, (EOFError, zipfile.BadZipFile, struct.error)):
        return True
    text = str(error)
    return any(
        s in text
        for s in ('truncated', 'PytorchStreamReader', 'invalid load key', 'unexpected EOF')
    )


@contextlib.contextmanager
def _reading(path):
    """Re-raise an error of unreadable bytes (a truncated legacy pickle) while loading ``path``
    as :class:`CheckpointFileError`; any other error as it is."""
    try:
        yield
    except Exception as e:
        if _is_read_error(e):
            raise _corrupt(path, f'{type(e).__name__}: {e}') from e
        raise


def load_file(path, map_location='cpu', what: str = 'Checkpoint'):
    """``torch.load(path, weights_only=True)`` after :func:`check_checkpoint_file`; unreadable
    bytes (a truncated legacy pickle) give :class:`CheckpointFileError` too."""
    check_checkpoint_file(path, what)
    with _reading(path):
        return torch.load(path, map_location=map_location, weights_only=True)


def register_checkpoint_check() -> None:
    """Check local files in mmengine's ``load_checkpoint`` with :func:`check_checkpoint_file`.

    mmengine's ``CheckpointLoader`` dispatches on the path's scheme; the local one (prefix
    ``''``) is replaced, through its ``register_scheme(force=True)`` extension point, by the same
    loader preceded by the check. Idempotent.
    """
    try:
        from mmengine.runner.checkpoint import CheckpointLoader
    except ImportError:  # pragma: no cover - mmengine without the runner
        return
    original = CheckpointLoader._schemes.get('')
    if original is None or getattr(original, 'checks_files', False):
        return

    def load_from_local(filename, map_location):
        path = filename[len('file://') :] if filename.startswith('file://') else filename
        check_checkpoint_file(os.path.expanduser(path))
        with _reading(filename):
            return original(filename, map_location)

    load_from_local.checks_files = True
    load_from_local.__doc__ = original.__doc__
    CheckpointLoader.register_scheme(prefixes='', force=True)(load_from_local)


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


def _empty_bytes(*args) -> bytes:
    """Stand-in for ``bytes`` that only makes ``b''``.

    ``torch.save`` pickles with protocol 2, which writes an empty ``bytes`` object as the call
    ``bytes()`` (non-empty ones go through ``_codecs.encode``, which torch allows). Numpy writes
    the data of an empty array (an empty ``HistoryBuffer`` in a Runner checkpoint) as such an
    empty ``bytes``. Allow-listing the real ``bytes`` would let a pickle call ``bytes(n)`` with
    any ``n``; this resolves the empty case only.
    """
    if args:
        raise pickle.UnpicklingError(
            f'Refusing bytes{args!r} in a checkpoint: only bytes() (an empty byte string) is '
            'allowed'
        )
    return b''


def safe_globals() -> list:
    """Every global that mmengine Runner checkpoints need besides tensors and containers."""
    from mmengine.logging import HistoryBuffer

    builtins_ = ('__builtin__', 'builtins')  # pickle protocol 2 / >= 3
    return [
        HistoryBuffer,
        *((_history_buffer_method, f'{module}.getattr') for module in builtins_),
        *((_empty_bytes, f'{module}.bytes') for module in builtins_),
        *_numpy_globals(),
    ]


def register_safe_globals() -> None:
    """Allow-list the types of :func:`safe_globals` for ``torch.load(weights_only=True)``.

    Idempotent; a no-op on torch versions without ``torch.serialization.add_safe_globals``.
    """
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is None:
        return
    allowed = safe_globals()
    add([g for g in allowed if not isinstance(g, tuple)])
    # the (function, 'module.name') form is newer than add_safe_globals itself (torch 2.4/2.5)
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        add([g for g in allowed if isinstance(g, tuple)])
