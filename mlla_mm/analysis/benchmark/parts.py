"""Per-part times of an MLLA backbone, and the dense layers alone as a lower bound of its
latency (``python -m mlla_mm.analysis.benchmark``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from .config import DTYPES, MODEL_DTYPES
from .environment import _loadavg, keep_freed_memory
from .measure import matmul_rate, parse_size
from .peers import _mlla

__all__ = [
    'dense_gemm_time',
    'part_times',
]


def _in_dtype(model: nn.Module, x: torch.Tensor, dtype: str) -> tuple:
    """``model`` and ``x`` for ``dtype`` (as in :class:`BenchConfig`), and the autocast context
    (no-grad inference) to run them in."""
    torch_dtype = DTYPES[dtype]
    if dtype in MODEL_DTYPES:
        model, x = model.to(torch_dtype), x.to(torch_dtype)
    autocast = torch_dtype != torch.float32 and dtype not in MODEL_DTYPES
    return model.eval(), x, torch.autocast(x.device.type, dtype=torch_dtype, enabled=autocast)


def _median_ms(fn: Callable, repeats: int) -> float:
    """Median time of ``fn()`` over ``repeats`` calls after one untimed call, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _matmul_gflops(device: torch.device, dtype: str) -> float:
    return statistics.median(matmul_rate(device, DTYPES[dtype]) for _ in range(3)) / 1e9


def part_times(model: nn.Module, x: torch.Tensor, dtype: str = 'fp32', repeats: int = 3) -> dict:
    """Inference time and MACs of each part of an MLLA backbone: the stem, the blocks of each
    stage and each patch merging, against the matmul rate (what bounds the whole).

    Forward hooks capture each part's input in one forward of the whole model; each part then
    runs alone ``repeats`` times (median). ``dtype`` as in :class:`BenchConfig`.

    Returns:
        dict: ``parts`` (name -> ``ms``, ``gmacs``, ``gflops``, ``matmul_fraction``),
        ``matmul_gflops`` and ``total_ms``.
    """
    from mlla_mm.analysis.flops import count_flops

    model, x, autocast = _in_dtype(model, x, dtype)
    parts = {'stem': model.patch_embed}
    for i, stage in enumerate(model.layers):
        parts[f'stage{i} blocks'] = stage
        if stage.downsample is not None:
            parts[f'merge{i}'] = stage.downsample
    inputs: dict = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0].clone()))
        for n, m in parts.items()
    ]
    with torch.no_grad(), autocast:
        model(x)
        for h in hooks:
            h.remove()
        rate = _matmul_gflops(x.device, dtype)
        out = {}
        for name, module in parts.items():
            if name not in inputs:  # stages after the last output index do not run
                continue
            ms = _median_ms(lambda m=module, i=inputs[name]: m(i), repeats)
            macs = count_flops(module, inputs[name]).macs
            gflops = 2 * macs / (ms / 1e3) / 1e9
            out[name] = {
                'ms': ms,
                'gmacs': macs / 1e9,
                'gflops': gflops,
                'matmul_fraction': gflops / rate,
            }
    return {'parts': out, 'matmul_gflops': rate, 'total_ms': sum(p['ms'] for p in out.values())}


# the layers with weights: ATen's linears ((add)mm) and convolutions (under a dispatch mode
# the backbone runs its module forward, see fast_path.why_not_fast_path), and oneDNN's fused
# ones where a model calls them directly; not the attention's batched products, whose speed
# depends on their views
_DENSE_OPS = {
    '_linear_pointwise', '_convolution_pointwise', '_convolution_pointwise_', 'mm', 'addmm',
    'addmm_', 'convolution',
}  # fmt: skip


_GROUPS_ARG = {'_convolution_pointwise': 6, '_convolution_pointwise_': 7, 'convolution': 8}


def dense_gemm_time(
    model: nn.Module,
    x: torch.Tensor,
    dtype: str = 'fp32',
    repeats: int = 3,
    matmul_gflops: float | None = None,
) -> dict:
    """The time of the model's dense layers alone: a lower bound of its latency.

    One inference records every layer with weights that runs as a matrix product (linears and
    dense convs: ATen ``mm``/``addmm``/``convolution``, oneDNN's fused kernels where a model
    calls them directly; with their shapes, strides and dtypes; not
    the depthwise convs nor the attention's batched products); each is then replayed alone on
    fresh tensors of the same layout, without its activation epilogue, ``repeats`` times
    (median). Their sum is what the model would take if every other op (depthwise convs,
    normalisations, activations, the attention core, copies) were free.

    ``matmul_gflops``: the reference rate when already measured (else measured here).

    Returns:
        dict: ``ms`` (sum), ``gmacs`` (of the replayed ops), ``calls``, ``matmul_gflops``.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    model, x, autocast = _in_dtype(model, x, dtype)
    calls: list = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            depthwise = name in _GROUPS_ARG and args[_GROUPS_ARG[name]] != 1
            if name in _DENSE_OPS and not depthwise:
                calls.append((func, args, out))
            return out

    def fresh(a):
        if not isinstance(a, torch.Tensor):
            return a
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).normal_()

    total_ms, macs = 0.0, 0
    with torch.no_grad(), autocast:
        with Record():
            model(x)
        for func, args, out in calls:
            args = [fresh(a) for a in args]
            name = func.overloadpacket.__name__
            if name == '_linear_pointwise':
                args[3] = 'none'
            elif name == '_convolution_pointwise':
                args[7] = 'none'
            macs += _gemm_macs(name, args, out)
            total_ms += _median_ms(lambda f=func, a=args: f(*a), repeats)
        rate = matmul_gflops or _matmul_gflops(x.device, dtype)
    return {'ms': total_ms, 'gmacs': macs / 1e9, 'calls': len(calls), 'matmul_gflops': rate}


def _gemm_macs(name: str, args: list, out: torch.Tensor) -> int:
    if name == '_linear_pointwise':
        return out.numel() * args[1].shape[1]
    if name in ('_convolution_pointwise', 'convolution'):
        return out.numel() * args[1][0].numel()
    if name == '_convolution_pointwise_':  # accumulates into args[0]
        return args[0].numel() * args[2][0].numel()
    a = args[1] if name in ('addmm', 'addmm_') else args[0]
    return out.numel() * a.shape[-1]


def _parts_main(argv=None) -> dict:
    """``python -m mlla_mm.analysis.benchmark --arch tiny --size 1280x800 --dtype bf16``"""
    import argparse

    parser = argparse.ArgumentParser(description='Per-part inference time of an MLLA backbone')
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', default='1280x800', help='WIDTHxHEIGHT or one number')
    parser.add_argument('--dtype', default='fp32', choices=sorted(DTYPES))
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--keep-freed-memory', action='store_true')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(0)
    model = _mlla(args.arch)
    x = torch.randn(1, 3, *parse_size(args.size))
    result = part_times(model, x, args.dtype, args.repeats)
    for name, p in result['parts'].items():
        print(
            f'{name:15s} {p["ms"]:8.1f} ms {p["gmacs"]:7.2f} GMACs {p["gflops"]:8.1f} GFLOP/s '
            f'{100 * p["matmul_fraction"]:5.1f}% of the matmul rate'
        )
    print(
        f'total {result["total_ms"]:.1f} ms; {args.dtype} matmul rate '
        f'{result["matmul_gflops"]:.1f} GFLOP/s; {torch.get_num_threads()} threads; '
        f'load {_loadavg()}'
    )
    dense = dense_gemm_time(model, x, args.dtype, args.repeats, result['matmul_gflops'])
    share = 2 * dense['gmacs'] / (dense['ms'] / 1e3) / dense['matmul_gflops']
    print(
        f'dense layers alone ({dense["calls"]} linears and convs, {dense["gmacs"]:.1f} GMACs, no '
        f'epilogues): {dense["ms"]:.1f} ms, {100 * share:.0f}% of the matmul rate; everything '
        f"else took {result['total_ms'] - dense['ms']:.1f} ms of the parts' total"
    )
    result['dense'] = dense
    return result
