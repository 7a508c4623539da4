"""Latency and memory of MLLA backbones against peer backbones (``tools/benchmark.py``).

* :mod:`~.config`: what a run measures (:class:`BenchConfig`);
* :mod:`~.peers`: the models compared;
* :mod:`~.measure`: timing and memory helpers;
* :mod:`~.environment`: the machine (CPU, flags, load, huge pages, oneDNN kernels);
* :mod:`~.run`: the interleaved run (:func:`run_benchmark`);
* :mod:`~.report`: summary, scaling, JSON/CSV/plot;
* :mod:`~.parts`: per-part times of one backbone (``python -m mlla_mm.analysis.benchmark``).
"""

from .config import DEFAULT_SIZES, DTYPES, MODEL_DTYPES, BenchConfig
from .environment import (
    CPU_FLAGS_OF_INTEREST,
    HUGE_PAGES_TUNABLE,
    THP_FILE,
    backbone_ops,
    huge_pages,
    keep_freed_memory,
    onednn_kernels,
)
from .measure import matmul_rate, parse_size
from .parts import dense_gemm_time, part_times
from .peers import ARCH_ALIASES, PEERS, build_peer
from .report import (
    CSV_FIELDS,
    machine_lines,
    paired_ratio,
    plot,
    scaling,
    summarise,
    write_csv,
    write_json,
)
from .run import run_benchmark

__all__ = [
    'ARCH_ALIASES',
    'CPU_FLAGS_OF_INTEREST',
    'CSV_FIELDS',
    'DEFAULT_SIZES',
    'DTYPES',
    'HUGE_PAGES_TUNABLE',
    'MODEL_DTYPES',
    'PEERS',
    'THP_FILE',
    'BenchConfig',
    'backbone_ops',
    'build_peer',
    'dense_gemm_time',
    'huge_pages',
    'keep_freed_memory',
    'machine_lines',
    'matmul_rate',
    'onednn_kernels',
    'paired_ratio',
    'parse_size',
    'part_times',
    'plot',
    'run_benchmark',
    'scaling',
    'summarise',
    'write_csv',
    'write_json',
]
