"""The machine a benchmark ran on: CPU, flags, load, huge pages, the oneDNN kernels used."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable
from types import ModuleType

import torch

from .config import BenchConfig

__all__ = [
    'backbone_ops',
    'keep_freed_memory',
    'CPU_FLAGS_OF_INTEREST',
    'HUGE_PAGES_TUNABLE',
    'THP_FILE',
    'huge_pages',
    'onednn_kernels',
]


def backbone_ops() -> ModuleType | None:
    """The backbone's module of CPU operator capabilities (``CAPS``, ``keep_freed_memory``).

    ``mlla_mm.models.backbones.mlla_ops``, or the module it moved to; None if neither exists
    (the benchmark then reports no capabilities and skips ``keep_freed_memory``).
    """
    for name in ('mlla_ops', 'fast_path'):
        try:
            return importlib.import_module(f'mlla_mm.models.backbones.{name}')
        except ImportError:
            continue
    return None


def keep_freed_memory() -> bool:
    """Apply the backbone's ``keep_freed_memory`` (glibc keeps freed memory) if it has one.

    Returns:
        bool: Whether it was applied.
    """
    apply = getattr(backbone_ops(), 'keep_freed_memory', None)
    return bool(apply()) if callable(apply) else False


def _environment(cfg: BenchConfig, device: torch.device) -> dict:
    env = {
        'torch': torch.__version__,
        'python': platform.python_version(),
        'machine': platform.machine(),
        'processor': _cpu_name(),
        'cpu_count': os.cpu_count(),
        'threads': torch.get_num_threads(),
        'device': str(device),
        'command': ' '.join(sys.argv),
        'time': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
    else:
        from mlla_mm.models.backbones.cpu_kernels import cpu_flags

        env['cpu_flags'] = sorted(cpu_flags() & CPU_FLAGS_OF_INTEREST)
        caps = getattr(backbone_ops(), 'CAPS', None)
        if caps is not None and hasattr(caps, 'describe'):
            env['cpu_capabilities'] = caps.describe()
        env['huge_pages'] = huge_pages()
    return env


HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'


THP_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def huge_pages(environ: dict | None = None, thp_file: str = THP_FILE) -> dict:
    """Whether large allocations get transparent huge pages (2 MiB: one page fault and one TLB
    entry where 4 KiB pages take 512).

    Args:
        environ: The environment to read (default: this process's).
        thp_file: The kernel's transparent-huge-page mode file.

    Returns:
        dict: ``thp``, the kernel's mode (``always``, ``madvise``, ``never``, or None where
        unknown); ``malloc``, whether glibc's malloc asks for them (``GLIBC_TUNABLES`` holds
        ``glibc.malloc.hugetlb=1``; glibc >= 2.35 reads it at process start); ``on``, whether
        they are in use (``always``, or ``madvise`` with the malloc setting).
    """
    environ = os.environ if environ is None else environ
    tunables = environ.get('GLIBC_TUNABLES', '').split(':')
    thp = None
    with contextlib.suppress(OSError), open(thp_file) as f:
        thp = next((w[1:-1] for w in f.read().split() if w.startswith('[')), None)
    malloc = HUGE_PAGES_TUNABLE in tunables
    return {'thp': thp, 'malloc': malloc, 'on': thp == 'always' or (thp == 'madvise' and malloc)}


CPU_FLAGS_OF_INTEREST = {
    'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16',
    'amx_bf16', 'amx_int8', 'amx_tile',
}  # fmt: skip


def onednn_kernels(step: Callable, x: torch.Tensor) -> dict:
    """Which oneDNN kernels ``step(x)`` runs: its ``ONEDNN_VERBOSE`` lines, parsed.

    Returns:
        dict: ``isa`` (oneDNN's line naming the instruction set it uses), ``kernels``
        (implementation name -> number of primitive executions, e.g. ``brg_matmul:avx512_core_amx``
        or ``jit:avx512_core_bf16``), and ``error`` where the verbose output could not be read.
    """
    import tempfile

    if not torch.backends.mkldnn.is_available():
        return {'isa': None, 'kernels': {}, 'error': 'oneDNN not available'}
    with tempfile.TemporaryFile(mode='w+b') as f:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)  # oneDNN prints from C to file descriptor 1
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                step(x)
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        lines = f.read().decode(errors='replace').splitlines()
    isa, kernels = None, {}
    for line in lines:
        parts = line.split(',')
        if 'isa:' in line and isa is None:
            isa = line.split('isa:', 1)[1].strip()
        elif len(parts) > 6 and parts[0] == 'onednn_verbose' and 'exec' in parts[1:4]:
            # onednn_verbose[,timestamp],primitive,exec,cpu,<kind>,<implementation>,...
            at = parts.index('exec')
            name = f'{parts[at + 2]}:{parts[at + 3]}'
            kernels[name] = kernels.get(name, 0) + 1
    return {'isa': isa, 'kernels': kernels}


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
