"""onnxruntime against PyTorch on input sizes other than the export size.

:func:`check_onnx_parity` runs both and compares (:class:`ParityResult`); :func:`assert_parity`
fails above a tolerance.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from mlla_mm.deploy.onnx_export import _as_tuple
from mlla_mm.utils import require

__all__ = ['ParityResult', 'assert_parity', 'check_onnx_parity', 'default_check_shapes']


@dataclass
class ParityResult:
    """onnxruntime against PyTorch at one input size.

    ``rel_errors[k]`` is ``max|onnx - torch| / max|torch|`` over output ``k``.
    """

    batch: int
    height: int
    width: int
    output_names: tuple
    rel_errors: tuple

    @property
    def max_rel_err(self) -> float:
        return max(self.rel_errors)

    def __str__(self) -> str:
        errs = ', '.join(f'{n} {e:.2e}' for n, e in zip(self.output_names, self.rel_errors))
        size = f'{self.batch}x3x{self.height}x{self.width}'
        return f'{size}: max rel err {self.max_rel_err:.2e} ({errs})'


def default_check_shapes(shape: Sequence[int]) -> list[tuple[int, int]]:
    """Two check sizes other than ``shape``: a non-square multiple of 32, and a non-square size
    that is not a multiple of 32 (odd in both dims)."""
    h, w = shape
    first = (h, w + 64) if h != w + 64 else (h + 64, w)
    second = (h + 37, w + 11) if h + 37 != w + 11 else (h + 37, w + 43)
    return [first, second]


def check_onnx_parity(
    model: nn.Module,
    onnx_file: str | os.PathLike,
    shapes: Sequence[Sequence[int]],
    batch: int = 3,
    seed: int = 0,
    threads: int = 0,
) -> list[ParityResult]:
    """Run the ONNX file with onnxruntime (CPU) and ``model`` on random inputs and compare.

    Args:
        model: The PyTorch model that was exported (unmodified).
        onnx_file: The ONNX file.
        shapes: (H, W) sizes to check; use sizes the graph was not traced with.
        batch: Batch of the check inputs (default 3: not the export batch).
        seed: Seed of the random normal inputs.
        threads: onnxruntime intra-op threads (0: its default).

    Returns:
        list[ParityResult]: One per size.
    """
    ort = require('onnxruntime', 'ONNX parity checks')
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_file), options, providers=['CPUExecutionProvider'])
    names = tuple(o.name for o in session.get_outputs())
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    results = []
    model = model.eval()
    for h, w in shapes:
        x = torch.randn(batch, 3, h, w, generator=generator)
        with torch.no_grad():
            expected = _as_tuple(model(x))
        got = session.run(None, {input_name: x.numpy()})
        if len(got) != len(expected):
            raise AssertionError(f'ONNX gives {len(got)} outputs, PyTorch {len(expected)}')
        errors = []
        for name, a, b in zip(names, got, expected):
            b = b.numpy()
            if a.shape != b.shape:
                raise AssertionError(
                    f'{name} at {batch}x3x{h}x{w}: ONNX shape {a.shape}, PyTorch {b.shape}'
                )
            errors.append(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)))
        results.append(ParityResult(batch, h, w, names, tuple(errors)))
    return results


def assert_parity(results: Sequence[ParityResult], tol: float = 1e-4) -> None:
    """Raise ``AssertionError`` if any max relative error exceeds ``tol``."""
    bad = [r for r in results if not r.max_rel_err <= tol]
    if bad:
        raise AssertionError(
            f'ONNX/PyTorch parity above {tol:g}: ' + '; '.join(str(r) for r in bad)
        )
