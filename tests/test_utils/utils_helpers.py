"""Helpers of the tests of mlla_mm.utils (conftest.py is not a module to import from)."""

from __future__ import annotations

from pathlib import Path

from mmengine.config import Config

ROOT = Path(__file__).parents[2]
TOY = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'


def toy_cfg(root: Path) -> Config:
    """The toy config pointed at ``root``, as a user would with --cfg-options."""
    cfg = Config.fromfile(str(TOY))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = f'{root}/'
    for ev in ('val_evaluator', 'test_evaluator'):
        cfg[ev].ann_file = f'{root}/annotations/instances_val.json'
    return cfg
