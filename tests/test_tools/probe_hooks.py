"""A hook the tool tests load into ``tools/train.py`` runs to observe them from outside.

Imported by the runs through ``custom_imports`` (the tests put this folder on ``PYTHONPATH``).
"""

from __future__ import annotations

import os.path as osp
import time

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class StateProbeHook(Hook):
    """Save the state a run starts from and ends with; optionally stall at one iteration.

    ``before_train`` runs after the Runner has loaded or resumed a checkpoint, so
    ``start_rank{r}.pth`` holds what training really continues from: the iteration counter, the
    model, the optimiser and the parameter schedulers. ``end_rank{r}.pth`` holds the same after
    the last iteration, one file per process.

    Args:
        out_dir: Folder for the files.
        stall_at_iter: After this (1-based) iteration, write ``stalled`` into ``out_dir`` and
            sleep, so that a test can kill the process at a known point.
    """

    priority = 'LOWEST'  # after the CheckpointHook of the same iteration

    def __init__(self, out_dir: str, stall_at_iter: int | None = None) -> None:
        self.out_dir = out_dir
        self.stall_at_iter = stall_at_iter

    def before_train(self, runner) -> None:
        self._dump(runner, 'start')

    def after_train(self, runner) -> None:
        self._dump(runner, 'end')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.stall_at_iter is not None and runner.iter + 1 == self.stall_at_iter:
            with open(osp.join(self.out_dir, 'stalled'), 'w') as f:
                f.write(str(runner.iter + 1))
            time.sleep(600)

    def _dump(self, runner, tag: str) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        schedulers = runner.param_schedulers or []
        state = dict(
            iter=runner.iter,
            params={k: v.detach().clone() for k, v in model.named_parameters()},
            optimizer=runner.optim_wrapper.state_dict(),
            param_schedulers=[s.state_dict() for s in schedulers],
        )
        torch.save(state, osp.join(self.out_dir, f'{tag}_rank{get_rank()}.pth'))
