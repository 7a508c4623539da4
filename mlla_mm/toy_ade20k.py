"""Deprecated: moved to mlla_mm.datasets.toy_ade20k; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.toy_ade20k', 'mlla_mm.datasets.toy_ade20k')
from mlla_mm.datasets.toy_ade20k import *  # noqa: E402,F401,F403

if __name__ == '__main__':  # python -m mlla_mm.toy_ade20k [DIR]: as mlla-make-toy ade20k
    import sys

    from mlla_mm.datasets.toy_ade20k import main

    main(sys.argv[1:], prog='python -m mlla_mm.toy_ade20k')
