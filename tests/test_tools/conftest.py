"""Fixtures of the detection tool tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope='session')
def toy_coco(tmp_path_factory) -> Path:
    """A toy COCO set of 8 train and 4 val images (``tools/misc/make_toy_coco.py``'s layout)."""
    pytest.importorskip('mmdet')
    from mlla_mm.datasets.toy_coco import make_toy_coco

    root = tmp_path_factory.mktemp('toy_coco')
    make_toy_coco(root, num_train=8, num_val=4, seed=3)
    return root
