"""Packaging: configs and tools inside the package, ``mlla_mm::`` inheritance, console commands,
and which copy of mlla_mm Python imports (checkout folder in the current directory, tools of
another checkout). The slow test builds the wheel and installs it into a fresh venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from mlla_mm import cli
from mlla_mm.utils import resources

ROOT = Path(__file__).resolve().parents[1]
# What setup.py needs to build the wheel (copied: a build writes build/ into its source folder).
BUILD_INPUTS = ('setup.py', 'pyproject.toml', 'README.md', 'MANIFEST.in', 'mlla_mm', 'configs',
                'tools')  # fmt: skip
COMMANDS = ('mlla-train', 'mlla-test', 'mlla-demo', 'mlla-benchmark', 'mlla-export-onnx',
            'mlla-convert', 'mlla-configs', 'mlla-make-toy')  # fmt: skip

USER_CONFIG = """\
_base_ = 'mlla_mm::{name}'
model = dict(backbone=dict(drop_path_rate=0.3))
"""


def _installed() -> bool:
    try:
        metadata.distribution('mlla_mm')
    except metadata.PackageNotFoundError:
        return False
    return True


# These start Python without PYTHONPATH: they are about how an installed mlla_mm is found.
needs_install = pytest.mark.skipif(
    not _installed(), reason='mlla_mm is not installed in this interpreter (pip install -e .)'
)


def _scopes(node) -> set:
    """All ``_scope_`` values in a (nested) config dict."""
    found = set()
    if isinstance(node, dict):
        if '_scope_' in node:
            found.add(node['_scope_'])
        for value in node.values():
            found |= _scopes(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            found |= _scopes(value)
    return found


def _run(args, cwd, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONNOUSERSITE': '1'}
    env.pop('PYTHONPATH', None)
    out = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs
    )
    return out


# -- mlla_mm:: inheritance and the shipped files (in this interpreter) ---------------------------


def test_shipped_configs_and_tools_are_found():
    names = resources.list_configs()
    assert 'mask_rcnn_mlla_t.py' in names and 'toy/mask_rcnn_mlla_t_toy.py' in names
    assert (resources.tools_dir() / 'train.py').is_file()
    for script in cli.TOOLS.values():
        assert (resources.tools_dir() / script).is_file(), script
    assert resources.config_path('mlla_mm::upernet_mlla_t') == resources.config_dir() / (
        'upernet_mlla_t.py'
    )


@pytest.mark.parametrize('bad', ['nope.py', 'mlla_mm::nope.py', '../setup.py', 'toy'])
def test_unknown_config_lists_the_shipped_ones(bad):
    with pytest.raises(FileNotFoundError, match=r'ships no config .*mask_rcnn_mlla_t\.py'):
        resources.config_path(bad)


def test_user_config_inherits_a_shipped_config(tmp_path, monkeypatch):
    pytest.importorskip('mmdet')
    from mmengine.config import Config

    monkeypatch.chdir(tmp_path)
    for name in ('mask_rcnn_mlla_t.py', 'toy/mask_rcnn_mlla_t_toy.py'):
        user = tmp_path / 'my_config.py'
        user.write_text(USER_CONFIG.format(name=name))
        cfg = Config.fromfile(user)
        direct = Config.fromfile(resources.config_path(name))
        assert cfg.model.backbone.type == 'mlla_mm.MLLA'
        assert cfg.model.backbone.arch == 'tiny'
        assert cfg.model.backbone.drop_path_rate == 0.3
        # The same as inheriting by file path: mmdet's parts keep their scope, none is mlla_mm.
        assert _scopes(cfg.to_dict()) == _scopes(direct.to_dict()) == {'mmdet'}
        assert cfg.train_dataloader == direct.train_dataloader
    # Other prefixes are mmengine's business, unchanged.
    user.write_text("_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'\n")
    assert Config.fromfile(user).model.backbone.type == 'ResNet'
    user.write_text("_base_ = 'mlla_mm::mask_rcnn_mlla_x.py'\n")
    with pytest.raises(FileNotFoundError, match='ships no config'):
        Config.fromfile(user)


def test_commands_map_the_prefix_and_run_the_tool_scripts(monkeypatch, capsys):
    seen = {}

    def fake_run_script(script, argv):
        seen.update(script=script, argv=argv)

    monkeypatch.setattr(cli, '_run_script', fake_run_script)
    cli.train(['mlla_mm::toy/mask_rcnn_mlla_t_toy.py', '--work-dir', 'w'])
    assert seen['script'] == resources.tools_dir() / 'train.py'
    toy = str(resources.config_path('toy/mask_rcnn_mlla_t_toy.py'))
    assert seen['argv'] == ['mlla-train', toy, '--work-dir', 'w']
    cli.export_onnx(['--config=mlla_mm::upernet_mlla_t', '--out', 'a=mlla_mm::b'])
    assert seen['script'] == resources.tools_dir() / 'deployment' / 'export_onnx.py'
    upernet = resources.config_path('upernet_mlla_t.py')
    assert seen['argv'] == ['mlla-export-onnx', f'--config={upernet}', '--out', 'a=mlla_mm::b']

    monkeypatch.undo()
    main, argv = sys.modules['__main__'], sys.argv
    with pytest.raises(SystemExit) as exit_info:
        cli.convert(['--help'])  # the real script, as __main__
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith('usage: mlla-convert')
    assert (sys.modules['__main__'], sys.argv) == (main, argv)  # restored
    cli.configs([])
    assert 'toy/upernet_mlla_t_toy.py' in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit, match='no tool'):
        cli.main(['nope'])
    with pytest.raises(SystemExit) as exit_info:
        cli.test(['mlla_mm::x', 'ckpt.pth'])
    assert exit_info.value.code == 2  # a user error, as in the tools
    assert "mlla-test: error: mlla_mm ships no config 'mlla_mm::x'" in capsys.readouterr().err


# -- which mlla_mm Python imports --------------------------------------------------------------


@needs_install
def test_checkout_folder_in_the_current_directory_does_not_shadow_the_package(tmp_path):
    # A clone named mlla_mm, Python started from its parent: the folder has no __init__.py, so
    # Python would take it as an empty namespace package if the install cannot outrank it.
    clone = tmp_path / 'mlla_mm'
    (clone / 'configs').mkdir(parents=True)
    (clone / 'setup.py').write_text('')
    out = _run([sys.executable, '-c', 'import mlla_mm; print(mlla_mm.__file__)'], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == resources.PACKAGE_DIR / '__init__.py'


@needs_install
def test_tool_of_another_checkout_fails_clearly(tmp_path):
    other = tmp_path / 'other_checkout'
    (other / 'mlla_mm').mkdir(parents=True)
    (other / 'mlla_mm' / '__init__.py').write_text('')
    (other / 'setup.py').write_text('')
    (other / 'tools' / 'misc').mkdir(parents=True)
    (other / 'tools' / 'misc' / 'tool.py').write_text('import mlla_mm\n')
    out = _run([sys.executable, other / 'tools' / 'misc' / 'tool.py'], cwd=tmp_path)
    assert out.returncode != 0
    assert f'belongs to the checkout {other}, but Python imported mlla_mm from' in out.stderr
    assert f'pip install -e {other}' in out.stderr


# -- the wheel, installed into a fresh venv -----------------------------------------------------


@pytest.mark.slow
def test_wheel_installs_configs_tools_and_commands(tmp_path):
    pytest.importorskip('mmdet')
    src = tmp_path / 'src'
    src.mkdir()
    ignore = shutil.ignore_patterns('__pycache__', '*.py[co]', '.mim', '*.egg-info')
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    out = _run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '-w', tmp_path, src], tmp_path)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob('mlla_mm-*.whl')
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith('entry_points.txt'))
        meta = next(zf.read(n).decode() for n in names if n.endswith('.dist-info/METADATA'))
    # mmengine 0.10 needs pkg_resources, which torch's setuptools (>= 82) no longer has
    assert 'Requires-Dist: setuptools<82' in meta
    # setuptools writes build/ and mlla_mm.egg-info/ into the folder it builds from (as
    # docs/installation.md says): here the copy
    assert (src / 'build').is_dir()
    assert {
        'mlla_mm/.mim/configs/mask_rcnn_mlla_t.py',
        'mlla_mm/.mim/configs/toy/upernet_mlla_t_toy.py',
        'mlla_mm/.mim/tools/train.py',
        'mlla_mm/.mim/tools/deployment/export_onnx.py',
        'mlla_mm/utils/resources.py',
        'mlla_mm/datasets/make_toy.py',
        'mlla_mm/models/backbones/cpu_kernels.c',  # compiled on first use
    } <= names
    assert not any('__pycache__' in n for n in names)
    for command in COMMANDS:
        assert f'{command} = mlla_mm.cli:' in entry_points

    # A fresh venv that sees this interpreter's packages (torch, mmengine, mmdet, ...) through a
    # plain path line, so the editable mlla_mm installed here (a .pth of its own) stays out.
    venv = tmp_path / 'venv'
    out = _run([sys.executable, '-m', 'venv', '--without-pip', venv], tmp_path)
    assert out.returncode == 0, out.stderr
    vpy = venv / 'bin' / 'python'
    site = _run([vpy, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], tmp_path)
    Path(site.stdout.strip(), 'parent_env.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    out = _run([*pip, '--python', vpy, 'install', '--no-deps', '--no-index', wheel], tmp_path)
    assert out.returncode == 0, out.stderr

    work = tmp_path / 'work'  # outside any checkout
    work.mkdir()
    (work / 'my_config.py').write_text(USER_CONFIG.format(name='mask_rcnn_mlla_t.py'))
    check = textwrap.dedent(
        """
        import mlla_mm
        from mmengine.config import Config
        from mlla_mm.utils.resources import config_dir, tools_dir

        cfg = Config.fromfile('my_config.py')
        print(mlla_mm.__file__)
        print(config_dir())
        print(tools_dir())
        print(cfg.model.backbone.type, cfg.model.backbone.arch, cfg.model.backbone.drop_path_rate)
        """
    )
    out = _run([vpy, '-c', check], work)
    assert out.returncode == 0, out.stderr
    package = Path(out.stdout.splitlines()[0]).parent
    assert package.is_relative_to(venv), out.stdout  # the wheel, not the checkout
    assert out.stdout.splitlines()[1:] == [
        str(package / '.mim' / 'configs'),
        str(package / '.mim' / 'tools'),
        'mlla_mm.MLLA tiny 0.3',
    ]
    out = _run([venv / 'bin' / 'mlla-train', '--help'], work)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('usage: mlla-train') and '--work-dir' in out.stdout
    out = _run([venv / 'bin' / 'mlla-configs', 'mask_rcnn_mlla_t'], work)
    assert out.stdout.strip() == str(package / '.mim' / 'configs' / 'mask_rcnn_mlla_t.py')
    # a copied shipped config cannot load (relative _base_); the error names --new, which works
    shutil.copy(package / '.mim' / 'configs' / 'toy' / 'mask_rcnn_mlla_t_toy.py', work)
    out = _run([venv / 'bin' / 'mlla-train', 'mask_rcnn_mlla_t_toy.py'], work)
    assert out.returncode == 2 and '--new my_config.py' in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = _run([venv / 'bin' / 'mlla-configs', 'toy/mask_rcnn_mlla_t_toy', '--new', 'new.py'], work)
    assert out.returncode == 0 and (work / 'new.py').is_file(), out.stderr
    out = _run([vpy, '-c', "import mlla_mm; from mmengine.config import Config; "
                "print(Config.fromfile('new.py').train_cfg.max_iters)"], work)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == '250', out.stderr
    # the toy data without a checkout
    out = _run([venv / 'bin' / 'mlla-make-toy', 'coco', 'data/toy_coco', '--num-train', '1'], work)
    assert out.returncode == 0, out.stderr
    assert (work / 'data' / 'toy_coco' / 'annotations' / 'instances_val.json').is_file()
    # an unknown shipped name: one line, status 2, named after the command
    out = _run([venv / 'bin' / 'mlla-train', 'mlla_mm::nope.py'], work)
    assert out.returncode == 2 and out.stderr.startswith('mlla-train: error: ')
    # a reader that stops early is no error
    out = subprocess.run(
        f'{venv / "bin" / "mlla-configs"} | head -1', shell=True, capture_output=True, text=True,
        cwd=work,
    )  # fmt: skip
    assert out.stdout.strip() and 'BrokenPipe' not in out.stderr, out.stderr


def test_unknown_shipped_name_is_a_user_error(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.run_tool('train', ['mlla_mm::nope.py'], prog='mlla-train')
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith(
        "mlla-train: error: mlla_mm ships no config 'mlla_mm::nope.py'"
    )


def test_new_user_config_inherits_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    """``cp "$(mlla-configs toy/mask_rcnn_mlla_t_toy)" .`` keeps a relative ``_base_`` that does
    not exist here; ``mlla-configs NAME --new FILE`` writes a config that loads, and loading the
    copy says to use it."""
    pytest.importorskip('mmdet')
    from mlla_mm.utils.config_loader import load_config
    from mlla_mm.utils.errors import ConfigCheckError

    monkeypatch.chdir(tmp_path)
    cli.configs(['toy/mask_rcnn_mlla_t_toy', '--new', 'my_cfg.py'])
    assert capsys.readouterr().out.startswith("my_cfg.py: _base_ = 'mlla_mm::toy/")
    text = (tmp_path / 'my_cfg.py').read_text()
    assert "_base_ = 'mlla_mm::toy/mask_rcnn_mlla_t_toy.py'" in text
    cfg = load_config('my_cfg.py')
    assert cfg.train_cfg == load_config('mlla_mm::toy/mask_rcnn_mlla_t_toy.py').train_cfg
    # an existing file is kept; an unknown name or no name: status 2
    for argv in (['toy/mask_rcnn_mlla_t_toy', '--new', 'my_cfg.py'], ['nope', '--new', 'x.py'],
                 ['--new', 'x.py']):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            cli.configs(argv)
        assert stop.value.code == 2
    assert (tmp_path / 'my_cfg.py').read_text() == text and not (tmp_path / 'x.py').exists()
    # the plain copy: one line naming the command
    shutil.copy(resources.config_path('toy/mask_rcnn_mlla_t_toy'), tmp_path)
    with pytest.raises(ConfigCheckError) as err:
        load_config('mask_rcnn_mlla_t_toy.py')
    message = str(err.value)
    assert '\n' not in message and "inherits '" in message and 'does not exist' in message
    assert '`mlla-configs toy/mask_rcnn_mlla_t_toy --new my_config.py`' in message


def test_config_list_into_a_closed_pipe():
    """``mlla-configs | head -1``: no BrokenPipeError traceback."""
    code = 'from mlla_mm import cli; cli.configs([])'
    out = subprocess.run(
        f'{sys.executable} -c "{code}" | head -1', shell=True, capture_output=True, text=True,
        cwd=ROOT,
    )  # fmt: skip
    assert out.stdout.strip().endswith('.py') and 'Error' not in out.stderr, out.stderr
