"""Install mlla_mm: MLLA backbones for the OpenMMLab 2.0 stack.

The backbone needs only ``torch`` and ``mmengine``; the task extras pull in the
OpenMMLab libraries (``pip install -e .[det,seg,cls]``).

``configs/`` and ``tools/`` also ship inside the package as ``mlla_mm/.mim/``
(OpenMMLab's mim layout): a wheel holds copies, an editable install links them to this checkout.
``mlla_mm.utils.resources`` finds them at run time and ``mlla_mm.cli`` runs the tools as commands.
"""

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
MIM_ITEMS = ('configs', 'tools')

EXTRAS = {
    'det': ['mmcv>=2.0.0rc4,<2.2.0', 'mmdet>=3.0.0,<3.4.0', 'pycocotools'],
    'seg': ['mmcv>=2.0.0rc4,<2.2.0', 'mmsegmentation>=1.0.0,<1.3.0', 'ftfy', 'regex'],
    'cls': ['mmcv>=2.0.0rc4,<2.2.0', 'mmpretrain>=1.0.0,<1.3.0'],
    'deploy': ['onnx', 'onnxruntime', 'onnxscript', 'openvino', 'nncf'],
    'bench': ['matplotlib', 'psutil', 'timm'],
    'dev': ['pytest', 'ruff', 'scikit-image', 'matplotlib', 'psutil'],
}
EXTRAS['all'] = sorted({req for reqs in EXTRAS.values() for req in reqs})

COMMANDS = {
    'mlla-train': 'train',
    'mlla-test': 'test',
    'mlla-demo': 'demo',
    'mlla-benchmark': 'benchmark',
    'mlla-export-onnx': 'export_onnx',
    'mlla-convert': 'convert',
    'mlla-configs': 'configs',
    'mlla-make-toy': 'make_toy',
}


class BuildPyWithMim(build_py):
    """``build_py`` that also places ``configs/`` and ``tools/`` in ``mlla_mm/.mim/``.

    A wheel gets copies (the checkout itself is not modified); an editable install gets links to
    the checkout, or copies where links are not allowed.
    """

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            self._place(ROOT / 'mlla_mm' / '.mim', link=True)
        else:
            self._place(Path(self.build_lib) / 'mlla_mm' / '.mim', link=False)

    @staticmethod
    def _place(mim: Path, link: bool) -> None:
        mim.mkdir(parents=True, exist_ok=True)
        for name in MIM_ITEMS:
            src, dst = ROOT / name, mim / name
            if dst.is_symlink() or dst.is_file():
                dst.unlink()
            elif dst.is_dir():
                shutil.rmtree(dst)
            if link:
                try:
                    os.symlink(os.path.relpath(src, mim), dst, target_is_directory=True)
                    continue
                except OSError:  # e.g. Windows without the symlink privilege
                    pass
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__', '*.py[co]'))


setup(
    name='mlla_mm',
    version='0.1.0',
    description='MLLA (Mamba-Like Linear Attention) backbones for mmdet, mmseg and mmpretrain',
    long_description=Path(__file__).with_name('README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    # package_dir {'': '.'}: an editable install puts the checkout on sys.path (a .pth line)
    # instead of setuptools' import finder, which loses to a checkout folder named mlla_mm in
    # the current directory (Python would import that folder as an empty namespace package).
    package_dir={'': '.'},
    packages=find_packages(include=['mlla_mm', 'mlla_mm.*']),
    # the C source of the fused CPU kernels, compiled on first use (cpu_kernels.py)
    package_data={'mlla_mm.models.backbones': ['*.c']},
    # torch >= 2.3: torch.compiler.is_compiling (mlla_mm.utils.MIN_TORCH). setuptools < 82:
    # mmengine 0.10 finds installed packages (and their configs: _base_ = 'mmdet::...') with
    # pkg_resources, which setuptools 82 removed; torch brings a newer setuptools otherwise.
    install_requires=['torch>=2.3', 'mmengine>=0.10.0,<1.0', 'numpy', 'setuptools<82'],
    extras_require=EXTRAS,
    entry_points={'console_scripts': [f'{cmd}=mlla_mm.cli:{fn}' for cmd, fn in COMMANDS.items()]},
    cmdclass={'build_py': BuildPyWithMim},
)
