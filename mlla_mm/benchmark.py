"""Deprecated: moved to mlla_mm.analysis.benchmark; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.benchmark', 'mlla_mm.analysis.benchmark')
from mlla_mm.analysis.benchmark import *  # noqa: E402,F401,F403

if __name__ == '__main__':
    from mlla_mm.analysis.benchmark.parts import _parts_main

    _parts_main()
