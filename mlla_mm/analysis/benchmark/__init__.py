"""Latency and memory of MLLA backbones against peer backbones."""

from .run import *  # noqa: F401,F403
from .run import __all__  # noqa: F401
