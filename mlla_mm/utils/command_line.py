"""What every tool's command line shares: ``--threads``, ``--verbose``, ``--debug``, and how
user errors end a tool (one line on stderr, exit status 2)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

from mlla_mm.utils.errors import ConfigCheckError, InputError
from mlla_mm.utils.safe_load import CheckpointFileError

__all__ = ['DEFAULT_THREADS', 'USER_ERRORS', 'add_common_args', 'setup_threads', 'user_errors']


# Intra-op threads of the tools unless --threads or OMP_NUM_THREADS says otherwise. Chosen by
# measurement (docs/performance.md, "Threads of the tools"): on 2 cores busy with other jobs a
# toy training iteration took 2-4.5 times longer with 2 threads than with 1 (OpenMP threads
# wait for each other at every operator, and a thread without a free core stalls them all),
# while on an idle machine 2 threads gain at most their number (1.85x for MLLA-T inference at
# 1280x800). One thread is never far from the best and never a disaster.
DEFAULT_THREADS = 1


def setup_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, else OMP_NUM_THREADS's (torch reads it at
    start), else :data:`DEFAULT_THREADS`.

    Returns:
        int: The number of threads in use.
    """
    if threads is not None:
        if threads < 1:
            raise ConfigCheckError(f'--threads {threads}: give a number of threads >= 1')
        torch.set_num_threads(threads)
    elif not os.environ.get('OMP_NUM_THREADS'):
        torch.set_num_threads(DEFAULT_THREADS)
    return torch.get_num_threads()


def add_common_args(parser) -> None:
    """The flags every tool shares: ``--threads``, ``--verbose`` and ``--debug``."""
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help=f'CPU threads (default: OMP_NUM_THREADS if set, else {DEFAULT_THREADS})',
    )
    parser.add_argument(
        '--verbose',
        action='store_true',
        help='also print the environment, the whole config and the parameter groups (they are '
        'always in the log file of the work dir)',
    )
    parser.add_argument(
        '--debug',
        action='store_true',
        help='show the traceback of an error (also with MLLA_MM_DEBUG=1)',
    )


# Errors whose message is meant for the user: printed as they are, without a traceback.
USER_ERRORS = (ConfigCheckError, InputError, CheckpointFileError, FileNotFoundError, ImportError)


@contextlib.contextmanager
def user_errors(tool: str | None = None, debug: bool = False) -> Iterator[None]:
    """Turn the package's user-facing errors into a message and exit status 2, no traceback.

    Any other exception (a bug) keeps its traceback. With ``debug`` (or ``MLLA_MM_DEBUG=1``)
    every error keeps its traceback.

    Args:
        tool: What to name in the message; by default the command as it was run
            (``sys.argv[0]``: ``tools/test.py``, or ``mlla-test`` for the installed command).
        debug: Re-raise instead.
    """
    try:
        yield
    except USER_ERRORS as e:
        if debug or os.environ.get('MLLA_MM_DEBUG', '') not in ('', '0'):
            raise
        if isinstance(e, ImportError) and not str(e).startswith('mlla_mm needs'):
            raise  # not a missing optional library (mlla_mm.utils.require): a broken install
        print(f'{tool or sys.argv[0]}: error: {str(e) or type(e).__name__}', file=sys.stderr)
        raise SystemExit(2) from None
