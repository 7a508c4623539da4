"""One model timed across runtimes in one run: PyTorch eager, onnxruntime and OpenVINO.

:func:`make_runner` turns a PyTorch module or an ONNX file into a callable ``run(x)`` for one
runtime and precision (:data:`RUNTIMES`); :func:`time_runners` times several of them on the same
input, interleaved (one call of each per round), so that a change of machine load hits all of
them alike; :func:`summarise` gives the median and range per runner.

Threads: ``threads`` is PyTorch's ``set_num_threads``, onnxruntime's ``intra_op_num_threads``
(with spinning off, so that its idle threads do not take the CPU from the next runner) and
OpenVINO's ``INFERENCE_NUM_THREADS``.

Shapes: the MLLA ONNX files have dynamic sizes. OpenVINO can compile such a graph for one input
shape (``input_shape=``, ``Model.reshape``; the file stays dynamic): it then folds the shape
arithmetic and the RoPE tables into constants and fuses the chains of elementwise nodes (the
LayerNorms over the channel axis, the RoPE multiplies) into its "Snippets" subgraphs, which it
does not do for dynamic shapes. :func:`benchmark_models` compiles OpenVINO for the timed shape
unless told otherwise (peers exported at that shape are static already).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from mlla_mm.utils import require

__all__ = [
    'RUNTIMES',
    'benchmark_models',
    'describe_cpu',
    'make_runner',
    'onnxruntime_session',
    'openvino_model',
    'runtimes_available',
    'summarise',
    'time_runners',
]

#: runtime name -> (library, precision). ``eager-bf16`` is bf16 autocast; ``openvino-bf16`` is
#: OpenVINO's ``INFERENCE_PRECISION_HINT=bf16`` (needs AVX512-BF16 or AMX; OpenVINO falls back to
#: float32 on other CPUs); ``*-int8`` runs a quantised ONNX file (see :mod:`.quantize`).
RUNTIMES = {
    'eager': ('torch', 'fp32'),
    'eager-bf16': ('torch', 'bf16'),
    'onnxruntime': ('onnxruntime', 'fp32'),
    'onnxruntime-int8': ('onnxruntime', 'int8'),
    'openvino': ('openvino', 'fp32'),
    'openvino-bf16': ('openvino', 'bf16'),
    'openvino-int8': ('openvino', 'int8'),
}


def onnxruntime_session(onnx_file: str | os.PathLike, threads: int = 0, profile: str | None = None):
    """An onnxruntime CPU session; ``profile``: a file prefix to write a per-node profile to."""
    ort = require('onnxruntime', 'onnxruntime inference')
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(onnx_file), options, providers=['CPUExecutionProvider'])


def openvino_model(
    onnx_file: str | os.PathLike,
    threads: int = 0,
    precision: str = 'fp32',
    profile: bool = False,
    input_shape: Sequence[int] | None = None,
):
    """An OpenVINO CPU compiled model of an ONNX file (``precision``: ``fp32`` (or ``f32``) or
    ``bf16``, the inference precision; an int8 file runs its quantised operators in either).

    Args:
        input_shape: Compile for this shape of the (single) input, e.g. ``(1, 3, 800, 1280)``;
            the compiled model then accepts only that shape. ``None``: the file's own shapes
            (dynamic sizes stay dynamic).
    """
    ov = require('openvino', 'OpenVINO inference')
    hint = {'fp32': 'f32'}.get(precision, precision)  # OpenVINO's own name is f32
    config = {'PERFORMANCE_HINT': 'LATENCY', 'INFERENCE_PRECISION_HINT': hint}
    if threads:
        config['INFERENCE_NUM_THREADS'] = threads
    if profile:
        config['PERF_COUNT'] = True
    core = ov.Core()
    model = core.read_model(str(onnx_file))
    if input_shape is not None:
        model.reshape(list(input_shape))
    return core.compile_model(model, 'CPU', config)


def make_runner(
    runtime: str,
    model: nn.Module | None = None,
    onnx_file: str | os.PathLike | None = None,
    threads: int = 0,
    input_shape: Sequence[int] | None = None,
) -> Callable[[np.ndarray], object]:
    """A callable ``run(x)`` (x: the input as a float32 numpy array) for one entry of
    :data:`RUNTIMES`: ``model`` for the eager ones, ``onnx_file`` (one input) for the others.
    ``input_shape``: OpenVINO runners are compiled for that input shape only
    (:func:`openvino_model`); ignored by the other runtimes."""
    if runtime not in RUNTIMES:
        raise ValueError(f'runtime must be one of {sorted(RUNTIMES)}, got {runtime!r}')
    library, precision = RUNTIMES[runtime]
    if library == 'torch':
        if model is None:
            raise ValueError(f'{runtime} needs the PyTorch model')
        if threads:
            torch.set_num_threads(threads)
        model.eval()
        autocast = precision == 'bf16'

        def run_eager(x):
            with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                return model(torch.from_numpy(x))

        return run_eager
    if onnx_file is None:
        raise ValueError(f'{runtime} needs an ONNX file')
    if library == 'onnxruntime':
        session = onnxruntime_session(onnx_file, threads)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    ov_precision = 'bf16' if precision == 'bf16' else 'f32'
    compiled = openvino_model(onnx_file, threads, ov_precision, input_shape=input_shape)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def time_runners(
    runners: dict[str, Callable], x: np.ndarray, repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each runner on ``x``, interleaved: ``warmup`` calls of each, then
    ``repeats`` rounds of one call of each."""
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]], reference: str | None = None) -> list[dict]:
    """Per runner: median, min and max in ms, and the median's ratio to ``reference``'s."""
    ref = float(np.median(times[reference])) if reference in times else None
    rows = []
    for name, values in times.items():
        median = float(np.median(values))
        rows.append(
            dict(
                runner=name,
                median_ms=1e3 * median,
                min_ms=1e3 * min(values),
                max_ms=1e3 * max(values),
                ratio=median / ref if ref else None,
            )
        )
    return rows


def describe_cpu() -> str:
    """The CPU model and the ISA extensions that matter for bf16/int8 (from /proc/cpuinfo)."""
    name, flags = 'unknown CPU', set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name') and name == 'unknown CPU':
                    name = line.split(':', 1)[1].strip()
                elif line.startswith('flags') and not flags:
                    flags = set(line.split(':', 1)[1].split())
    except OSError:
        pass
    wanted = ('avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_int8')
    return f'{name}, {os.cpu_count()} CPUs, ' + ' '.join(f for f in wanted if f in flags)


def runtimes_available(names: Sequence[str]) -> list[str]:
    """The entries of ``names`` whose library is installed."""
    import importlib.util

    return [n for n in names if importlib.util.find_spec(RUNTIMES[n][0]) is not None]


def _has_mlla(model: nn.Module) -> bool:
    from mlla_mm.models.backbones.mlla import MLLA

    return any(isinstance(m, MLLA) for m in model.modules())


def _export_static(model: nn.Module, path: str, shape: Sequence[int]) -> None:
    """``torch.onnx.export`` at ``(1, 3, H, W)``, no dynamic axes (for peers whose forward
    turns sizes into Python numbers)."""
    import warnings

    x = torch.randn(1, 3, *shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=['input'])


def benchmark_models(
    models: dict[str, nn.Module],
    shape: Sequence[int],
    runtimes: Sequence[str],
    work_dir: str | os.PathLike,
    threads: int = 2,
    repeats: int = 5,
    warmup: int = 1,
    optimize: bool = True,
    plain: bool = False,
    layout: str = 'nchw',
    static_openvino: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, list[float]]:
    """Time each model in each runtime on one random ``(1, 3, H, W)`` input, all runners
    interleaved (:func:`time_runners`).

    Args:
        models: Name -> module (image batch -> tensor or tuple of tensors), eval mode: a
            backbone, or a whole model of :func:`~mlla_mm.deploy.wrappers.build_whole_model`
            (Mask R-CNN: one image, random pixels here).
        shape: (H, W) of the input.
        runtimes: Entries of :data:`RUNTIMES` (int8 ones need ``<work_dir>/<name>_int8.onnx``).
        work_dir: Where the ONNX files are written (``<name>.onnx``, unless the file exists):
            MLLA models with dynamic sizes (traced at 224x224), others at ``shape``.
        threads: Threads of every runtime.
        optimize: Export MLLA models through :func:`.export_friendly.export_friendly`.
        plain: Also time onnxruntime on the export without the rewrite (``<name>_plain.onnx``).
        layout: Token layout of the rewrite (:data:`.export_friendly.LAYOUTS`).
        static_openvino: Compile the OpenVINO runners for the timed input shape (see the module
            docstring); ``False``: for the files' own (dynamic) shapes.

    Returns:
        dict: ``'<model> <runtime>'`` -> seconds of each repeat.
    """
    from mlla_mm.deploy.export_friendly import export_friendly
    from mlla_mm.deploy.onnx_export import export_onnx

    os.makedirs(work_dir, exist_ok=True)
    input_shape = (1, 3, *shape) if static_openvino else None
    runners = {}
    for name, model in models.items():
        model.eval()
        files = {'': os.path.join(work_dir, f'{name}.onnx')}
        if plain:
            files['_plain'] = os.path.join(work_dir, f'{name}_plain.onnx')
        for suffix, path in files.items():
            if not os.path.exists(path) and any(RUNTIMES[r][0] != 'torch' for r in runtimes):
                log(f'exporting {name}{suffix} to {path}')
                exported = export_friendly(model, layout) if optimize and not suffix else model
                if type(model).__name__ == 'MaskRCNNGraph':  # one image, dynamic size
                    from mlla_mm.deploy.mask_rcnn_export import export_detector_onnx

                    export_detector_onnx(exported, path)
                elif _has_mlla(model):
                    export_onnx(exported, path)
                else:  # peers (mmdet's Swin) trace sizes as constants: export at the timed size
                    _export_static(model, path, shape)
        for runtime in runtimes:
            onnx_file = files['']
            if RUNTIMES[runtime][1] == 'int8':
                onnx_file = os.path.join(work_dir, f'{name}_int8.onnx')
                if not os.path.exists(onnx_file):
                    log(f'{name} {runtime}: no {onnx_file} (tools/deployment/quantize_int8.py)')
                    continue
            runners[f'{name} {runtime}'] = make_runner(
                runtime, model, onnx_file, threads, input_shape
            )
        if plain:
            runners[f'{name} onnxruntime (plain export)'] = make_runner(
                'onnxruntime', None, files['_plain'], threads
            )
    x = np.random.default_rng(seed).standard_normal((1, 3, *shape), dtype=np.float32)
    log(f'timing {len(runners)} runners, {repeats} interleaved rounds at 1x3x{shape[0]}x{shape[1]}')
    return time_runners(runners, x, repeats, warmup)
