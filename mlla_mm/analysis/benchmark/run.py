"""Latency, throughput and memory of MLLA and its peers over a resolution sweep.

The logic behind ``tools/benchmark.py``. Every model of a run sees the same input at each
resolution, and the timed repeats are interleaved (round ``r`` times model A, then B, then C, then
A again in round ``r + 1``), so a change of machine load hits all models alike; speed-ups are
reported as the median of the per-round ratios. A float32 (or ``--dtype``) matrix product is timed
in every round as well, so that each model's achieved FLOP/s can be given as a fraction of this
machine's matrix-multiply rate measured under the same conditions. The process's CPU time of
each timed iteration is recorded too (``cpu_ms``, column ``CPU ms``): with ``--threads 1`` it is
the work done, nearly unaffected by other jobs on a shared machine, whose time slices stretch the
wall-clock latency.

Peers (built only when their library is importable, otherwise reported as unavailable):

* ``mlla_t|s|b``: this package's backbone; ``mlla_t_plain``: the plain transcription of the
  equations (:class:`mlla_mm.testing.PlainMLLA`), the baseline; ``mlla_t_cp``: ``with_cp=True``;
* ``swin_t``: mmdet's ``SwinTransformer`` (Mask R-CNN Swin-T settings, window 7);
* ``convnext_t``: mmpretrain's ``ConvNeXt`` (tiny);
* ``resnet50``: mmdet's ``ResNet`` (depth 50), or torchvision's without mmdet;
* ``vit_b16``: mmpretrain's ``VisionTransformer`` (ViT-B/16, global softmax attention, position
  embedding interpolated to the input), to show quadratic growth.

Whole models: ``config:PATH`` names (``--config`` in the tool) build a detector / segmentor /
classifier from a config and time ``model(inputs, data_samples, mode='tensor')``.

Memory is the peak growth during one extra, untimed iteration: the CUDA allocator's peak over
what was allocated before it on GPU, and on CPU the growth of the process's peak resident set
(``VmHWM`` reset through ``/proc/self/clear_refs`` after ``malloc_trim``; a sampling thread where
that is not available).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.nn as nn

from .config import DTYPES, MODEL_DTYPES, BenchConfig
from .environment import _environment, _loadavg, keep_freed_memory, onednn_kernels
from .measure import _PeakMemory, _Progress, _size_name, _synchronize, _tensors, matmul_rate
from .peers import PEERS, build_peer

__all__ = [
    'run_benchmark',
]


def _make_step(model: nn.Module, cfg: BenchConfig, device: torch.device) -> Callable:
    dtype = DTYPES[cfg.dtype]
    cast_model = cfg.dtype in MODEL_DTYPES
    autocast = dtype != torch.float32 and not cast_model

    def infer(x):
        x = x.to(dtype) if cast_model else x
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return model(x)

    def train(x):
        x = x.to(dtype) if cast_model else x
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            outs = _tensors(model(x))
        loss = sum(o.float().mean() for o in outs if o.requires_grad)
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()  # gradients stay allocated: memory growth is the activations'

    return train if cfg.mode == 'train' else infer


def _prepare(name: str, cfg: BenchConfig, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = build_peer(name).to(device)
    if cfg.dtype in MODEL_DTYPES:
        model = model.to(DTYPES[cfg.dtype])
    model.train(cfg.mode == 'train')
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    return model


def run_benchmark(cfg: BenchConfig, log: Callable = print) -> dict:
    """Measure every model of ``cfg`` at every size; see the module docstring.

    Returns:
        dict: ``env`` (machine, versions, settings, load averages), ``records`` (one per model
        and size, with ``latency_ms`` (all repeats), ``median_ms``, ``p90_ms``,
        ``images_per_s``, ``peak_mem_mb``, ``params``, ``gmacs`` (per image),
        ``gflops_achieved``, ``matmul_fraction``, ``speedup_vs_<baseline>``, ``load``,
        ``status``) and ``matmul_gflops`` (median per size).
    """
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = DTYPES[cfg.dtype]
    if cfg.keep_freed_memory:
        cfg.extra['keep_freed_memory_applied'] = keep_freed_memory()
    env = _environment(cfg, device)
    env['settings'] = {k: v for k, v in asdict(cfg).items() if k != 'extra'}
    env['settings']['sizes'] = [_size_name(s) for s in cfg.sizes]
    env['load_start'] = _loadavg()

    models: dict = {}
    records: list = []
    unavailable: dict = {}
    for name in cfg.models:
        try:
            models[name] = _prepare(name, cfg, device)
        except (ImportError, ModuleNotFoundError) as e:
            unavailable[name] = f'unavailable: {e}'
            log(f'{name}: skipped, {e}')
    env['kernels'] = {}
    first_mlla = next((n for n in models if n.startswith('mlla') and 'plain' not in n), None)
    if cfg.kernels and device.type == 'cpu' and first_mlla:
        step = _make_step(models[first_mlla], cfg, device)
        report = onednn_kernels(step, torch.randn(1, 3, 224, 224))
        env['kernels'] = {'model': first_mlla, **report}
    rounds = cfg.warmup + cfg.repeats + int(cfg.flops) + int(cfg.memory)
    progress = _Progress(len(cfg.sizes) * (len(models) * rounds + cfg.repeats))
    too_slow: set = set()
    matmul = {}
    for hw in cfg.sizes:
        size = _size_name(hw)
        torch.manual_seed(cfg.seed)
        x = torch.randn(cfg.batch_size, 3, *hw, device=device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        active = {n: m for n, m in models.items() if n not in too_slow}
        rec = {n: _record(n, models[n], cfg, hw) for n in active}
        steps = {n: _make_step(m, cfg, device) for n, m in active.items()}
        loads = [_loadavg()]
        for name in list(active):  # warm-up, one model after the other
            try:
                for _ in range(cfg.warmup):
                    t0 = time.perf_counter()
                    steps[name](x)
                    _synchronize(device)
                    progress.step(f'{name} {size} warm-up')
                    if time.perf_counter() - t0 > cfg.max_seconds:
                        too_slow.add(name)
            except (RuntimeError, MemoryError) as e:  # out of memory, unsupported op
                rec[name]['status'] = f'error: {type(e).__name__}: {str(e).splitlines()[0]}'
                del active[name]
        rates = []
        for r in range(cfg.repeats):  # timed repeats, interleaved
            for name in list(active):
                _synchronize(device)
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    steps[name](x)
                    _synchronize(device)
                except (RuntimeError, MemoryError) as e:
                    rec[name]['status'] = f'error: {type(e).__name__}: {str(e).splitlines()[0]}'
                    del active[name]
                    continue
                rec[name]['latency_ms'].append(1e3 * (time.perf_counter() - t0))
                rec[name]['cpu_ms'].append(1e3 * (time.process_time() - c0))
                progress.step(f'{name} {size} repeat {r + 1}/{cfg.repeats}')
            rates.append(matmul_rate(device, dtype))
            progress.step(f'matmul {size} repeat {r + 1}/{cfg.repeats}')
            loads.append(_loadavg())
        matmul[size] = statistics.median(rates) / 1e9 if rates else None
        for name in active:
            if cfg.memory:
                with _PeakMemory(device) as peak:
                    steps[name](x)
                rec[name]['peak_mem_mb'] = peak.peak / 2**20
                progress.step(f'{name} {size} memory')
            if cfg.flops:
                from mlla_mm.analysis.flops import count_flops

                report = count_flops(getattr(models[name], '_orig_mod', models[name]), x)
                per_image = 1e9 * cfg.batch_size
                rec[name]['gmacs'] = report.macs / per_image
                rec[name]['gmacs_by_kind'] = {k: v / per_image for k, v in report.by_kind.items()}
                progress.step(f'{name} {size} flops')
        for name in active:
            _finish(rec[name], cfg, matmul[size], loads)
        _speedups(rec, cfg)
        records.extend(rec.values())
        for name in set(models) - set(active) - set(rec):
            records.append(dict(_record(name, models[name], cfg, hw), status='skipped: too slow'))
    progress.close()
    for name, why in unavailable.items():
        records.append({'model': name, 'status': why})
    env['load_end'] = _loadavg()
    return {'env': env, 'matmul_gflops': matmul, 'records': records}


def _record(name: str, model: nn.Module, cfg: BenchConfig, hw: tuple) -> dict:
    desc = PEERS[name][0] if name in PEERS else name
    return {
        'model': name,
        'description': desc,
        'size': _size_name(hw),
        'height': hw[0],
        'width': hw[1],
        'pixels': hw[0] * hw[1],
        'batch_size': cfg.batch_size,
        'mode': cfg.mode,
        'dtype': cfg.dtype,
        'params': sum(p.numel() for p in model.parameters()),
        'latency_ms': [],
        'cpu_ms': [],
        'status': 'ok',
    }


def _finish(rec: dict, cfg: BenchConfig, matmul_gflops: float | None, loads: list) -> None:
    lat = sorted(rec['latency_ms'])
    if not lat:
        return
    rec['median_ms'] = statistics.median(lat)
    if rec.get('cpu_ms'):
        rec['median_cpu_ms'] = statistics.median(rec['cpu_ms'])
    rec['p90_ms'] = lat[min(len(lat) - 1, math.ceil(0.9 * len(lat)) - 1)]
    rec['images_per_s'] = cfg.batch_size / (rec['median_ms'] / 1e3)
    rec['load'] = [v for v in loads if v is not None]
    if 'gmacs' in rec:  # a training step does ~3x the forward's work (forward, 2 backward GEMMs)
        work = 3 if cfg.mode == 'train' else 1
        rec['gflops_achieved'] = 2 * work * rec['gmacs'] * cfg.batch_size / (rec['median_ms'] / 1e3)
        if matmul_gflops:
            rec['matmul_fraction'] = rec['gflops_achieved'] / matmul_gflops


def _speedups(rec: dict, cfg: BenchConfig) -> None:
    """Speed-up over the baseline: the median of the per-round latency ratios."""
    base = rec.get(cfg.baseline)
    if not base or not base['latency_ms']:
        return
    for r in rec.values():
        if r['latency_ms'] and len(r['latency_ms']) == len(base['latency_ms']):
            ratios = [b / a for a, b in zip(r['latency_ms'], base['latency_ms'])]
            r['speedup_vs_' + cfg.baseline] = statistics.median(ratios)
