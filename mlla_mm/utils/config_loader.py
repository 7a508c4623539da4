"""Reading a config: a file, a shipped ``mlla_mm::NAME`` or a ``Config``; and ``--cfg-options``.

Every place that takes a config (the tools, :class:`mlla_mm.MLLAInferencer`, the FLOPs counter,
the ONNX export, the benchmark) reads it through :func:`load_config`, so ``mlla_mm::NAME`` works
everywhere and the stack's failures while reading a config become one-line messages naming the
fix: a missing OpenMMLab library (``_base_ = 'mmdet::...'`` without mmdet), and a setuptools
without ``pkg_resources`` (which mmengine needs to find installed packages' configs).
"""

from __future__ import annotations

import copy
import os
import os.path as osp
import re

from mmengine.config import Config

from mlla_mm.utils.dependencies import DISTRIBUTIONS, missing_message
from mlla_mm.utils.errors import ConfigCheckError
from mlla_mm.utils.paths import shown
from mlla_mm.utils.resources import PREFIX, config_path, list_configs

__all__ = ['SETUPTOOLS_PIN', 'load_config', 'resolve_config_path']

# mmengine 0.10 looks up installed packages with pkg_resources, which setuptools 82 removed.
SETUPTOOLS_PIN = 'setuptools<82'
_NOT_INSTALLED = re.compile(r'^(\S+) is not installed')


def resolve_config_path(config: str | os.PathLike) -> str:
    """The file of a config given as a path or as ``mlla_mm::NAME`` (a shipped config).

    Args:
        config: A config file, or ``mlla_mm::NAME`` (``.py`` optional), e.g.
            ``'mlla_mm::toy/mask_rcnn_mlla_t_toy.py'``.

    Returns:
        str: The path of the config file.

    Raises:
        ConfigCheckError: An unknown ``mlla_mm::`` name (the message lists the shipped configs).
        FileNotFoundError: A config file that does not exist.
    """
    path = os.fspath(config)
    if path.startswith(PREFIX):
        try:
            return str(config_path(path))
        except FileNotFoundError as e:
            raise ConfigCheckError(str(e)) from None
    if not osp.isfile(path):
        shown = '' if osp.isabs(path) else f' (looked for {osp.abspath(path)})'
        raise FileNotFoundError(f'config {path!r} does not exist{shown}')
    return path


def load_config(config: str | os.PathLike | Config, cfg_options: dict | None = None) -> Config:
    """Read a config and apply overrides.

    Args:
        config: A config file, ``mlla_mm::NAME``, or a ``Config`` (copied, not modified).
        cfg_options: Overrides as ``--cfg-options`` gives them (``{'a.b': value}``).

    Returns:
        Config: The loaded config.

    Raises:
        ConfigCheckError: An unknown ``mlla_mm::`` name, or a ``_base_`` file that does not
            exist (e.g. a shipped config copied elsewhere: the message names
            ``mlla-configs NAME --new FILE``).
        FileNotFoundError: A config file that does not exist.
        ImportError: A library the config inherits from is not installed, or setuptools lacks
            ``pkg_resources``; one line starting with ``mlla_mm needs``, naming the fix.
    """
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    else:
        path = resolve_config_path(config)
        try:
            cfg = Config.fromfile(path)
        except ImportError as e:
            raise ImportError(_import_problem(e, path)) from e
        except FileNotFoundError as e:
            if e.filename and osp.abspath(e.filename) != osp.abspath(path):
                raise ConfigCheckError(_missing_base(path, e.filename)) from e
            raise
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def _missing_base(path: str, base: str) -> str:
    """The one-line message for a ``_base_`` of ``path`` that does not exist."""
    base = osp.normpath(base)
    shipped = [n for n in list_configs() if osp.basename(n) == osp.basename(path)]
    name = shipped[0][:-3] if shipped else 'NAME'
    copied = f' (a copy of the shipped {shipped[0]}?)' if shipped else ''
    return (
        f'config {path} inherits {shown(base)}, which does not exist{copied}; a shipped config '
        'copied out of the package keeps its relative _base_, so write your config with '
        f'`mlla-configs {name} --new my_config.py` instead (it inherits '
        f"_base_ = '{PREFIX}{name}.py' by name, from any folder), or fix the _base_ path"
    )


def _import_problem(error: ImportError, path: str) -> str:
    """The one-line message for an ImportError raised while mmengine reads ``path``."""
    if error.name == 'pkg_resources':
        return (
            f'mlla_mm needs pkg_resources to read {path} (mmengine finds the configs of '
            f'installed packages with it), and setuptools >= 82 no longer has it; install '
            f'it with `pip install "{SETUPTOOLS_PIN}"`'
        )
    match = _NOT_INSTALLED.match(str(error))
    package = DISTRIBUTIONS.get(match.group(1), match.group(1)) if match else error.name
    if package:
        return missing_message(package.split('.')[0], f'the config {path}')
    return f'mlla_mm needs a library to read {path} that is not importable: {error}'
