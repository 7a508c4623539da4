"""``python -m mlla_mm.datasets {coco,ade20k} [DIR]``: as ``mlla-make-toy``."""

from .make_toy import main

main(prog='python -m mlla_mm.datasets')
