"""The configs and tools that ship with the package, and ``mlla_mm::`` config inheritance.

An installed wheel holds ``configs/`` and ``tools/`` as ``mlla_mm/.mim/configs`` and
``mlla_mm/.mim/tools`` (OpenMMLab's mim layout; an editable install links them to the checkout).
In a checkout that was never installed they are found next to the package.

``import mlla_mm`` lets a config inherit a shipped config by name, from anywhere::

    _base_ = 'mlla_mm::mask_rcnn_mlla_t.py'        # or 'mlla_mm::toy/mask_rcnn_mlla_t_toy.py'

mmengine 0.10 resolves ``pkg::`` only for the OpenMMLab packages in its fixed table
(``mmengine.config.utils.MODULE2PACKAGE``) and only for ``pkg::folder/file.py``, looking for the
package's site-packages folder (wrong for editable installs). :func:`register_config_prefix` wraps
``Config._get_cfg_path`` so that exactly the ``mlla_mm::`` prefix resolves to a file of
:func:`config_dir`; every other path goes to mmengine unchanged. The base keeps no ``_scope_`` of
its own, so it behaves as if inherited by file path (its mmdet/mmseg/mmpretrain bases keep
theirs). Limit: the prefix works only once ``mlla_mm`` is imported before the config is read,
which our tools, the ``mlla-*`` commands and ``import mlla_mm`` do, but mmdet's or mmseg's own
``tools/train.py`` do not (use ``mlla-train`` / ``mlla-test`` for such configs).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

__all__ = [
    'PACKAGE_DIR',
    'PREFIX',
    'check_tool_checkout',
    'config_dir',
    'config_path',
    'list_configs',
    'register_config_prefix',
    'tools_dir',
    'write_user_config',
]

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # mlla_mm/
PREFIX = 'mlla_mm::'


def _shipped(name: str) -> Path:
    """``mlla_mm/.mim/<name>``, else ``<checkout>/<name>`` when the package sits in a checkout."""
    mim = PACKAGE_DIR / '.mim' / name
    if mim.is_dir():
        return mim
    checkout = PACKAGE_DIR.parent
    if (checkout / 'setup.py').is_file() and (checkout / name).is_dir():
        return checkout / name
    raise FileNotFoundError(
        f'mlla_mm has no {name}/ folder: neither {mim} nor a checkout next to {PACKAGE_DIR} '
        f'exists. Reinstall the package (pip install mlla_mm, or pip install -e . in a checkout).'
    )


def config_dir() -> Path:
    """The folder of the shipped configs (``mlla_mm/.mim/configs`` or the checkout's ``configs``).

    Raises:
        FileNotFoundError: neither exists (a broken install).
    """
    return _shipped('configs')


def tools_dir() -> Path:
    """The folder of the shipped tools (``mlla_mm/.mim/tools`` or the checkout's ``tools``).

    Raises:
        FileNotFoundError: neither exists (a broken install).
    """
    return _shipped('tools')


def list_configs() -> list[str]:
    """Names of the shipped configs relative to :func:`config_dir`, e.g. ``toy/...py``."""
    root = config_dir()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob('*.py'))


def config_path(name: str) -> Path:
    """The absolute path of a shipped config.

    Args:
        name (str): ``'mask_rcnn_mlla_t.py'``, ``'mlla_mm::mask_rcnn_mlla_t.py'``,
            ``'toy/mask_rcnn_mlla_t_toy.py'``; the ``.py`` may be left out.

    Returns:
        Path: the config file inside :func:`config_dir`.

    Raises:
        FileNotFoundError: no such config; the message lists the shipped ones.
    """
    rel = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    root = config_dir()
    for candidate in (rel, f'{rel}.py'):
        path = (root / candidate).resolve()
        if path.is_file() and path.suffix == '.py' and root.resolve() in path.parents:
            return Path(os.path.normpath(root / candidate))
    raise FileNotFoundError(
        f'mlla_mm ships no config {name!r} (looked in {root}). Shipped configs: '
        f'{", ".join(list_configs())}'
    )


def write_user_config(name: str, out: str | os.PathLike) -> tuple[Path, str]:
    """Write a config that inherits the shipped config ``name`` by name (``mlla_mm::NAME``).

    A shipped config copied out of the package keeps its relative ``_base_`` (e.g.
    ``'../mask_rcnn_mlla_t.py'``) and cannot load elsewhere; this one loads from any folder
    (``mlla-configs NAME --new FILE``).

    Args:
        name: A shipped config, as :func:`config_path` takes it.
        out: The file to write; an existing file is not overwritten.

    Returns:
        tuple[Path, str]: The file written and the ``mlla_mm::`` name it inherits.

    Raises:
        FileNotFoundError: ``name`` is not a shipped config (the shipped ones are listed).
        FileExistsError: ``out`` exists.
    """
    base = config_path(name).relative_to(config_dir()).as_posix()
    out = Path(out)
    if out.exists():
        raise FileExistsError(f'{out} exists; give another file name (nothing was written)')
    text = (
        f"# {out.name}: your config, inheriting mlla_mm's shipped {base} by name:\n"
        '# it loads from any folder with the mlla-* commands, the tools of a checkout, or in\n'
        f"# Python after `import mlla_mm` (`mlla-configs {base[:-3]}` prints the base's path).\n"
        '# Write below only what you change, e.g.\n'
        "#   train_dataloader = dict(dataset=dict(data_root='data/my_data/'))\n"
        f"_base_ = '{PREFIX}{base}'\n"
    )
    out.write_text(text, encoding='utf-8')
    return out, f'{PREFIX}{base}'


def _resolve_prefixed(get_cfg_path):
    """Wrap mmengine's ``Config._get_cfg_path`` so ``mlla_mm::NAME`` means :func:`config_path`."""

    @functools.wraps(get_cfg_path)
    def _get_cfg_path(cfg_path: str, filename: str):
        if cfg_path.startswith(PREFIX):
            # scope None: the base behaves as if inherited by its file path.
            return str(config_path(cfg_path)), None
        return get_cfg_path(cfg_path, filename)

    _get_cfg_path.mlla_mm_prefix = True
    return _get_cfg_path


def register_config_prefix() -> bool:
    """Let ``_base_ = 'mlla_mm::NAME'`` resolve in configs read after this call (idempotent).

    ``import mlla_mm`` calls it. Paths without the ``mlla_mm::`` prefix resolve as before.

    Returns:
        bool: whether the prefix is active (False if mmengine lacks ``Config._get_cfg_path``).
    """
    from mmengine.config import Config

    current = Config.__dict__.get('_get_cfg_path')
    func = getattr(current, '__func__', None)
    if func is None:
        return False
    if not getattr(func, 'mlla_mm_prefix', False):
        Config._get_cfg_path = staticmethod(_resolve_prefixed(func))
    return True


def check_tool_checkout() -> None:
    """Fail clearly when a script in a checkout's ``tools/`` imported another copy of mlla_mm.

    ``python tools/train.py`` puts ``tools/`` (not the checkout) on ``sys.path``, so ``import
    mlla_mm`` finds whatever is installed, which may be another checkout or an older wheel.
    This runs at ``import mlla_mm`` and raises instead of silently running other code.

    Raises:
        ImportError: the running script is in ``<checkout>/tools/`` and ``<checkout>/mlla_mm``
            is not this package; the message says how to install the checkout.
    """
    script = getattr(sys.modules.get('__main__'), '__file__', None)
    if not script:
        return
    folder = os.path.dirname(os.path.realpath(script))
    while os.path.basename(folder) != 'tools':
        parent = os.path.dirname(folder)
        if parent == folder:
            return
        folder = parent
    checkout = os.path.dirname(folder)
    package = os.path.join(checkout, 'mlla_mm')
    if not (
        os.path.isfile(os.path.join(package, '__init__.py'))
        and os.path.isfile(os.path.join(checkout, 'setup.py'))
    ):
        return
    if os.path.realpath(package) != str(PACKAGE_DIR):
        raise ImportError(
            f'{script} belongs to the checkout {checkout}, but Python imported mlla_mm from '
            f'{PACKAGE_DIR}. Install the checkout (pip install -e {checkout}), or run the '
            f'installed commands (mlla-train, mlla-test, ...) instead of the checkout tools.'
        )
