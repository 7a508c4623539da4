"""Reading configs (mlla_mm.utils.config_loader): ``mlla_mm::NAME`` everywhere, and one-line
messages for a library the config needs that is missing and for a setuptools without
pkg_resources."""

from __future__ import annotations

from pathlib import Path

import pytest
from mmengine.config import Config

from mlla_mm.utils import config_loader
from mlla_mm.utils.config_loader import load_config, resolve_config_path
from mlla_mm.utils.errors import ConfigCheckError

ROOT = Path(__file__).parents[2]


def test_shipped_names_and_files_and_overrides():
    path = resolve_config_path('mlla_mm::toy/mask_rcnn_mlla_t_toy.py')
    assert Path(path).resolve() == ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'
    assert resolve_config_path('mlla_mm::toy/mask_rcnn_mlla_t_toy') == path
    cfg = load_config('mlla_mm::mask_rcnn_mlla_t.py', {'model.backbone.drop_path_rate': 0.0})
    assert cfg.model.backbone.type == 'mlla_mm.MLLA' and cfg.model.backbone.drop_path_rate == 0
    copy = load_config(cfg, {'model.backbone.arch': 'small'})
    assert copy.model.backbone.arch == 'small' and cfg.model.backbone.arch == 'tiny'
    with pytest.raises(ConfigCheckError, match='ships no config.*Shipped configs'):
        load_config('mlla_mm::nope.py')
    with pytest.raises(FileNotFoundError, match="config 'nope.py' does not exist"):
        load_config('nope.py')


@pytest.mark.parametrize(
    'error, message',
    [
        (
            ModuleNotFoundError("No module named 'pkg_resources'", name='pkg_resources'),
            'mlla_mm needs pkg_resources .*`pip install "setuptools<82"`',
        ),
        (
            ModuleNotFoundError('mmsegmentation is not installed, please install mmsegmentation'),
            r'mlla_mm needs mmseg for the config .*install it with `pip install .*\[seg\]',
        ),
    ],
)
def test_stack_failures_while_reading_become_one_line(monkeypatch, error, message):
    """What a fresh install met: setuptools 82+ (no pkg_resources) under mmengine, or a
    ``_base_ = 'mmseg::...'`` config without mmseg: one line naming the fix, not a traceback."""

    def fromfile(path):
        raise error

    monkeypatch.setattr(Config, 'fromfile', staticmethod(fromfile))
    with pytest.raises(ImportError, match=message) as err:
        config_loader.load_config(str(ROOT / 'configs' / 'upernet_mlla_t.py'))
    assert '\n' not in str(err.value)
