"""Distributed tool runs: CPU (gloo) process groups, launcher variables, and how a rank ends."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys

import torch
from mmengine.config import Config, ConfigDict

from mlla_mm.utils.errors import ConfigCheckError

__all__ = ['end_distributed_process', 'local_rank_env', 'setup_cpu_distributed']


def setup_cpu_distributed(cfg: Config, launcher: str) -> None:
    """Make ``--launcher pytorch`` work on machines without CUDA (gloo backend, CPU DDP).

    mmengine's launcher calls ``torch.cuda.set_device`` and wraps the model in DDP with
    ``device_ids=[LOCAL_RANK]``, both of which need a GPU. Without one we start PyTorch's
    ``env://`` process group (the variables ``torchrun`` sets) with gloo ourselves, and ask for DDP
    on the CPU (``device_ids=None``); mmengine's Runner then finds the process group initialised
    and runs as usual. With CUDA this does nothing.
    """
    if launcher == 'none':
        return
    with contextlib.suppress(ValueError, OSError, AttributeError):  # stderr without a file
        faulthandler.enable()  # a crashing rank prints its Python stack (torchrun: a signal)
    if torch.cuda.is_available():
        return
    import torch.distributed as dist

    dist_cfg = cfg.setdefault('env_cfg', ConfigDict()).setdefault('dist_cfg', ConfigDict())
    if dist_cfg.get('backend', 'gloo') != 'gloo':
        dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(type='MMDistributedDataParallel')
    wrapper.setdefault('device_ids', None)
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper
    if launcher != 'pytorch':
        raise ConfigCheckError(
            f'--launcher {launcher} needs CUDA here; on CPU-only machines use torchrun with '
            '--launcher pytorch (tools/dist_train.sh)'
        )
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo', init_method='env://')


def end_distributed_process() -> None:
    """End a distributed tool run's process once every rank is done (a no-op outside one).

    Called last in the tools' ``__main__`` block. The ranks meet at a barrier (none is still
    communicating), the exit handlers run (log files, data-loader workers), the console is
    flushed, and the process ends with ``os._exit(0)``, skipping the process group's teardown and
    the interpreter's finalisation: there gloo's threads, which outlive the Runner,
    intermittently aborted a finished rank (``terminate called without an active exception``,
    SIGABRT; seen in CI on rank 0 after ``tools/test.py`` had written every result, with and
    without an explicit ``destroy_process_group``), and torchrun reported the run as failed. The
    operating system closes the sockets.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    import atexit

    dist.barrier()
    atexit._run_exitfuncs()  # logging's shutdown (log files) is one of them
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def local_rank_env(local_rank: int | None) -> None:
    """Export ``LOCAL_RANK`` for launchers that pass ``--local_rank`` (torch.distributed.launch)."""
    if local_rank is not None and 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(local_rank)
