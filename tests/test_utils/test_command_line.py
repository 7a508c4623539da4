"""Threads and user errors of the tools (mlla_mm.utils.command_line)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip('mmdet')

from mlla_mm.utils.command_line import DEFAULT_THREADS, setup_threads, user_errors  # noqa: E402
from mlla_mm.utils.errors import ConfigCheckError  # noqa: E402

ROOT = Path(__file__).parents[2]
TOY = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'


def test_setup_threads(monkeypatch):

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
        torch.set_num_threads(2)
        assert setup_threads(None) == DEFAULT_THREADS == 1  # the documented default
        assert setup_threads(2) == 2
        monkeypatch.setenv('OMP_NUM_THREADS', '1')
        torch.set_num_threads(2)
        assert setup_threads(None) == 2  # OMP_NUM_THREADS set: torch's own setting is kept
        with pytest.raises(ConfigCheckError, match='--threads 0'):
            setup_threads(0)
    finally:
        torch.set_num_threads(before)


def test_user_errors_print_one_message_and_exit_2(capsys, monkeypatch):
    from mlla_mm.utils.safe_load import CheckpointFileError

    monkeypatch.delenv('MLLA_MM_DEBUG', raising=False)
    for error in (
        ConfigCheckError(['first problem', 'second problem']),
        CheckpointFileError("Checkpoint 'x.pth' is corrupt or truncated"),
        FileNotFoundError("image 'a.png' does not exist"),
    ):
        with pytest.raises(SystemExit) as stop, user_errors('tools/x.py'):
            raise error
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith('tools/x.py: error: ') and 'Traceback' not in err
    with pytest.raises(ConfigCheckError), user_errors('tools/x.py', debug=True):
        raise ConfigCheckError('shown with its traceback')
    monkeypatch.setenv('MLLA_MM_DEBUG', '1')
    with pytest.raises(ConfigCheckError), user_errors('tools/x.py'):
        raise ConfigCheckError('shown with its traceback')
    with pytest.raises(RuntimeError), user_errors('tools/x.py'):
        raise RuntimeError('a bug keeps its traceback')
