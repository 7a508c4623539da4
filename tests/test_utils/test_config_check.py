"""The checks tools/train.py and tools/test.py run before building (mlla_mm.utils.config_check)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mmengine.config import Config

pytest.importorskip('mmdet')

from utils_helpers import toy_cfg  # noqa: E402

from mlla_mm.utils.config_check import config_problems, validate_config  # noqa: E402
from mlla_mm.utils.errors import ConfigCheckError  # noqa: E402
from mlla_mm.utils.scope import setup_scope  # noqa: E402

ROOT = Path(__file__).parents[2]
TOY = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'


def test_a_good_config_passes(toy_root):
    cfg = toy_cfg(toy_root)
    assert setup_scope(cfg) == 'mmdet'
    validate_config(cfg)


def test_missing_dataset_folder(toy_root, tmp_path):
    cfg = toy_cfg(toy_root)
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'no_such_coco')
    with pytest.raises(
        ConfigCheckError,
        match=r'train_dataloader\.dataset\.data_root.*no_such_coco.*does not exist',
    ):
        validate_config(cfg)
    # The val split is not checked when training without validation
    cfg = toy_cfg(toy_root)
    cfg.val_dataloader.dataset.data_root = str(tmp_path / 'no_such_coco')
    with pytest.raises(ConfigCheckError, match='val_dataloader'):
        validate_config(cfg, phases=('train', 'val'))
    validate_config(cfg, phases=('train', 'test'))


@pytest.mark.parametrize(
    'content,match',
    [
        ('not json at all', 'is not JSON'),
        ('[1, 2, 3]', 'holds a list, not an object'),
        (json.dumps({'images': [], 'annotations': []}), r"no list \['categories'\]"),
        (
            json.dumps(
                {'images': [{'id': 1, 'path': 'a.png'}], 'annotations': [], 'categories': []}
            ),
            r"first entry of \"images\".*lacks \['file_name', 'height', 'width'\]",
        ),
        (
            json.dumps({'images': [], 'annotations': [], 'categories': [{'id': 1, 'name': 'cat'}]}),
            r"none of the config classes \('circle', 'square', 'triangle'\)",
        ),
    ],
)
def test_malformed_annotation_file(toy_root, tmp_path, content, match):
    bad = tmp_path / 'instances_bad.json'
    bad.write_text(content)
    cfg = toy_cfg(toy_root)
    cfg.train_dataloader.dataset.ann_file = str(bad)
    with pytest.raises(ConfigCheckError, match=match) as err:
        validate_config(cfg)
    assert 'train_dataloader.dataset.ann_file' in str(err.value) and str(bad) in str(err.value)


def test_dataset_wrappers_are_looked_into(toy_root, tmp_path):
    cfg = toy_cfg(toy_root)
    inner = cfg.train_dataloader.dataset
    inner.ann_file = str(tmp_path / 'missing.json')
    cfg.train_dataloader.dataset = dict(type='RepeatDataset', times=3, dataset=inner)
    with pytest.raises(ConfigCheckError, match=r'train_dataloader\.dataset\.dataset\.ann_file'):
        validate_config(cfg)


def test_unknown_arch_and_missing_pretrained_file(toy_root):
    cfg = toy_cfg(toy_root)
    cfg.model.backbone.arch = 'huge'
    with pytest.raises(
        ConfigCheckError, match=r"model\.backbone\.arch: Unknown MLLA arch 'huge'.*'tiny'"
    ):
        validate_config(cfg)
    cfg.model.backbone.arch = dict(embed_dims=32, depths=(1, 1, 1))
    with pytest.raises(ConfigCheckError, match='num_heads'):
        validate_config(cfg)
    cfg = toy_cfg(toy_root)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint='checkpoints/nothing.pth')
    with pytest.raises(
        ConfigCheckError, match=r'init_cfg\.checkpoint.*nothing\.pth.*does not exist'
    ):
        validate_config(cfg)
    # the list form of init_cfg too (mmengine applies every entry)
    cfg.model.backbone.init_cfg = [
        dict(type='Constant', val=1.0, layer='LayerNorm'),
        dict(type='Pretrained', checkpoint='checkpoints/nothing.pth'),
    ]
    with pytest.raises(
        ConfigCheckError, match=r'init_cfg\.checkpoint.*nothing\.pth.*does not exist'
    ):
        validate_config(cfg)


@pytest.mark.slow
def test_train_tool_fails_fast_with_the_config_key(toy_root, tmp_path):
    """Through tools/train.py: a clear message and exit status before any model is built."""
    work = tmp_path / 'work'
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            'tools/train.py',
            str(TOY),
            '--work-dir',
            str(work),
            '--cfg-options',
            'model.backbone.arch=huge',
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "model.backbone.arch: Unknown MLLA arch 'huge'" in proc.stderr
    assert 'Traceback' not in proc.stderr and not work.exists()
    assert time.monotonic() - start < 60


# ------------------------------------------------------------------------------------------
# All problems at once, the right fix for each, relative paths, unscoped types
# ------------------------------------------------------------------------------------------
def test_every_problem_is_reported_at_once(toy_root, tmp_path):
    cfg = toy_cfg(toy_root)
    cfg.model.backbone.arch = 'huge'
    cfg.train_dataloader.dataset.ann_file = 'annotations/missing_train.json'
    cfg.val_dataloader.dataset.data_prefix = dict(img='no_val_images/')
    cfg.val_evaluator.ann_file = str(tmp_path / 'missing_val.json')
    with pytest.raises(ConfigCheckError) as err:
        validate_config(cfg, phases=('train', 'val'))
    problems = err.value.problems
    assert len(problems) == 4, problems
    text = str(err.value)
    assert text.startswith('4 problems:')
    for key in (
        'model.backbone.arch',
        'train_dataloader.dataset.ann_file',
        'val_dataloader.dataset.data_prefix.img',
        'val_evaluator.ann_file',
    ):
        assert sum(p.startswith(key) for p in problems) == 1, (key, problems)


def test_each_problem_names_its_own_fix(toy_root):
    cfg = toy_cfg(toy_root)
    cfg.train_dataloader.dataset.ann_file = 'annotations/missing_train.json'
    (problem,) = config_problems(cfg, phases=('train',))
    # The data root exists: the fix is the annotation file, not data_root.
    assert '--cfg-options train_dataloader.dataset.ann_file=FILE' in problem
    assert 'data_root=PATH' not in problem
    assert f"relative to train_dataloader.dataset.data_root='{toy_root}/'" in problem
    cfg = toy_cfg(toy_root)
    cfg.train_dataloader.dataset.data_prefix = dict(img='nothing/')
    (problem,) = config_problems(cfg, phases=('train',))
    assert '--cfg-options train_dataloader.dataset.data_prefix.img=FOLDER' in problem
    # A missing data root is one problem (not one more per path below it), with its own fix.
    cfg = toy_cfg(toy_root)
    cfg.train_dataloader.dataset.data_root = '/no/such/root/'
    (problem,) = config_problems(cfg, phases=('train',))
    assert '--cfg-options train_dataloader.dataset.data_root=PATH' in problem


def test_relative_paths_say_what_they_resolve_to(toy_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = toy_cfg(toy_root)
    cfg.train_dataloader.dataset.data_root = 'data/my_coco/'
    (problem,) = config_problems(cfg, phases=('train',))
    resolved = str(tmp_path / 'data' / 'my_coco')
    assert f"'data/my_coco/' (relative to the current folder: {resolved}" in problem
    cfg = toy_cfg(toy_root)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint='checkpoints/MLLA_T.pth')
    (problem,) = config_problems(cfg, phases=('train',))
    assert str(tmp_path / 'checkpoints' / 'MLLA_T.pth') in problem
    # absolute paths are shown as they are
    cfg.model.backbone.init_cfg.checkpoint = '/abs/MLLA_T.pth'
    (problem,) = config_problems(cfg, phases=('train',))
    assert "'/abs/MLLA_T.pth' does not exist" in problem


@pytest.mark.parametrize('config', ['mask_rcnn_mlla_t_toy.py', 'upernet_mlla_t_toy.py'])
def test_unscoped_mlla_type_is_refused_before_building(config):
    pytest.importorskip('mmseg')
    cfg = Config.fromfile(str(ROOT / 'configs' / 'toy' / config))
    scope = setup_scope(cfg)
    cfg.model.backbone.type = 'MLLA'
    problems = config_problems(cfg, phases=('test',))
    (problem,) = [p for p in problems if p.startswith('model.backbone.type')]
    assert f"'MLLA' without a scope is not in the {scope} model registry" in problem
    assert "write type='mlla_mm.MLLA'" in problem
    # ... which is what the library would otherwise fail with, after loading everything
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    with pytest.raises(KeyError, match='not in the'):
        registry.build(dict(type='MLLA'))
    cfg.model.backbone.type = 'mlla_mm.MLLA'
    assert not [p for p in config_problems(cfg, phases=('test',)) if 'backbone.type' in p]


def test_unknown_loop_keys_name_the_valid_ones(toy_root):
    """``--cfg-options train_cfg.max_iter=2`` (mmengine's key is ``max_iters``): mmengine would
    fail in the loop's constructor once the model is built, with a TypeError traceback."""
    cfg = toy_cfg(toy_root)
    setup_scope(cfg)
    cfg.merge_from_dict({'train_cfg.max_iter': 2, 'test_cfg.fp61': True, 'val_cfg.zzz': 1})
    problems = config_problems(cfg, ('train', 'val'))
    assert problems == [
        "train_cfg.max_iter: IterBasedTrainLoop takes no argument 'max_iter'; did you mean "
        'train_cfg.max_iters? it takes max_iters, val_begin, val_interval, dynamic_intervals '
        '(--cfg-options train_cfg.KEY=VALUE)',
        "val_cfg.zzz: ValLoop takes no argument 'zzz'; it takes fp16 "
        '(--cfg-options val_cfg.KEY=VALUE)',
    ]
    assert any('test_cfg.fp61' in p and 'did you mean test_cfg.fp16' in p
               for p in config_problems(cfg, ('test',)))  # fmt: skip
    # an epoch-based loop, and a loop given by type
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, max_epoch=2)
    assert 'did you mean train_cfg.max_epochs?' in config_problems(cfg, ('train',))[0]
    cfg.train_cfg = dict(by_epoch=True, max_epochs=1)
    assert config_problems(cfg, ('train',)) == []


def test_train_tool_reports_a_loop_key_typo_in_one_line(toy_root, tmp_path):
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / 'tools' / 'train.py'), str(TOY), '--work-dir',
            str(tmp_path / 'w'), '--cfg-options', 'train_cfg.max_iter=2',
            *(f'{loader}.dataset.data_root={toy_root}/' for loader in
              ('train_dataloader', 'val_dataloader', 'test_dataloader')),
            *(f'{ev}.ann_file={toy_root}/annotations/instances_val.json' for ev in
              ('val_evaluator', 'test_evaluator')),
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if 'error' in ln]
    assert "error: train_cfg.max_iter: IterBasedTrainLoop takes no argument 'max_iter'" in line
    assert 'did you mean train_cfg.max_iters?' in line and 'Traceback' not in proc.stderr
