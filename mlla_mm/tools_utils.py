"""Deprecated: split into the modules of :mod:`mlla_mm.utils`; this path works until mlla_mm 0.2."""

from mlla_mm._deprecated import moved

_MODULES = [
    f'mlla_mm.utils.{name}'
    for name in (
        'config_check',
        'checkpoint_check',
        'command_line',
        'console',
        'distributed',
        'errors',
        'run_config',
        'scope',
    )
]
__getattr__ = moved('mlla_mm.tools_utils', *_MODULES)
from mlla_mm.utils.checkpoint_check import *  # noqa: E402,F401,F403
from mlla_mm.utils.command_line import *  # noqa: E402,F401,F403
from mlla_mm.utils.config_check import *  # noqa: E402,F401,F403
from mlla_mm.utils.console import *  # noqa: E402,F401,F403
from mlla_mm.utils.distributed import *  # noqa: E402,F401,F403
from mlla_mm.utils.errors import *  # noqa: E402,F401,F403
from mlla_mm.utils.run_config import *  # noqa: E402,F401,F403
from mlla_mm.utils.scope import *  # noqa: E402,F401,F403
