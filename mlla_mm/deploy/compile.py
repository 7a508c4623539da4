"""``torch.compile`` of an MLLA model: eager against compiled time, graphs and graph breaks."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from mlla_mm.deploy.onnx_export import _as_tuple

__all__ = ['benchmark_compile']


def benchmark_compile(
    model: nn.Module,
    shapes: Sequence[Sequence[int]],
    batch: int = 1,
    backend: str = 'inductor',
    dynamic: bool | None = True,
    repeats: int = 5,
) -> dict:
    """Time eager against ``torch.compile(model, backend, dynamic)`` at each size, no autograd.

    Each size runs once through the compiled model (compiling it if needed: ``compile_s``), then
    ``repeats`` rounds that time eager and compiled back to back, so that a change of machine load
    hits both; ``speedup`` is the median of the per-round ratios. Graph counts come from
    ``torch._dynamo``'s counters, reset first.

    Returns:
        dict: ``rows`` (per size: shape, compile_s, eager_ms, compiled_ms (medians), speedup,
        max_abs_diff), ``graphs`` (compiled graphs: 1 means no recompilation across sizes) and
        ``graph_breaks`` (reason -> count).
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = model.eval()
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)

    def timed(fn, x) -> float:
        start = time.perf_counter()
        fn(x)
        return time.perf_counter() - start

    rows = []
    with torch.no_grad():
        for h, w in shapes:
            x = torch.randn(batch, 3, h, w)
            start = time.perf_counter()
            got = _as_tuple(compiled(x))
            compile_s = time.perf_counter() - start
            expected = _as_tuple(model(x))
            diff = max(float((a - b).abs().max()) for a, b in zip(got, expected))
            rounds = [(timed(model, x), timed(compiled, x)) for _ in range(repeats)]
            eager, fast = (1e3 * float(np.median(t)) for t in zip(*rounds))
            rows.append(
                dict(shape=(batch, 3, h, w), compile_s=compile_s, eager_ms=eager,
                     compiled_ms=fast, speedup=float(np.median([e / c for e, c in rounds])),
                     max_abs_diff=diff)
            )  # fmt: skip
    return dict(
        rows=rows,
        graphs=int(counters['stats']['unique_graphs']),
        graph_breaks=dict(counters['graph_break']),
    )
