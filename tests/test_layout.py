"""The package layout: every module imports on its own in a fresh interpreter, the import graph
has no cycle, library code never imports the tools' modules, the public names stay importable
from ``mlla_mm``, and the old module paths still work for a release, with a DeprecationWarning."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'mlla_mm'
# old module -> (new module, a public name it must still give)
OLD_PATHS = {
    'mlla_mm.inference': ('mlla_mm.apis.inference', 'MLLAInferencer'),
    'mlla_mm.convert': ('mlla_mm.apis.conversion', 'convert_checkpoint'),
    'mlla_mm.toy_coco': ('mlla_mm.datasets.toy_coco', 'make_toy_coco'),
    'mlla_mm.toy_ade20k': ('mlla_mm.datasets.toy_ade20k', 'make_toy_ade20k'),
    'mlla_mm.deploy_det': ('mlla_mm.deploy.mask_rcnn_graph', 'MaskRCNNGraph'),
    'mlla_mm.flops': ('mlla_mm.analysis.flops', 'count_flops'),
    'mlla_mm.benchmark': ('mlla_mm.analysis.benchmark', 'run_benchmark'),
    'mlla_mm.safe_load': ('mlla_mm.utils.safe_load', 'load_file'),
    'mlla_mm.resources': ('mlla_mm.utils.resources', 'config_path'),
    'mlla_mm.tools_utils': ('mlla_mm.utils.config_check', 'validate_config'),
    'mlla_mm.engine.mesa': ('mlla_mm.engine.hooks.mesa_hook', 'MESAHook'),
}
# Modules that need an optional library at import (they import it at module level on purpose).
NEEDS = {
    'mlla_mm.models.classifiers': 'mmpretrain',
    'mlla_mm.models.classifiers.mesa': 'mmpretrain',
    'mlla_mm.engine': 'mmpretrain',
    'mlla_mm.engine.mesa': 'mmpretrain',
}


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob('*.py')):
        if '.mim' in path.parts or path.name == '__main__.py':
            continue
        parts = path.relative_to(ROOT).with_suffix('').parts
        names.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
    return names


def _imports(module: str, top_level_only: bool) -> set[str]:
    """The mlla_mm modules ``module`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    path = PACKAGE.parent / (module.replace('.', '/'))
    path = path / '__init__.py' if path.is_dir() else path.with_suffix('.py')
    tree = ast.parse(path.read_text())
    package = module if path.name == '__init__.py' else module.rpartition('.')[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                up = package.split('.')[: len(package.split('.')) - node.level + 1]
                base = '.'.join([*up, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f'{base}.{alias.name}'
                known = (PACKAGE.parent / sub.replace('.', '/')).with_suffix('.py').is_file()
                known |= (PACKAGE.parent / sub.replace('.', '/') / '__init__.py').is_file()
                found.add(sub if known else base)
    return {m for m in found if m == 'mlla_mm' or m.startswith('mlla_mm.')}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


NEW_MODULES = [m for m in _modules() if m not in OLD_PATHS and m != 'mlla_mm._deprecated']


def test_import_graph_has_no_cycle():
    """No cycle among the modules, counting imports inside functions too. Edges into a package's
    ``__init__`` (``import mlla_mm`` for its registrations) are left out: Python imports the
    parent package first in any case; the module-level graph is checked with them."""
    everything = {m: _imports(m, top_level_only=False) for m in NEW_MODULES}
    packages = {m for m in NEW_MODULES if (PACKAGE.parent / m.replace('.', '/')).is_dir()}
    no_init = {m: {d for d in deps if d not in packages} for m, deps in everything.items()}
    assert _cycle(no_init) is None, _cycle(no_init)
    top = {m: _imports(m, top_level_only=True) for m in NEW_MODULES}
    assert _cycle(top) is None, _cycle(top)


def test_library_code_never_imports_the_tools_or_old_paths():
    for module in NEW_MODULES:
        deps = _imports(module, top_level_only=False)
        assert not deps & set(OLD_PATHS), (module, deps & set(OLD_PATHS))
        path = PACKAGE.parent / module.replace('.', '/')
        text = (path / '__init__.py' if path.is_dir() else path.with_suffix('.py')).read_text()
        assert 'tools_utils' not in text.replace('mlla_mm.tools_utils', '') or module == (
            'mlla_mm.tools_utils'
        )
        assert not re.search(r'sys\.path\.(insert|append)', text), module


@pytest.mark.parametrize('module', NEW_MODULES)
def test_every_module_imports_alone_in_a_fresh_interpreter(module):
    if module in NEEDS:
        pytest.importorskip(NEEDS[module])
    proc = subprocess.run(
        [sys.executable, '-W', 'error::DeprecationWarning:mlla_mm', '-c', f'import {module}'],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_public_names_of_the_package():
    import mlla_mm

    for name in mlla_mm.__all__:
        assert getattr(mlla_mm, name) is not None
    from mlla_mm.apis import MLLAInferencer

    assert mlla_mm.MLLAInferencer is MLLAInferencer


@pytest.mark.parametrize('old', sorted(OLD_PATHS))
def test_old_module_paths_warn_and_forward(old):
    new, name = OLD_PATHS[old]
    if old in NEEDS:
        pytest.importorskip(NEEDS[old])
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        module = importlib.import_module(old)
    moved = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert moved and f'{old} moved to' in str(moved[0].message), [str(w.message) for w in caught]
    assert moved[0].filename == __file__  # points at the importing line, not at mlla_mm
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_old_module_run_as_script_still_works(tmp_path):
    """``python -m mlla_mm.toy_coco DIR`` (the old path) writes the set, as the new command."""
    pytest.importorskip('PIL')
    out = tmp_path / 'toy'
    proc = subprocess.run(
        [sys.executable, '-m', 'mlla_mm.toy_coco', str(out), '--num-train', '1', '--num-val', '1'],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / 'annotations' / 'instances_val.json').is_file()
