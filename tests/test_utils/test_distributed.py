"""How a distributed tool run starts on the CPU and ends (mlla_mm.utils.distributed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

pytest.importorskip('mmdet')

from mlla_mm.utils.errors import ConfigCheckError  # noqa: E402

ROOT = Path(__file__).parents[2]
TOY = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'


_RANK_SCRIPT = """
import atexit, sys
import torch, torch.distributed as dist
from mlla_mm.utils.distributed import end_distributed_process
t = torch.ones(3)
if sys.argv[2] == 'distributed':
    dist.init_process_group('gloo', init_method=f'file://{sys.argv[3]}', rank=0, world_size=1)
    dist.all_reduce(t)
atexit.register(lambda: open(sys.argv[1], 'w').write('exit handlers ran'))
print('sum', float(t.sum()), end='')  # no newline: the flush at the end must send it
end_distributed_process()
raise SystemExit(3)  # reached only outside a distributed run
"""


@pytest.mark.parametrize('run', ['distributed', 'single'])
def test_a_finished_rank_runs_its_exit_handlers_and_leaves_with_status_0(tmp_path, run):
    """A distributed tool run ends in end_distributed_process once its work is done: exit
    handlers run (log files), the console is flushed, and the process group's teardown and the
    interpreter's finalisation, where gloo's threads could abort a finished rank (SIGABRT), are
    skipped. Outside a distributed run (or a tool's main() called in-process) it does nothing."""
    marker = tmp_path / 'atexit.txt'
    proc = subprocess.run(
        [sys.executable, '-c', _RANK_SCRIPT, str(marker), run, str(tmp_path / 'store')],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == (0 if run == 'distributed' else 3), proc.stderr[-3000:]
    assert proc.stdout == 'sum 3.0'
    assert marker.read_text() == 'exit handlers ran'


def test_cpu_launcher_other_than_pytorch_is_refused_even_with_a_console_without_file(monkeypatch):
    """``--launcher slurm|mpi`` needs CUDA on this path, and says so; turning on faulthandler for
    distributed runs must not fail first where stderr has no file (a notebook, a capture)."""
    import io

    from mlla_mm.utils.distributed import setup_cpu_distributed

    if torch.cuda.is_available():
        pytest.skip('with CUDA mmengine starts the process group')
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    with pytest.raises(
        ConfigCheckError, match='--launcher slurm needs CUDA here.*--launcher pytorch'
    ):
        setup_cpu_distributed(Config(), 'slurm')
