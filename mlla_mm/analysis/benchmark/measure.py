"""Measurement helpers: input sizes, synchronisation, peak memory, the matmul rate."""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
import threading
import time

import torch

__all__ = [
    'matmul_rate',
    'parse_size',
]


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
