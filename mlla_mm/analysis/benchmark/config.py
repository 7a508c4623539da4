"""What a benchmark run measures: models, sizes, dtype, repeats (:class:`BenchConfig`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .measure import parse_size

__all__ = [
    'BenchConfig',
    'DEFAULT_SIZES',
    'DTYPES',
    'MODEL_DTYPES',
]


DEFAULT_SIZES = ('512x512', '1280x800', '1024x1024', '1536x1536', '2048x2048')


DTYPES = {
    'fp32': torch.float32,
    'fp16': torch.float16,  # autocast
    'bf16': torch.bfloat16,  # autocast
    'bf16-model': torch.bfloat16,  # model.to(torch.bfloat16), bf16 input
}


MODEL_DTYPES = {'bf16-model'}  # the weights themselves cast, no autocast


@dataclass
class BenchConfig:
    """What to measure.

    Attributes:
        models: Names of :data:`PEERS` or ``config:PATH``.
        sizes: ``(height, width)`` inputs.
        batch_size: Images per batch.
        device: ``'cpu'`` or ``'cuda'``.
        dtype: ``'fp32'``, ``'fp16'``/``'bf16'`` (autocast), or ``'bf16-model'`` (the model
            cast with ``model.to(torch.bfloat16)``, bf16 input).
        threads: CPU threads (``torch.set_num_threads``); None leaves the default.
        channels_last: Model and input in channels-last memory format.
        compile: Wrap each model in ``torch.compile``.
        mode: ``'infer'`` (no autograd) or ``'train'`` (forward + backward of the outputs' mean).
        warmup: Untimed iterations per model and size.
        repeats: Timed iterations per model and size (interleaved across models).
        flops: Count the MACs of each model at each size (one extra, uncounted forward).
        memory: Measure the peak memory growth (one extra, untimed iteration).
        baseline: Model the others are compared to (``speedup`` columns), if in ``models``.
        max_seconds: Skip a model at larger sizes once one iteration took longer than this.
        seed: Seed of the weights and the input.
        keep_freed_memory: Apply the backbone's ``keep_freed_memory``
            (glibc keeps freed memory: no page faults for large tensors) before the run.
        kernels: Record which oneDNN kernels the first MLLA model runs (oneDNN verbose output
            of one small forward in the run's precision).
    """

    models: Sequence[str] = (
        'mlla_t',
        'mlla_t_plain',
        'swin_t',
        'convnext_t',
        'resnet50',
        'vit_b16',
    )
    sizes: Sequence[tuple] = tuple(parse_size(s) for s in DEFAULT_SIZES)
    batch_size: int = 1
    device: str = 'cpu'
    dtype: str = 'fp32'
    threads: int | None = None
    channels_last: bool = False
    compile: bool = False
    mode: str = 'infer'
    warmup: int = 2
    repeats: int = 10
    flops: bool = True
    memory: bool = True
    baseline: str | None = 'mlla_t_plain'
    max_seconds: float = 120.0
    seed: int = 0
    keep_freed_memory: bool = False
    kernels: bool = True
    extra: dict = field(default_factory=dict)
