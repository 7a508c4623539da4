"""What a tool run shows on the console: progress, metrics and where the results are.

The details of a run (environment, whole config, hook order, parameter groups) and the
libraries' notes about their own internals go to the log file in the work dir only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os.path as osp
import warnings
from collections.abc import Iterator

from mmengine.config import Config

__all__ = [
    'ConsoleFilter',
    'build_runner',
    'prints_to_log_file',
    'quiet_console',
    'silence_library_warnings',
]


# Log records kept out of the console (they still go to the log file in the work dir): the
# environment report, the whole config, the hook order, and one line per parameter from the
# optimiser's paramwise settings (hundreds for MLLA-T).
_FILE_ONLY_PREFIXES = (
    '\n' + '-' * 60 + '\nSystem environment:',
    'Config:\n',
    'paramwise_options -- ',
    'Hooks will be executed in the following order',
    'Distributed training is not used, all SyncBatchNorm',
)

# Warnings of the installed libraries about their own internals, not about the run.
_FILE_ONLY_WARNINGS = (
    '"FileClient" will be deprecated',
    '"HardDiskBackend" is the alias of "LocalBackend"',
    'The prefix is not set in metric class',
)


class ConsoleFilter(logging.Filter):
    """Keep the details of a run (environment, config, hook order, paramwise lines) and the
    libraries' deprecation notes off the console.

    Other warnings and errors always pass; everything still reaches mmengine's log file.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if record.levelno >= logging.WARNING:
            return record.levelno >= logging.ERROR or not msg.startswith(_FILE_ONLY_WARNINGS)
        return not msg.startswith(_FILE_ONLY_PREFIXES)


class _LogFileStream(io.TextIOBase):
    """A text stream that writes into the file of a ``logging.FileHandler``."""

    def __init__(self, handler: logging.FileHandler) -> None:
        super().__init__()
        self.handler = handler

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.handler.acquire()
        try:
            if self.handler.stream is None:  # closed by the logger: nowhere to write
                return len(text)
            self.handler.stream.write(text)
        finally:
            self.handler.release()
        return len(text)

    def flush(self) -> None:
        self.handler.flush()


@contextlib.contextmanager
def prints_to_log_file(logger: logging.Logger, verbose: bool = False) -> Iterator[None]:
    """Send what libraries ``print`` during a run into the log file instead of the console.

    pycocotools prints its progress and a 12-line table per metric ("loading annotations into
    memory...", "Average Precision (AP) @[...]"); the metrics themselves reach the console
    through mmengine's log line. Logging is not affected: mmengine's console handler holds the
    real stdout.

    Args:
        logger: The runner's logger (its first file handler receives the output).
        verbose: Leave stdout alone.
    """
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    if verbose or not files:
        yield
        return
    with contextlib.redirect_stdout(_LogFileStream(files[0])):
        yield


def quiet_console(logger: logging.Logger) -> None:
    """Add :class:`ConsoleFilter` to the console handlers of ``logger`` (not its file handlers)."""
    for handler in logger.handlers:
        is_console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if is_console and not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter())


@functools.cache
def _quiet_runner_class() -> type:
    from mmengine.runner import Runner

    class QuietRunner(Runner):
        """mmengine's Runner whose console shows progress, metrics and where the results are."""

        def build_logger(self, log_level='INFO', log_file=None, **kwargs):
            logger = super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
            quiet_console(logger)
            path = log_file or osp.join(self._log_dir, f'{self.timestamp}.log')
            logger.info(f'Work dir: {self._work_dir}; full log (config, environment): {path}')
            return logger

    return QuietRunner


def build_runner(cfg: Config, verbose: bool = False):
    """Build the Runner the config asks for (``runner_type``) or mmengine's default.

    Args:
        cfg: The complete config.
        verbose: Also print the environment, the whole config and the paramwise settings to the
            console (they always go to the log file in the work dir).
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
        if not verbose:
            quiet_console(runner.logger)
        return runner
    return (Runner if verbose else _quiet_runner_class()).from_cfg(cfg)


def silence_library_warnings() -> None:
    """Hide warnings of the installed stack that say nothing about the user's run.

    setuptools >= 70 warns that ``pkg_resources`` is deprecated each time mmengine looks up an
    installed package with it (``mmdet::`` configs, scope checks): once per tool, or more.
    Warnings about the user's run itself are left alone.
    """
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
    # mmengine's visualizer, built without a save_dir by the image demo, and drawing a box or
    # mask outline that touches the image border (which it draws all the same)
    # mmseg 1.2's notes on its own API and defaults, printed for every model it builds
    for note in (
        'Failed to add <class',
        'Warning: The bbox is out of bounds',
        'Warning: The polygon is out of bounds',
        '``build_loss`` would be deprecated',
        'Default ``avg_non_ignore`` is False',
        'The draw is False',
        '`reduce_zero_label` will be deprecated',
    ):
        warnings.filterwarnings('ignore', message=note, category=UserWarning)
