"""The toy ADE20K-layout dataset: layout, labels, determinism, and mmseg reads it as ADE20K."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlla_mm.datasets.toy_ade20k import CLASSES, PALETTE, make_toy_ade20k

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope='module')
def toy(tmp_path_factory) -> Path:
    return make_toy_ade20k(tmp_path_factory.mktemp('toy_ade20k'), num_train=6, num_val=3, size=48)


def _files(root: Path, kind: str, split: str) -> list:
    return sorted(p.name for p in (root / kind / split).iterdir())


def test_layout_and_labels(toy):
    for split, count in (('training', 6), ('validation', 3)):
        images, labels = _files(toy, 'images', split), _files(toy, 'annotations', split)
        assert len(images) == count and all(n.endswith('.jpg') for n in images)
        assert [n[:-4] for n in images] == [n[:-4] for n in labels]
        for name in images:
            img = Image.open(toy / 'images' / split / name)
            label = Image.open(toy / 'annotations' / split / name.replace('.jpg', '.png'))
            assert img.mode == 'RGB' and label.mode == 'L' and img.size == label.size
            w, h = img.size
            assert h == 48 and 48 <= w <= 72 and w % 8 == 0
            values = set(np.unique(np.asarray(label)).tolist())
            assert 1 in values and values <= set(range(len(CLASSES) + 1))
    every = np.concatenate(
        [np.asarray(Image.open(p)).ravel() for p in (toy / 'annotations').rglob('*.png')]
    )
    assert set(np.unique(every).tolist()) == set(range(len(CLASSES) + 1))  # all classes + 0


def test_deterministic_given_the_seed(tmp_path):
    a = make_toy_ade20k(tmp_path / 'a', num_train=2, num_val=1, size=32, seed=5)
    b = make_toy_ade20k(tmp_path / 'b', num_train=2, num_val=1, size=32, seed=5)
    c = make_toy_ade20k(tmp_path / 'c', num_train=2, num_val=1, size=32, seed=6)
    files = [p.relative_to(a) for p in sorted(a.rglob('*.*'))]
    assert len(files) == 6
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


@pytest.mark.parametrize('kwargs', [dict(size=31), dict(num_train=0), dict(num_val=0)])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match='must be'):
        make_toy_ade20k(tmp_path, **kwargs)


def test_the_toy_config_reads_it(toy):
    """The toy config's dataset: ADE20K's reduce_zero_label (0 -> ignored, classes shifted)."""
    pytest.importorskip('mmseg')
    from mmengine.config import Config
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(str(ROOT / 'configs' / 'toy' / 'upernet_mlla_t_toy.py'))
    assert cfg.metainfo.classes == CLASSES and cfg.num_classes == len(CLASSES)
    assert [tuple(c) for c in cfg.metainfo.palette] == list(PALETTE)
    for loader, split, count in (('train', 'training', 6), ('val', 'validation', 3)):
        ds_cfg = cfg[f'{loader}_dataloader'].dataset
        ds_cfg.data_root = str(toy)
        dataset = DATASETS.build(ds_cfg)
        assert len(dataset) == count and dataset.metainfo['classes'] == CLASSES
        sample = dataset[0]['data_samples']
        gt = sample.gt_sem_seg.data.numpy()
        raw = np.asarray(Image.open(toy / 'annotations' / split / 'toy_00000.png'))
        assert set(np.unique(gt).tolist()) <= {0, 1, 2, 3, 255}
        if loader == 'val':  # the test pipeline keeps the label map's size
            expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
            np.testing.assert_array_equal(gt[0], expected)
