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

import contextlib
import csv
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

__all__ = [
    'PEERS',
    'BenchConfig',
    'parse_size',
    'build_peer',
    'run_benchmark',
    'summarise',
    'write_csv',
    'write_json',
    'plot',
]

DEFAULT_SIZES = ('512x512', '1280x800', '1024x1024', '1536x1536', '2048x2048')
DTYPES = {
    'fp32': torch.float32,
    'fp16': torch.float16,  # autocast
    'bf16': torch.bfloat16,  # autocast
    'bf16-model': torch.bfloat16,  # model.to(torch.bfloat16), bf16 input
}
MODEL_DTYPES = {'bf16-model'}  # the weights themselves cast, no autocast


# ------------------------------------------------------------------------------------------
# Peers
# ------------------------------------------------------------------------------------------
def _mlla(arch: str, **kwargs) -> nn.Module:
    from mlla_mm import MLLA

    model = MLLA(arch, drop_path_rate=0.0, **kwargs)
    model.init_weights()
    return model


def _mlla_plain(arch: str) -> nn.Module:
    from mlla_mm import MLLA
    from mlla_mm.testing import PlainMLLA

    ref = MLLA(arch, drop_path_rate=0.0)
    ref.init_weights()
    plain = PlainMLLA(ref.embed_dims, ref.depths, ref.num_heads)
    plain.load_state_dict(ref.state_dict())
    return plain


def _swin_t() -> nn.Module:
    from mmdet.models.backbones import SwinTransformer

    return SwinTransformer(
        embed_dims=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        drop_path_rate=0.0,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        convert_weights=False,
    )


def _convnext_t() -> nn.Module:
    from mmpretrain.models.backbones import ConvNeXt

    return ConvNeXt(arch='tiny', out_indices=(0, 1, 2, 3), gap_before_final_norm=False)


def _resnet50() -> nn.Module:
    try:
        from mmdet.models.backbones import ResNet
    except ImportError:
        import torchvision

        net = torchvision.models.resnet50()
        return nn.Sequential(*list(net.children())[:-2])
    return ResNet(depth=50, out_indices=(0, 1, 2, 3))


def _vit_b16() -> nn.Module:
    from mmpretrain.models.backbones import VisionTransformer

    return VisionTransformer(arch='b', img_size=224, patch_size=16, out_type='featmap')


# name -> (description, builder)
PEERS: dict = {
    'mlla_t': ('MLLA-T (this package)', lambda: _mlla('tiny')),
    'mlla_s': ('MLLA-S (this package)', lambda: _mlla('small')),
    'mlla_b': ('MLLA-B (this package)', lambda: _mlla('base')),
    'mlla_t_cp': ('MLLA-T, with_cp=True', lambda: _mlla('tiny', with_cp=True)),
    'mlla_t_plain': ('MLLA-T, plain transcription (baseline)', lambda: _mlla_plain('tiny')),
    'mlla_s_plain': ('MLLA-S, plain transcription', lambda: _mlla_plain('small')),
    'mlla_b_plain': ('MLLA-B, plain transcription', lambda: _mlla_plain('base')),
    'swin_t': ('Swin-T (mmdet)', _swin_t),
    'convnext_t': ('ConvNeXt-T (mmpretrain)', _convnext_t),
    'resnet50': ('ResNet-50 (mmdet, or torchvision)', _resnet50),
    'vit_b16': ('ViT-B/16, global attention (mmpretrain)', _vit_b16),
}
ARCH_ALIASES = {'t': 'mlla_t', 'tiny': 'mlla_t', 's': 'mlla_s', 'small': 'mlla_s'}
ARCH_ALIASES.update({'b': 'mlla_b', 'base': 'mlla_b'})


class _ConfigModel(nn.Module):
    """A whole model from a config, called as ``model(inputs, data_samples, mode='tensor')``."""

    def __init__(self, config: str) -> None:
        super().__init__()
        from mlla_mm.analysis.flops import build_from_config

        self.model, self.scope = build_from_config(config)

    def forward(self, x: torch.Tensor):
        from mlla_mm.analysis.flops import model_inputs

        _, samples = model_inputs(self.model, self.scope, *x.shape[-2:], batch_size=x.shape[0])
        return self.model(x, samples, mode='tensor')


def build_peer(name: str) -> nn.Module:
    """Build a model of :data:`PEERS`, or a whole model for ``config:PATH``.

    Raises:
        KeyError: For an unknown name (the message lists the known ones).
        ImportError: When the peer's library is not installed.
    """
    if name.startswith('config:'):
        return _ConfigModel(name[len('config:') :])
    if name not in PEERS:
        raise KeyError(f'Unknown model {name!r}; choose from {sorted(PEERS)} or config:PATH')
    return PEERS[name][1]()


# ------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple:
    """``'1280x800'`` (width x height) or ``'1024'`` (square) -> ``(height, width)``."""
    parts = text.lower().replace('*', 'x').split('x')
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[1]), int(parts[0])
    raise ValueError(f'size {text!r}: use WIDTHxHEIGHT (e.g. 1280x800) or one number')


def _size_name(hw: tuple) -> str:
    return f'{hw[1]}x{hw[0]}'


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _tensors(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return [t for t in vars(obj).values() for t in _tensors(t)] if hasattr(obj, '__dict__') else []


def _rss_kb(field_name: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field_name):
                return int(line.split()[1])
    return 0


class _PeakMemory:
    """Peak memory growth over a block (bytes): CUDA allocator peak, or CPU peak RSS growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._sampler = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        with contextlib.suppress(OSError, AttributeError):  # free heap back: growth is growth
            ctypes.CDLL('libc.so.6').malloc_trim(0)
        self._base = _rss_kb('VmRSS:') * 1024
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # resets VmHWM (the peak RSS) to the current RSS
            self._hwm = True
        except OSError:
            self._hwm = False
            self._sampled = self._base
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, _rss_kb('VmRSS:') * 1024)

    def __exit__(self, *exc) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._hwm:
            self.peak = _rss_kb('VmHWM:') * 1024 - self._base
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = self._sampled - self._base


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """Best-of-``repeats`` FLOP/s of an ``n x n`` by ``n x n`` matrix product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        _synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class _Progress:
    """One status line (rewritten in place on a terminal, one line per step otherwise)."""

    def __init__(self, total: int, stream=None) -> None:
        self.total, self.done = max(total, 1), 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()

    def step(self, text: str, advance: int = 1) -> None:
        self.done += advance
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        pct = 100.0 * self.done / self.total
        line = f'[{pct:5.1f}% {elapsed:6.0f}s eta {eta:5.0f}s] {text}'
        if self.tty:
            self.stream.write('\r\033[K' + line)
        else:
            self.stream.write(line + '\n')
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write('\n')


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------
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
        keep_freed_memory: Apply :func:`mlla_mm.models.backbones.mlla_ops.keep_freed_memory`
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
        from mlla_mm.models.backbones.mlla_ops import CAPS

        env['cpu_flags'] = sorted(cpu_flags() & CPU_FLAGS_OF_INTEREST)
        env['cpu_capabilities'] = CAPS.describe()
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
        from mlla_mm.models.backbones.mlla_ops import keep_freed_memory

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


def paired_ratio(records: list, a: str, b: str, size: str) -> float | None:
    """Median over rounds of ``latency(b) / latency(a)`` at ``size`` (> 1: ``a`` is faster)."""
    ra = _find(records, a, size)
    rb = _find(records, b, size)
    if not ra or not rb or len(ra['latency_ms']) != len(rb['latency_ms']) or not ra['latency_ms']:
        return None
    return statistics.median(y / x for x, y in zip(ra['latency_ms'], rb['latency_ms']))


def _find(records: list, model: str, size: str) -> dict | None:
    for r in records:
        if r['model'] == model and r.get('size') == size and r.get('latency_ms'):
            return r
    return None


def summarise(result: dict) -> str:
    """A table of the records, then the scaling ratios between the largest two square sizes."""
    rows = [r for r in result['records'] if r.get('size')]
    head = (
        f'{"model":<14s} {"size":>10s} {"median ms":>10s} {"p90 ms":>9s} {"img/s":>7s} '
        f'{"mem MB":>8s} {"GMACs":>8s} {"%mm":>5s} {"vs base":>7s} {"CPU ms":>8s}  status'
    )
    lines = [head, '-' * len(head)]
    for r in rows:
        speed = next((v for k, v in r.items() if k.startswith('speedup_vs_')), None)
        lines.append(
            f'{r["model"]:<14s} {r["size"]:>10s} {_f(r.get("median_ms"), 10, 0)} '
            f'{_f(r.get("p90_ms"), 9, 0)} {_f(r.get("images_per_s"), 7, 2)} '
            f'{_f(r.get("peak_mem_mb"), 8, 0)} {_f(r.get("gmacs"), 8, 1)} '
            f'{_f(100 * r["matmul_fraction"] if "matmul_fraction" in r else None, 5, 0)} '
            f'{_f(speed, 7, 2)} {_f(r.get("median_cpu_ms"), 8, 0)}  {r["status"]}'
        )
    for r in result['records']:
        if not r.get('size'):
            lines.append(f'{r["model"]:<14s} {r["status"]}')
    mm = ', '.join(f'{k}: {v:.1f}' for k, v in result['matmul_gflops'].items() if v)
    settings = result['env'].get('settings', {})
    lines.append(f'{settings.get("dtype", "fp32")} matmul rate (GFLOP/s, median per size): {mm}')
    lines.extend(machine_lines(result['env']))
    for text in scaling(result):
        lines.append(text)
    return '\n'.join(lines)


def machine_lines(env: dict) -> list:
    """The machine, its CPU flags and which kernels ran, as lines of text."""
    lines = [
        f'machine: {env.get("gpu") or env.get("processor")}, {env.get("cpu_count")} CPUs, '
        f'{env.get("threads")} threads, torch {env.get("torch")}'
    ]
    if env.get('cpu_flags') is not None:
        lines.append(f'CPU flags: {" ".join(env["cpu_flags"]) or "-"}')
        lines.append(f'kernels available: {env.get("cpu_capabilities")}')
    kernels = env.get('kernels') or {}
    if kernels.get('kernels'):
        ran = ', '.join(
            f'{k} x{v}' for k, v in sorted(kernels['kernels'].items(), key=lambda kv: -kv[1])
        )
        lines.append(f'oneDNN ISA: {kernels.get("isa")}')
        lines.append(f'oneDNN kernels run by {kernels["model"]} (224x224 forward): {ran}')
    pages = env.get('huge_pages')
    if pages:
        if pages['on']:
            state = 'on'
        elif pages['thp'] == 'madvise':
            state = f'off (GLIBC_TUNABLES={HUGE_PAGES_TUNABLE} turns them on; docs/performance.md)'
        else:
            state = 'unavailable'
        lines.append(f'huge pages for large allocations: {state}; kernel THP mode {pages["thp"]}')
    settings = env.get('settings', {})
    if settings.get('keep_freed_memory'):
        lines.append('glibc malloc: keep_freed_memory (no mmap, no trim)')
    return lines


def scaling(result: dict) -> list:
    """Latency and memory ratios between 2048x2048 and 1024x1024 (4.0 is linear).

    Sizes run one after the other, so a change of machine load between them skews the latency
    ratio; the ratio rescaled by the matmul rate measured at each size is given as well.
    """
    out = []
    rates = result.get('matmul_gflops', {})
    models = dict.fromkeys(r['model'] for r in result['records'])
    for m in models:
        lo, hi = _find(result['records'], m, '1024x1024'), _find(result['records'], m, '2048x2048')
        if lo and hi:
            lat = hi['median_ms'] / lo['median_ms']
            mem = hi.get('peak_mem_mb', 0) / max(lo.get('peak_mem_mb', 0), 1e-9)
            text = f'{m}: 2048^2 / 1024^2 latency x{lat:.2f}'
            if rates.get('1024x1024') and rates.get('2048x2048'):
                adjusted = lat * rates['2048x2048'] / rates['1024x1024']
                text += f' (x{adjusted:.2f} at equal matmul rate)'
            out.append(f'{text}, peak memory x{mem:.2f}')
    return out


def _f(v, width: int, digits: int) -> str:
    return f'{v:>{width}.{digits}f}' if isinstance(v, (int, float)) else f'{"-":>{width}s}'


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def write_json(result: dict, path: str) -> None:
    with open(path, 'w') as f:
        json.dump(result, f, indent=1)


CSV_FIELDS = (
    'model', 'size', 'height', 'width', 'pixels', 'batch_size', 'mode', 'dtype', 'median_ms',
    'median_cpu_ms',
    'p90_ms', 'images_per_s', 'peak_mem_mb', 'params', 'gmacs', 'gflops_achieved',
    'matmul_fraction', 'status',
)  # fmt: skip


def write_csv(result: dict, path: str) -> None:
    with open(path, 'w', newline='') as f:
        extra = sorted({k for r in result['records'] for k in r if k.startswith('speedup_vs_')})
        writer = csv.DictWriter(f, fieldnames=[*CSV_FIELDS, *extra], extrasaction='ignore')
        writer.writeheader()
        for r in result['records']:
            writer.writerow(r)


def plot(result: dict, path: str, title: str | None = None) -> None:
    """Log-log latency and peak memory against the pixel count, one line per model."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    models = dict.fromkeys(r['model'] for r in result['records'] if r.get('median_ms'))
    for key, ax, label in (
        ('median_ms', axes[0], 'median latency (ms)'),
        ('peak_mem_mb', axes[1], 'peak memory growth (MB)'),
    ):
        for m in models:
            pts = sorted(
                (r['pixels'], r[key]) for r in result['records']
                if r['model'] == m and r.get(key) and r[key] > 0
            )  # fmt: skip
            if pts:
                line = ax.plot(*zip(*pts), marker='o', label=m)[0]
                if len(pts) > 1:  # the linear-growth guide through the first point
                    (x0, y0), x1 = pts[0], pts[-1][0]
                    ax.plot([x0, x1], [y0, y0 * x1 / x0], ls=':', lw=0.8, color=line.get_color())
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('pixels per image')
        ax.set_ylabel(label)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize=8)
    env = result['env']
    loads = [v for r in result['records'] for v in r.get('load', [])]
    load = f', load average {min(loads):.1f}-{max(loads):.1f}' if loads else ''
    fig.suptitle(
        title
        or f'{env["settings"]["mode"]}, {env["settings"]["dtype"]}, batch '
        f'{env["settings"]["batch_size"]}, {env["device"]} ({env.get("gpu", env["processor"])}, '
        f'{env["threads"]} threads{load}); dotted: linear growth',
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# Per-part times of an MLLA backbone
# ------------------------------------------------------------------------------------------
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


# the layers with weights: oneDNN linears and convs, ATen's (add)mm (a linear accumulating into
# its residual); not the attention's batched products, whose speed depends on their views
_DENSE_OPS = {
    '_linear_pointwise', '_convolution_pointwise', '_convolution_pointwise_', 'mm', 'addmm',
    'addmm_',
}  # fmt: skip
_GROUPS_ARG = {'_convolution_pointwise': 6, '_convolution_pointwise_': 7}


def dense_gemm_time(
    model: nn.Module,
    x: torch.Tensor,
    dtype: str = 'fp32',
    repeats: int = 3,
    matmul_gflops: float | None = None,
) -> dict:
    """The time of the model's dense layers alone: a lower bound of its latency.

    One inference records every layer with weights that runs as a matrix product (oneDNN
    linears and dense convs, ATen ``mm``/``addmm``; with their shapes, strides and dtypes; not
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
    if name == '_convolution_pointwise':
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
        from mlla_mm.models.backbones.mlla_ops import keep_freed_memory

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


if __name__ == '__main__':
    _parts_main()
