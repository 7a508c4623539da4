"""The results of a benchmark run: summary table, machine lines, scaling, JSON/CSV/plot."""

from __future__ import annotations

import csv
import json
import statistics

from .environment import HUGE_PAGES_TUNABLE

__all__ = [
    'CSV_FIELDS',
    'machine_lines',
    'paired_ratio',
    'plot',
    'scaling',
    'summarise',
    'write_csv',
    'write_json',
]


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
