"""Fixtures of the tests of mlla_mm.utils: a tiny toy COCO set."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope='module')
def toy_root(tmp_path_factory) -> Path:
    pytest.importorskip('mmdet')
    from mlla_mm.datasets.toy_coco import make_toy_coco

    root = tmp_path_factory.mktemp('toy')
    make_toy_coco(root, num_train=2, num_val=2, size=64)
    return root
