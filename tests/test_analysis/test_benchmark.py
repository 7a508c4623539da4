"""Tests of ``mlla_mm.analysis.benchmark`` and ``tools/benchmark.py`` at tiny sizes: the run
produces JSON, CSV and PNG files with sane fields (no timing assertions)."""

import csv
import json
import os
import platform
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlla_mm import MLLA
from mlla_mm.analysis.benchmark import (
    HUGE_PAGES_TUNABLE,
    PEERS,
    BenchConfig,
    huge_pages,
    machine_lines,
    parse_size,
    run_benchmark,
    summarise,
)
from mlla_mm.analysis.flops import mlla_macs
from mlla_mm.testing import PlainMLLA

ROOT = Path(__file__).parents[2]
TINY = {'embed_dims': 32, 'depths': (1, 2, 2, 1), 'num_heads': (1, 2, 4, 8)}


def _missing_peer():
    raise ImportError('No module named "not_installed"')


@pytest.fixture
def tiny_peers(monkeypatch):
    """Tiny stand-ins registered as peers (the real ones are full-size)."""

    def plain():
        ref = MLLA(arch=TINY, drop_path_rate=0.0)
        model = PlainMLLA(**TINY)
        model.load_state_dict(ref.state_dict())
        return model

    monkeypatch.setitem(PEERS, 'tiny', ('MLLA tiny widths', lambda: MLLA(arch=TINY)))
    monkeypatch.setitem(PEERS, 'tiny_cp', ('with_cp', lambda: MLLA(arch=TINY, with_cp=True)))
    monkeypatch.setitem(PEERS, 'tiny_plain', ('plain transcription', plain))
    monkeypatch.setitem(PEERS, 'missing', ('a peer whose library is absent', _missing_peer))


def test_parse_size():
    assert parse_size('1280x800') == (800, 1280)
    assert parse_size('1024') == (1024, 1024)
    with pytest.raises(ValueError, match='WIDTHxHEIGHT'):
        parse_size('1x2x3')


def test_tool_writes_json_csv_png(tiny_peers, tmp_path, capsys):
    tool = runpy.run_path(str(ROOT / 'tools' / 'benchmark.py'))
    out = tmp_path / 'bench'
    argv = ['--models', 'tiny', 'tiny_plain', 'missing', '--baseline', 'tiny_plain']
    argv += ['--sizes', '64x48', '67', '--repeats', '3', '--warmup', '1', '--out', str(out)]
    tool['main'](argv)
    printed = capsys.readouterr()
    assert 'median ms' in printed.out and 'matmul rate' in printed.out
    assert 'repeat 3/3' in printed.err  # the progress display

    result = json.loads((out / 'results.json').read_text())
    assert result['env']['settings']['sizes'] == ['64x48', '67x67']
    assert result['env']['torch'] == torch.__version__
    records = {(r['model'], r.get('size')): r for r in result['records']}
    assert records[('missing', None)]['status'].startswith('unavailable')
    for model in ('tiny', 'tiny_plain'):
        for size, (h, w) in (('64x48', (48, 64)), ('67x67', (67, 67))):
            r = records[(model, size)]
            assert r['status'] == 'ok' and (r['height'], r['width'], r['pixels']) == (h, w, h * w)
            assert len(r['latency_ms']) == 3 and all(t > 0 for t in r['latency_ms'])
            assert r['median_ms'] <= r['p90_ms'] <= max(r['latency_ms'])
            assert len(r['cpu_ms']) == 3 and r['median_cpu_ms'] > 0
            assert r['images_per_s'] == pytest.approx(1e3 / r['median_ms'])
            assert r['peak_mem_mb'] >= 0
            assert r['gmacs'] * 1e9 == pytest.approx(mlla_macs(**TINY, height=h, width=w)['total'])
            assert 0 < r['matmul_fraction'] < 2
            assert r['speedup_vs_tiny_plain'] > 0
            assert r['params'] == sum(p.numel() for p in MLLA(arch=TINY).parameters())
    assert records[('tiny_plain', '67x67')]['speedup_vs_tiny_plain'] == 1.0
    assert all(v > 0 for v in result['matmul_gflops'].values())

    with open(out / 'results.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {'median_ms', 'p90_ms', 'peak_mem_mb', 'gmacs'} <= set(rows[0])
    assert float(rows[0]['median_ms']) > 0
    png = (out / 'results.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


def test_training_mode_and_slow_models_are_skipped(tiny_peers):
    cfg = BenchConfig(
        models=['tiny', 'tiny_cp'],
        sizes=[(40, 56), (64, 64)],
        mode='train',
        warmup=1,
        repeats=2,
        baseline='tiny',
        max_seconds=0.0,  # every model is "too slow" after the first size
    )
    result = run_benchmark(cfg, log=lambda *a: None)
    first = [r for r in result['records'] if r['size'] == '56x40']
    assert [r['status'] for r in first] == ['ok', 'ok']
    assert all(r['peak_mem_mb'] > 0 and r['gflops_achieved'] > 0 for r in first)
    later = [r for r in result['records'] if r['size'] == '64x64']
    assert [r['status'] for r in later] == ['skipped: too slow'] * 2
    assert 'skipped: too slow' in summarise(result)


def test_whole_model_mode_from_a_config(tmp_path):
    pytest.importorskip('mmdet')
    tool = runpy.run_path(str(ROOT / 'tools' / 'benchmark.py'))
    config = str(ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py')
    argv = ['--config', config, '--sizes', '128x96', '--repeats', '1', '--warmup', '1']
    result = tool['main']([*argv, '--out', str(tmp_path)])
    (record,) = result['records']
    assert record['model'] == f'config:{config}' and record['status'] == 'ok'
    backbone = mlla_macs(64, (2, 4, 8, 4), (2, 4, 8, 16), 96, 128)
    # the whole detector: backbone, FPN, RPN and RoI heads
    assert record['gmacs'] * 1e9 > 2 * backbone['total']
    assert record['gmacs_by_kind']['attention'] * 1e9 == pytest.approx(backbone['attention'])
    assert record['params'] > 25e6  # MLLA-T (23.9M) and the detector's neck and heads


def test_bf16_model_run_reports_machine_and_kernels(monkeypatch):
    """``dtype='bf16-model'`` casts the model and the input; the output names the machine, its
    CPU flags and the oneDNN kernels the MLLA model ran (parsed from oneDNN's verbose lines)."""
    from mlla_mm.analysis.benchmark import backbone_ops

    caps = getattr(backbone_ops(), 'CAPS', None)
    monkeypatch.setitem(PEERS, 'mlla_tiny', ('MLLA tiny widths', lambda: MLLA(arch=TINY)))
    cfg = BenchConfig(
        models=['mlla_tiny'], sizes=[(48, 64)], dtype='bf16-model', warmup=1, repeats=1,
        flops=False, memory=False, baseline=None,
    )  # fmt: skip
    result = run_benchmark(cfg, log=lambda *a: None)
    (record,) = result['records']
    assert record['status'] == 'ok' and record['dtype'] == 'bf16-model'
    env = result['env']
    if caps is not None:
        assert env['cpu_capabilities'] == caps.describe()
    text = summarise(result)
    assert 'bf16-model matmul rate' in text and 'machine:' in text and 'CPU flags:' in text
    if caps is not None and caps.onednn:
        kernels = env['kernels']['kernels']
        assert env['kernels']['model'] == 'mlla_tiny' and sum(kernels.values()) > 10
        assert any(k.startswith('inner_product:') for k in kernels)  # the fused linears
        if caps.bf16:  # bf16 kernels: AMX or AVX512-BF16 instructions
            assert any('amx' in k or 'bf16' in k for k in kernels), kernels
        assert 'oneDNN kernels run by mlla_tiny' in text


def test_part_times_cover_the_backbone():
    from mlla_mm.analysis.benchmark import part_times

    model = MLLA(arch=TINY)
    x = torch.randn(1, 3, 64, 96)
    result = part_times(model, x, 'bf16', repeats=1)
    parts = result['parts']
    assert list(parts) == [
        'stem', 'stage0 blocks', 'merge0', 'stage1 blocks', 'merge1', 'stage2 blocks', 'merge2',
        'stage3 blocks',
    ]  # fmt: skip
    assert all(p['ms'] > 0 and p['matmul_fraction'] > 0 for p in parts.values())
    expected = mlla_macs(**TINY, height=64, width=96)['total']
    assert sum(p['gmacs'] for p in parts.values()) * 1e9 == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
def test_dense_layers_alone_are_replayed(dtype):
    """dense_gemm_time replays each linear and dense conv the model ran (no depthwise conv, no
    attention product): their MACs are the model's minus those, counted independently."""
    from mlla_mm.analysis.benchmark import dense_gemm_time

    model = MLLA(arch=TINY)
    x = torch.randn(1, 3, 64, 96)
    result = dense_gemm_time(model, x, dtype, repeats=1)
    macs = mlla_macs(**TINY, height=64, width=96)  # conv: the stem's and the depthwise ones
    assert macs['linear'] < result['gmacs'] * 1e9 < macs['linear'] + macs['conv']
    assert result['calls'] >= 6 * sum(TINY['depths']) + 2 * 3 + 4  # blocks, mergings, stem
    assert result['ms'] > 0 and result['matmul_gflops'] > 0


@pytest.mark.parametrize(
    ('mode', 'tunables', 'on'),
    [
        ('always [madvise] never', 'glibc.malloc.hugetlb=1', True),
        ('always [madvise] never', 'glibc.malloc.check=0', False),
        ('[always] madvise never', '', True),
        ('always madvise [never]', 'glibc.malloc.hugetlb=1', False),
    ],
)
def test_huge_pages_setting_is_reported(tmp_path, mode, tunables, on):
    """The benchmark says whether large allocations get transparent huge pages, and how to turn
    them on where the kernel leaves it to malloc (docs/performance.md)."""
    thp = tmp_path / 'enabled'
    thp.write_text(mode + '\n')
    pages = huge_pages({'GLIBC_TUNABLES': tunables}, str(thp))
    assert pages['on'] is on and pages['thp'] == mode.split('[')[1].split(']')[0]
    (line,) = [ln for ln in machine_lines({'huge_pages': pages}) if ln.startswith('huge pages')]
    state = 'on' if on else 'off' if pages['thp'] == 'madvise' else 'unavailable'
    assert line.startswith(f'huge pages for large allocations: {state}')
    if state == 'off':
        assert f'GLIBC_TUNABLES={HUGE_PAGES_TUNABLE}' in line
    assert huge_pages({}, str(tmp_path / 'missing'))['thp'] is None


def _glibc() -> tuple:
    name, version = platform.libc_ver()
    return tuple(int(p) for p in version.split('.')[:2]) if name == 'glibc' and version else (0,)


_TOUCH = """
import resource, torch
x = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MiB, mapped afresh by malloc
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x.fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    huge_pages()['thp'] != 'madvise' or _glibc() < (2, 35),
    reason='needs the kernel THP mode madvise and glibc >= 2.35',
)
def test_the_documented_tunable_gives_torch_tensors_huge_pages():
    """``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (docs/performance.md): a fresh 64 MiB tensor
    is faulted in 2 MiB pages (32 faults) instead of 4 KiB ones (16384)."""

    def faults(tunables: str) -> int:
        env = dict(os.environ, GLIBC_TUNABLES=tunables, OMP_NUM_THREADS='1')
        out = subprocess.run(
            [sys.executable, '-c', _TOUCH], env=env, capture_output=True, text=True, check=True
        )
        return int(out.stdout)

    plain, huge = faults(''), faults(HUGE_PAGES_TUNABLE)
    assert plain > 8000 and huge < plain / 4, (plain, huge)
