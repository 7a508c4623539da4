"""``mlla-make-toy {coco,ade20k} DIR`` and ``python -m mlla_mm.datasets``: the toy sets without a
checkout (tools/misc is not in a wheel's PATH)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlla_mm import cli

ROOT = Path(__file__).parents[2]


def test_command_writes_each_toy_set(tmp_path, capsys):
    cli.make_toy(['coco', str(tmp_path / 'coco'), '--num-train', '2', '--num-val', '1'])
    ann = json.loads((tmp_path / 'coco' / 'annotations' / 'instances_val.json').read_text())
    assert len(ann['images']) == 1 and 'toy COCO' in capsys.readouterr().out
    cli.make_toy(['ade20k', str(tmp_path / 'ade'), '--num-train', '2', '--num-val', '1'])
    assert len(list((tmp_path / 'ade' / 'annotations' / 'validation').glob('*.png'))) == 1
    with pytest.raises(SystemExit) as stop:
        cli.make_toy([])  # which set: a usage error, not silence
    assert stop.value.code == 2
    assert 'coco,ade20k' in capsys.readouterr().err


@pytest.mark.parametrize('module', ['mlla_mm.datasets', 'mlla_mm.datasets.toy_coco'])
def test_python_m_writes_the_set(tmp_path, module):
    args = ['coco'] if module == 'mlla_mm.datasets' else []
    out = tmp_path / 'toy'
    proc = subprocess.run(
        [sys.executable, '-m', module, *args, str(out), '--num-train', '1', '--num-val', '1'],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / 'annotations' / 'instances_train.json').is_file()


def test_missing_data_hints_name_the_command_and_imagenet_its_own():
    pytest.importorskip('mmdet')
    from mmengine.config import Config

    from mlla_mm.utils.config_check import config_problems

    toy = Config.fromfile(str(ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'))
    toy.train_dataloader.dataset.data_root = 'no/such/toy_coco/'
    (problem,) = [p for p in config_problems(toy, ('train',)) if 'train_dataloader' in p]
    assert '`mlla-make-toy coco no/such/toy_coco/`' in problem and 'tools/misc' not in problem
    seg = Config.fromfile(str(ROOT / 'configs' / 'toy' / 'upernet_mlla_t_toy.py'))
    seg.train_dataloader.dataset.data_root = 'nowhere/'
    assert any('mlla-make-toy ade20k' in p for p in config_problems(seg, ('train',)))
    pytest.importorskip('mmpretrain')
    in1k = Config.fromfile(str(ROOT / 'configs' / 'mlla_t_in1k.py'))
    problems = config_problems(in1k, ('train', 'val'))
    assert problems and all('ImageNet' in p for p in problems if 'data_root' in p)
    assert not any('coco' in p.lower() or 'mlla-make-toy' in p for p in problems)
