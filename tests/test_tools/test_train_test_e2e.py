"""End to end through the tools: train -> checkpoint -> test -> image demo, on toy COCO data."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from det_helpers import read_test_metrics, run_tool, write_det_config
from PIL import Image

pytestmark = pytest.mark.slow


def test_train_checkpoint_test_and_image_demo(toy_coco, tmp_path):
    cfg = write_det_config(tmp_path / 'toy_tiny.py', toy_coco, max_iters=4, ckpt_interval=4)
    work = tmp_path / 'train'
    train = run_tool('tools/train.py', cfg, '--work-dir', work)
    log = train.stdout + train.stderr
    assert 'Iter(train) [4/4]' in log and 'coco/bbox_mAP_50' in log  # trained, then validated
    # The console shows progress, metrics and where the results are; the config, environment
    # and per-parameter lines only go to mmengine's log file in the work dir.
    (log_file,) = work.glob('*/*.log')
    assert f'full log (config, environment): {log_file}' in log
    for detail in ('paramwise_options --', 'Config:\n', 'System environment:'):
        assert detail not in log and detail in log_file.read_text(), detail
    assert 'pkg_resources is deprecated' not in log
    assert len(log.splitlines()) < 60, log

    # The checkpoint loads with torch.load's default weights_only=True (import mlla_mm
    # allow-lists the types mmengine stores), and holds what --resume needs.
    import mlla_mm  # noqa: F401

    ckpt = work / 'iter_4.pth'
    assert (work / 'last_checkpoint').read_text().strip() == str(ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state['meta']['iter'] == 4 and state['meta']['dataset_meta']['classes'][0] == 'circle'
    assert {'state_dict', 'optimizer', 'param_schedulers', 'message_hub'} <= set(state)

    preds = tmp_path / 'preds.pkl'
    run_tool('tools/test.py', cfg, ckpt, '--work-dir', tmp_path / 'test', '--out', preds)
    metrics = read_test_metrics(tmp_path / 'test')
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert -1 <= metrics[key] <= 1, key  # COCOeval's -1: no prediction above the threshold
    with open(preds, 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 4  # one per toy val image
    assert {'bboxes', 'scores', 'labels', 'masks'} <= set(results[0]['pred_instances'])

    img = toy_coco / 'val' / '000001.png'
    out = tmp_path / 'demo.png'
    demo = run_tool('tools/image_demo.py', img, cfg, ckpt, '--out-file', out, '--score-thr', '0.0')
    found = json.loads(demo.stdout[demo.stdout.index('{\n "task"') :])
    assert found['task'] == 'detection' and found['out_file'] == str(out)
    for det in found['detections']:
        assert det['label'] in ('circle', 'square', 'triangle') and len(det['bbox']) == 4
    drawn, src = np.asarray(Image.open(out).convert('RGB')), np.asarray(Image.open(img))
    src = src.repeat(4, 0).repeat(4, 1)  # 128x128 images are drawn 4x enlarged (>= 512)
    assert drawn.shape == src.shape
    assert np.array_equal(drawn, src) == (not found['detections'])  # boxes drawn, if any

    # A folder: every image, drawn into --out-dir, a JSON list; --cfg-options reaches the model
    vis = tmp_path / 'vis'
    demo = run_tool(
        'tools/image_demo.py', toy_coco / 'val', cfg, ckpt, '--out-dir', vis, '--batch-size', 2,
        '--cfg-options', 'model.test_cfg.rcnn.max_per_img=1', '--score-thr', '0.0',
    )  # fmt: skip
    found = json.loads(demo.stdout[demo.stdout.index('[\n {') :])
    assert [f['img_path'] for f in found] == sorted(str(p) for p in (toy_coco / 'val').iterdir())
    assert sorted(p.name for p in vis.iterdir()) == sorted(
        p.name for p in (toy_coco / 'val').iterdir()
    )
    assert all(len(f['detections']) <= 1 for f in found)


def test_image_demo_errors_are_one_line(toy_coco, tmp_path):
    cfg = write_det_config(tmp_path / 'toy_tiny.py', toy_coco)
    text = tmp_path / 'notes.txt'
    text.write_text('not an image')
    for img, expected in (
        (tmp_path / 'missing.png', "missing.png' does not exist"),
        (text, "notes.txt' is not an image OpenCV can decode"),
    ):
        proc = run_tool(
            'tools/image_demo.py', img, cfg, tmp_path / 'any.pth', '--out-file', 'x.png',
            check=False,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert 'Traceback' not in proc.stderr and 'cv2.error' not in proc.stderr
        first = proc.stderr.strip().splitlines()[0]
        assert first.startswith('tools/image_demo.py: error: ') and expected in first


def test_test_tool_rejects_a_missing_checkpoint(toy_coco, tmp_path):
    cfg = write_det_config(tmp_path / 'toy_tiny.py', toy_coco)
    proc = run_tool('tools/test.py', cfg, tmp_path / 'nope.pth', check=False)
    assert proc.returncode == 2 and 'nope.pth' in proc.stderr and 'does not exist' in proc.stderr
    assert 'Traceback' not in proc.stderr
    # A truncated checkpoint met while training (--resume): one line, exit status 2
    broken = tmp_path / 'broken.pth'
    broken.write_bytes(b'PK\x03\x04 truncated')
    proc = run_tool(
        'tools/train.py', cfg, '--work-dir', tmp_path / 'work', '--resume', broken, check=False
    )
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith('tools/train.py: error: Checkpoint')
    assert 'corrupt or truncated' in proc.stderr
