"""The checks tools/train.py and tools/test.py run before building anything (tools_utils)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

pytest.importorskip('mmdet')

from mlla_mm.utils.config_check import (  # noqa: E402
    DEFAULT_THREADS,
    ConfigCheckError,
    ConsoleFilter,
    checkpoint_problems,
    config_problems,
    configure_train,
    quiet_console,
    setup_scope,
    setup_threads,
    user_errors,
    validate_config,
)
from mlla_mm.datasets.toy_coco import make_toy_coco  # noqa: E402

ROOT = Path(__file__).parents[2]
TOY = ROOT / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py'


@pytest.fixture(scope='module')
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('toy')
    make_toy_coco(root, num_train=2, num_val=2, size=64)
    return root


def _toy_cfg(root: Path) -> Config:
    """The toy config pointed at ``root``, as a user would with --cfg-options."""
    cfg = Config.fromfile(str(TOY))
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = f'{root}/'
    for ev in ('val_evaluator', 'test_evaluator'):
        cfg[ev].ann_file = f'{root}/annotations/instances_val.json'
    return cfg


def test_a_good_config_passes(toy_root):
    cfg = _toy_cfg(toy_root)
    assert setup_scope(cfg) == 'mmdet'
    validate_config(cfg)


def test_missing_dataset_folder(toy_root, tmp_path):
    cfg = _toy_cfg(toy_root)
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'no_such_coco')
    with pytest.raises(
        ConfigCheckError,
        match=r'train_dataloader\.dataset\.data_root.*no_such_coco.*does not exist',
    ):
        validate_config(cfg)
    # The val split is not checked when training without validation
    cfg = _toy_cfg(toy_root)
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
    cfg = _toy_cfg(toy_root)
    cfg.train_dataloader.dataset.ann_file = str(bad)
    with pytest.raises(ConfigCheckError, match=match) as err:
        validate_config(cfg)
    assert 'train_dataloader.dataset.ann_file' in str(err.value) and str(bad) in str(err.value)


def test_dataset_wrappers_are_looked_into(toy_root, tmp_path):
    cfg = _toy_cfg(toy_root)
    inner = cfg.train_dataloader.dataset
    inner.ann_file = str(tmp_path / 'missing.json')
    cfg.train_dataloader.dataset = dict(type='RepeatDataset', times=3, dataset=inner)
    with pytest.raises(ConfigCheckError, match=r'train_dataloader\.dataset\.dataset\.ann_file'):
        validate_config(cfg)


def test_unknown_arch_and_missing_pretrained_file(toy_root):
    cfg = _toy_cfg(toy_root)
    cfg.model.backbone.arch = 'huge'
    with pytest.raises(
        ConfigCheckError, match=r"model\.backbone\.arch: Unknown MLLA arch 'huge'.*'tiny'"
    ):
        validate_config(cfg)
    cfg.model.backbone.arch = dict(embed_dims=32, depths=(1, 1, 1))
    with pytest.raises(ConfigCheckError, match='num_heads'):
        validate_config(cfg)
    cfg = _toy_cfg(toy_root)
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


def test_amp_needs_cuda_and_resume_needs_a_file(toy_root, tmp_path):
    import torch

    args = Namespace(
        launcher='none', work_dir=str(tmp_path), amp=True, auto_scale_lr=False, resume=None
    )
    cfg = _toy_cfg(toy_root)
    if torch.cuda.is_available():
        configure_train(cfg, args)
        assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    else:
        with pytest.raises(ConfigCheckError, match='--amp'):
            configure_train(cfg, args)
    args.amp, args.resume = False, str(tmp_path / 'iter_9.pth')
    with pytest.raises(ConfigCheckError, match='iter_9.pth'):
        configure_train(cfg, args)
    args.resume = 'auto'
    configure_train(cfg, args)
    assert cfg.resume is True and cfg.load_from is None and cfg.work_dir == str(tmp_path)


def test_amp_config_on_the_cpu_fails_before_building(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip('checks the CPU message')
    cfg = Config.fromfile(str(ROOT / 'configs' / 'mask_rcnn_mlla_t_amp.py'))
    args = Namespace(
        launcher='none', work_dir=str(tmp_path), amp=False, auto_scale_lr=False, resume=None
    )
    with pytest.raises(ConfigCheckError, match='optim_wrapper.type=AmpOptimWrapper.*CUDA'):
        configure_train(cfg, args)


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
    cfg = _toy_cfg(toy_root)
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
    cfg = _toy_cfg(toy_root)
    cfg.train_dataloader.dataset.ann_file = 'annotations/missing_train.json'
    (problem,) = config_problems(cfg, phases=('train',))
    # The data root exists: the fix is the annotation file, not data_root.
    assert '--cfg-options train_dataloader.dataset.ann_file=FILE' in problem
    assert 'data_root=PATH' not in problem
    assert f"relative to train_dataloader.dataset.data_root='{toy_root}/'" in problem
    cfg = _toy_cfg(toy_root)
    cfg.train_dataloader.dataset.data_prefix = dict(img='nothing/')
    (problem,) = config_problems(cfg, phases=('train',))
    assert '--cfg-options train_dataloader.dataset.data_prefix.img=FOLDER' in problem
    # A missing data root is one problem (not one more per path below it), with its own fix.
    cfg = _toy_cfg(toy_root)
    cfg.train_dataloader.dataset.data_root = '/no/such/root/'
    (problem,) = config_problems(cfg, phases=('train',))
    assert '--cfg-options train_dataloader.dataset.data_root=PATH' in problem


def test_relative_paths_say_what_they_resolve_to(toy_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _toy_cfg(toy_root)
    cfg.train_dataloader.dataset.data_root = 'data/my_coco/'
    (problem,) = config_problems(cfg, phases=('train',))
    resolved = str(tmp_path / 'data' / 'my_coco')
    assert f"'data/my_coco/' (relative to the current folder: {resolved}" in problem
    cfg = _toy_cfg(toy_root)
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


# ------------------------------------------------------------------------------------------
# A checkpoint against the model (tools/test.py refuses one that lacks part of the model)
# ------------------------------------------------------------------------------------------
def _tiny_model(config: str):
    cfg = Config.fromfile(str(ROOT / 'configs' / 'toy' / config))
    scope = setup_scope(cfg)
    cfg.model.backbone.arch = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    if scope == 'mmdet':
        cfg.model.neck.in_channels = [16, 32, 64, 128]
    else:
        cfg.model.decode_head.in_channels = [16, 32, 64, 128]
        cfg.model.auxiliary_head.in_channels = 64
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    return registry.build(cfg.model)


def test_checkpoint_problems_name_the_missing_heads():
    pytest.importorskip('mmseg')
    det, seg = _tiny_model('mask_rcnn_mlla_t_toy.py'), _tiny_model('upernet_mlla_t_toy.py')
    assert checkpoint_problems(seg, seg.state_dict()) == []
    # DDP / runner checkpoints may prefix every key with 'module.'
    assert checkpoint_problems(seg, {f'module.{k}': v for k, v in seg.state_dict().items()}) == []
    (problem,) = checkpoint_problems(seg, det.state_dict())
    assert 'decode_head.* (' in problem and 'auxiliary_head.* (' in problem
    assert 'backbone' not in problem.split('; it holds')[0]  # the backbone is there
    assert 'roi_head.*' in problem.split('; it holds')[1]  # a hint to the checkpoint's origin
    state = seg.state_dict()
    state['decode_head.conv_seg.weight'] = state['decode_head.conv_seg.weight'][:2]
    (problem,) = checkpoint_problems(seg, state)
    assert 'decode_head.conv_seg.weight: (2, 128, 1, 1) in the checkpoint, (4, 128' in problem


# ------------------------------------------------------------------------------------------
# Threads, console output and errors of the tools
# ------------------------------------------------------------------------------------------
def test_setup_threads(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
        torch.set_num_threads(2)
        assert setup_threads(None) == DEFAULT_THREADS == 1  # the documented default
        assert setup_threads(2) == 2
        monkeypatch.setenv('OMP_NUM_THREADS', '1')
        torch.set_num_threads(2)
        assert setup_threads(None) == 2  # OMP_NUM_THREADS set: torch's own setting is kept
        with pytest.raises(ConfigCheckError, match='--threads 0'):
            setup_threads(0)
    finally:
        torch.set_num_threads(before)


def test_console_filter_keeps_details_in_the_log_file(tmp_path):
    import io
    import logging

    logger = logging.getLogger('mlla_mm_test_console_filter')
    logger.setLevel(logging.INFO)
    console, log_file = io.StringIO(), tmp_path / 'run.log'
    logger.handlers = [logging.StreamHandler(console), logging.FileHandler(log_file)]
    quiet_console(logger)
    quiet_console(logger)  # idempotent
    logger.info('Config:\nmodel = dict(...)')
    logger.info('paramwise_options -- backbone.norm0.weight:weight_decay=0.0')
    logger.info('Iter(train) [10/250]  lr: 2.0e-04  loss: 1.2')
    logger.warning('Config: a warning always shows')
    for h in logger.handlers:
        h.flush()
    shown = console.getvalue().splitlines()
    assert shown == [
        'Iter(train) [10/250]  lr: 2.0e-04  loss: 1.2',
        'Config: a warning always shows',
    ]
    kept = log_file.read_text()
    assert 'model = dict' in kept and 'paramwise_options' in kept
    assert sum(isinstance(f, ConsoleFilter) for f in logger.handlers[0].filters) == 1


def test_user_errors_print_one_message_and_exit_2(capsys, monkeypatch):
    from mlla_mm.utils.safe_load import CheckpointFileError

    monkeypatch.delenv('MLLA_MM_DEBUG', raising=False)
    for error in (
        ConfigCheckError(['first problem', 'second problem']),
        CheckpointFileError("Checkpoint 'x.pth' is corrupt or truncated"),
        FileNotFoundError("image 'a.png' does not exist"),
    ):
        with pytest.raises(SystemExit) as stop, user_errors('tools/x.py'):
            raise error
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith('tools/x.py: error: ') and 'Traceback' not in err
    with pytest.raises(ConfigCheckError), user_errors('tools/x.py', debug=True):
        raise ConfigCheckError('shown with its traceback')
    monkeypatch.setenv('MLLA_MM_DEBUG', '1')
    with pytest.raises(ConfigCheckError), user_errors('tools/x.py'):
        raise ConfigCheckError('shown with its traceback')
    with pytest.raises(RuntimeError), user_errors('tools/x.py'):
        raise RuntimeError('a bug keeps its traceback')


_RANK_SCRIPT = """
import atexit, sys
import torch, torch.distributed as dist
from mlla_mm.utils.config_check import end_distributed_process
t = torch.ones(3)
if sys.argv[2] == 'distributed':
    dist.init_process_group('gloo', init_method=f'file://{sys.argv[3]}', rank=0, world_size=1)
    dist.all_reduce(t)
atexit.register(lambda: open(sys.argv[1], 'w').write('exit handlers ran'))
print('sum', float(t.sum()), end='')  # no newline: the flush at the end must send it
end_distributed_process()
raise SystemExit(3)  # reached only outside a distributed run
"""


@pytest.mark.parametrize('run', ['distributed', 'single'])
def test_a_finished_rank_runs_its_exit_handlers_and_leaves_with_status_0(tmp_path, run):
    """A distributed tool run ends in end_distributed_process once its work is done: exit
    handlers run (log files), the console is flushed, and the process group's teardown and the
    interpreter's finalisation, where gloo's threads could abort a finished rank (SIGABRT), are
    skipped. Outside a distributed run (or a tool's main() called in-process) it does nothing."""
    marker = tmp_path / 'atexit.txt'
    proc = subprocess.run(
        [sys.executable, '-c', _RANK_SCRIPT, str(marker), run, str(tmp_path / 'store')],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == (0 if run == 'distributed' else 3), proc.stderr[-3000:]
    assert proc.stdout == 'sum 3.0'
    assert marker.read_text() == 'exit handlers ran'


def test_cpu_launcher_other_than_pytorch_is_refused_even_with_a_console_without_file(monkeypatch):
    """``--launcher slurm|mpi`` needs CUDA on this path, and says so; turning on faulthandler for
    distributed runs must not fail first where stderr has no file (a notebook, a capture)."""
    import io

    from mlla_mm.utils.config_check import setup_cpu_distributed

    if torch.cuda.is_available():
        pytest.skip('with CUDA mmengine starts the process group')
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    with pytest.raises(
        ConfigCheckError, match='--launcher slurm needs CUDA here.*--launcher pytorch'
    ):
        setup_cpu_distributed(Config(), 'slurm')
