"""Console commands of the installed package: each runs the matching script of ``tools/``.

- ``mlla-train``: ``train.py`` (mmdet / mmseg / mmpretrain configs)
- ``mlla-test``: ``test.py``
- ``mlla-demo``: ``image_demo.py``
- ``mlla-benchmark``: ``benchmark.py``
- ``mlla-export-onnx``: ``deployment/export_onnx.py``
- ``mlla-convert``: ``model_converters/mlla2mm.py`` (official checkpoints -> mlla_mm)
- ``mlla-configs``: lists the shipped configs; ``NAME --new FILE`` writes a config inheriting one
  (:func:`configs`)
- ``mlla-make-toy``: writes a toy dataset (:mod:`mlla_mm.datasets.make_toy`)

A command runs the script as ``python tools/<script> ARGS`` would (as ``__main__``, like
``runpy.run_path``), so the tools stay the one implementation and need no changes. An argument
``mlla_mm::NAME`` (or ``--config=mlla_mm::NAME``) becomes the path of that shipped config, e.g.
``mlla-train mlla_mm::toy/mask_rcnn_mlla_t_toy.py``. ``python -m mlla_mm.cli train ...`` does the
same where the scripts folder is not on ``PATH``.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from collections.abc import Sequence
from importlib.machinery import SourceFileLoader
from pathlib import Path

from .utils.resources import (
    PREFIX,
    config_dir,
    config_path,
    list_configs,
    tools_dir,
    write_user_config,
)

__all__ = [
    'TOOLS',
    'benchmark',
    'configs',
    'convert',
    'make_toy',
    'demo',
    'export_onnx',
    'main',
    'run_tool',
    'test',
    'train',
]

TOOLS = {
    'train': 'train.py',
    'test': 'test.py',
    'demo': 'image_demo.py',
    'benchmark': 'benchmark.py',
    'export-onnx': 'deployment/export_onnx.py',
    'convert': 'model_converters/mlla2mm.py',
}


def run_tool(tool: str, argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Run ``tools/<script>`` of :data:`TOOLS` as ``__main__`` with the given arguments.

    Args:
        tool (str): a key of :data:`TOOLS`, e.g. ``'train'``.
        argv (Sequence[str], optional): the arguments; ``sys.argv[1:]`` when None.
        prog (str, optional): the program name shown in help and errors;
            ``mlla-<tool>`` when None.

    Raises:
        SystemExit: what the tool exits with (``--help``, bad arguments, a non-zero status).
    """
    if tool not in TOOLS:
        raise SystemExit(f'mlla_mm has no tool {tool!r}; the tools are: {", ".join(TOOLS)}')
    script = tools_dir() / TOOLS[tool]
    if not script.is_file():
        raise SystemExit(f'{script} is missing: reinstall mlla_mm (pip install mlla_mm).')
    prog = prog or f'mlla-{tool}'
    try:
        args = [_expand_prefix(a) for a in (sys.argv[1:] if argv is None else argv)]
    except FileNotFoundError as e:  # an unknown mlla_mm:: name: a user error, as in the tools
        print(f'{prog}: error: {e}', file=sys.stderr)
        raise SystemExit(2) from None
    _run_script(script, [prog, *args])


def _expand_prefix(arg: str) -> str:
    """``mlla_mm::NAME`` (also as ``--option=mlla_mm::NAME``) -> the path of that shipped config."""
    if arg.startswith(PREFIX):
        return str(config_path(arg))
    option, sep, value = arg.partition('=')
    if arg.startswith('--') and sep and value.startswith(PREFIX):
        return f'{option}={config_path(value)}'
    return arg


def _run_script(script: Path, argv: list[str]) -> None:
    """Run ``script`` as ``__main__`` (like ``python script``, as runpy.run_path does) with
    ``sys.argv = argv``; unlike runpy, ``argv[0]`` stays, so usage lines name the command."""
    main = types.ModuleType('__main__')
    main.__file__ = str(script)
    main.__loader__ = SourceFileLoader('__main__', str(script))
    main.__spec__ = None  # as for `python script`: spawned workers re-run __main__ from its file
    code = compile(script.read_bytes(), str(script), 'exec')
    saved = sys.modules['__main__'], sys.argv
    sys.modules['__main__'], sys.argv = main, argv
    try:
        exec(code, main.__dict__)
    finally:
        sys.modules['__main__'], sys.argv = saved


def train(argv: Sequence[str] | None = None) -> None:
    """``mlla-train``: ``tools/train.py``."""
    run_tool('train', argv)


def test(argv: Sequence[str] | None = None) -> None:
    """``mlla-test``: ``tools/test.py``."""
    run_tool('test', argv)


def demo(argv: Sequence[str] | None = None) -> None:
    """``mlla-demo``: ``tools/image_demo.py``."""
    run_tool('demo', argv)


def benchmark(argv: Sequence[str] | None = None) -> None:
    """``mlla-benchmark``: ``tools/benchmark.py``."""
    run_tool('benchmark', argv)


def export_onnx(argv: Sequence[str] | None = None) -> None:
    """``mlla-export-onnx``: ``tools/deployment/export_onnx.py``."""
    run_tool('export-onnx', argv)


def convert(argv: Sequence[str] | None = None) -> None:
    """``mlla-convert``: ``tools/model_converters/mlla2mm.py``."""
    run_tool('convert', argv)


def configs(argv: Sequence[str] | None = None) -> None:
    """``mlla-configs``: print the shipped configs (``--path``: their folder; NAME: one path;
    ``NAME --new FILE``: write FILE, a config inheriting NAME by name)."""
    parser = argparse.ArgumentParser(
        prog='mlla-configs',
        description='List the configs shipped with mlla_mm. `mlla-configs NAME --new my_cfg.py` '
        "writes your own config inheriting NAME (_base_ = 'mlla_mm::NAME'), which loads from any "
        'folder; a plain copy of a shipped config does not (its _base_ is a relative path).',
    )
    parser.add_argument('name', nargs='?', help='print the path of this config')
    parser.add_argument('--path', action='store_true', help='print the configs folder')
    parser.add_argument(
        '--new',
        metavar='FILE',
        help='write FILE: a config that inherits NAME by name, to edit (an existing FILE is kept)',
    )
    args = parser.parse_args(argv)
    if args.new:
        if not args.name:
            parser.error('--new FILE needs the NAME of the shipped config to inherit')
        try:
            out, base = write_user_config(args.name, args.new)
        except (FileNotFoundError, FileExistsError) as e:
            parser.exit(2, f'mlla-configs: error: {e}\n')
        text = f"{out}: _base_ = '{base}'; edit it, then e.g. mlla-train {out}"
    elif args.path:
        text = str(config_dir())
    elif args.name:
        try:
            text = str(config_path(args.name))
        except FileNotFoundError as e:
            parser.exit(2, f'mlla-configs: error: {e}\n')
    else:
        text = '\n'.join(list_configs())
    _print_to_pipe(text)


def _print_to_pipe(text: str) -> None:
    """Print ``text``; a reader that stops early (``mlla-configs | head -1``) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python would report the broken pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def make_toy(argv: Sequence[str] | None = None) -> None:
    """``mlla-make-toy {coco,ade20k} DIR``: write a toy dataset (:mod:`mlla_mm.datasets`)."""
    from mlla_mm.datasets.make_toy import main as make_toy_main

    make_toy_main(argv, prog='mlla-make-toy')


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mlla_mm.cli TOOL ARGS``: the commands without the scripts on ``PATH``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    choices = [*TOOLS, 'configs', 'make-toy']
    if not argv or argv[0] not in choices:
        problem = f'mlla_mm has no tool {argv[0]!r}\n' if argv and argv[0] != '--help' else ''
        raise SystemExit(
            f'{problem}usage: python -m mlla_mm.cli {{{",".join(choices)}}} [ARGS ...]\n'
            'Each runs the tools/ script of the same name; add --help for its arguments.'
        )
    if argv[0] == 'configs':
        configs(argv[1:])
    elif argv[0] == 'make-toy':
        make_toy(argv[1:])
    else:
        run_tool(argv[0], argv[1:], prog=f'python -m mlla_mm.cli {argv[0]}')


if __name__ == '__main__':
    main()
