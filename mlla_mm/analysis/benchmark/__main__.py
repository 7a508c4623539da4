"""``python -m mlla_mm.analysis.benchmark``: per-part times of an MLLA backbone."""

from .parts import _parts_main

_parts_main()
