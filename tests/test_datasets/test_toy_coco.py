"""The toy COCO set of mlla_mm.datasets.toy_coco: valid COCO, masks matching boxes, reproducible."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlla_mm.datasets.toy_coco import CLASSES, make_toy_coco


def test_writes_a_coco_instances_set(tmp_path):
    coco_api = pytest.importorskip('pycocotools.coco')
    files = make_toy_coco(tmp_path, num_train=6, num_val=3, size=96, seed=1)
    coco = coco_api.COCO(str(files['train']))
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getImgIds()) == 6 and (tmp_path / 'val' / '000002.png').is_file()
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 6  # 1..3 shapes per image
    for ann in anns:
        mask = coco.annToMask(ann)
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann['bbox']
        # the rasterised polygon fills its box and has the stated area (to a pixel border)
        assert abs(xs.min() - x) <= 1.5 and abs(xs.max() + 1 - (x + w)) <= 1.5
        assert abs(ys.min() - y) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
        assert mask.sum() == pytest.approx(ann['area'], rel=0.15)
        assert ann['iscrowd'] == 0 and ann['category_id'] in (1, 2, 3)


def test_reproducible_and_written_once(tmp_path):
    files = make_toy_coco(tmp_path / 'a', num_train=3, num_val=2, size=64, seed=5)
    again = make_toy_coco(tmp_path / 'b', num_train=3, num_val=2, size=64, seed=5)
    assert files['val'].read_text() == again['val'].read_text()
    assert (tmp_path / 'a' / 'train' / '000001.png').read_bytes() == (
        tmp_path / 'b' / 'train' / '000001.png'
    ).read_bytes()

    stamp = files['train'].stat().st_mtime_ns
    make_toy_coco(tmp_path / 'a', num_train=3, num_val=2, size=64, seed=5, skip_existing=True)
    assert files['train'].stat().st_mtime_ns == stamp  # kept: same arguments
    make_toy_coco(tmp_path / 'a', num_train=4, num_val=2, size=64, seed=5, skip_existing=True)
    assert len(json.loads(files['train'].read_text())['images']) == 4  # rewritten


def test_rejects_impossible_arguments(tmp_path):
    with pytest.raises(ValueError, match='at least 32'):
        make_toy_coco(tmp_path, size=16)
    with pytest.raises(ValueError, match='>= 1'):
        make_toy_coco(tmp_path, num_val=0)
