"""Install mlla_mm: MLLA backbones for the OpenMMLab 2.0 stack.

The backbone needs only ``torch`` and ``mmengine``; the task extras pull in the
OpenMMLab libraries (``pip install -e .[det,seg,cls]``).
"""

from pathlib import Path

from setuptools import find_packages, setup

EXTRAS = {
    'det': ['mmcv>=2.0.0rc4,<2.2.0', 'mmdet>=3.0.0,<3.4.0', 'pycocotools'],
    'seg': ['mmcv>=2.0.0rc4,<2.2.0', 'mmsegmentation>=1.0.0,<1.3.0', 'ftfy', 'regex'],
    'cls': ['mmcv>=2.0.0rc4,<2.2.0', 'mmpretrain>=1.0.0,<1.3.0'],
    'deploy': ['onnx', 'onnxruntime', 'onnxscript'],
    'bench': ['matplotlib', 'psutil', 'timm'],
    'dev': ['pytest', 'ruff', 'scikit-image', 'matplotlib', 'psutil'],
}
EXTRAS['all'] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name='mlla_mm',
    version='0.1.0',
    description='MLLA (Mamba-Like Linear Attention) backbones for mmdet, mmseg and mmpretrain',
    long_description=Path(__file__).with_name('README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    packages=find_packages(include=['mlla_mm', 'mlla_mm.*']),
    install_requires=['torch>=2.0', 'mmengine>=0.10.0,<1.0', 'numpy'],
    extras_require=EXTRAS,
)
