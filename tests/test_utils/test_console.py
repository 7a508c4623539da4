"""What a tool run shows on the console (mlla_mm.utils.console)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip('mmdet')

from mlla_mm.utils.console import ConsoleFilter, quiet_console  # noqa: E402

ROOT = Path(__file__).parents[2]
TOY = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'


def test_console_filter_keeps_details_in_the_log_file(tmp_path):
    import io
    import logging

    logger = logging.getLogger('mlla_mm_test_console_filter')
    logger.setLevel(logging.INFO)
    console, log_file = io.StringIO(), tmp_path / 'run.log'
    logger.handlers = [logging.StreamHandler(console), logging.FileHandler(log_file)]
    quiet_console(logger)
    quiet_console(logger)  # idempotent
    logger.info('Config:\nmodel = dict(...)')
    logger.info('paramwise_options -- backbone.norm0.weight:weight_decay=0.0')
    logger.info('Iter(train) [10/250]  lr: 2.0e-04  loss: 1.2')
    logger.warning('Config: a warning always shows')
    for h in logger.handlers:
        h.flush()
    shown = console.getvalue().splitlines()
    assert shown == [
        'Iter(train) [10/250]  lr: 2.0e-04  loss: 1.2',
        'Config: a warning always shows',
    ]
    kept = log_file.read_text()
    assert 'model = dict' in kept and 'paramwise_options' in kept
    assert sum(isinstance(f, ConsoleFilter) for f in logger.handlers[0].filters) == 1
