"""Deprecated: moved to mlla_mm.datasets.toy_coco; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

__getattr__ = moved('mlla_mm.toy_coco', 'mlla_mm.datasets.toy_coco')
from mlla_mm.datasets.toy_coco import *  # noqa: E402,F401,F403

if __name__ == '__main__':  # python -m mlla_mm.toy_coco [DIR]: as mlla-make-toy coco
    import sys

    from mlla_mm.datasets.toy_coco import main

    main(sys.argv[1:], prog='python -m mlla_mm.toy_coco')
