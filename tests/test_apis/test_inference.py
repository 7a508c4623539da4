"""The Python inference API (mlla_mm.MLLAInferencer), and OpenMMLab's own inferencers with our
configs, on toy configs with a tiny MLLA and random weights (no training needed)."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet')

ROOT = Path(__file__).parents[2]
TINY = 'dict(_delete_=True, embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))'
CLASSES = ('circle', 'square', 'triangle')


@pytest.fixture(scope='module')
def det(tmp_path_factory) -> dict:
    """A user config inheriting the toy detection config (tiny MLLA), a random-weights
    checkpoint saved as tools/train.py saves one, and three toy images."""
    from PIL import Image

    import mlla_mm
    from mlla_mm.datasets.toy_coco import make_toy_coco

    tmp = tmp_path_factory.mktemp('infer_det')
    make_toy_coco(tmp / 'data', num_train=1, num_val=3, size=64, seed=1)
    config = tmp / 'det_tiny.py'
    config.write_text(
        f'_base_ = [{str(ROOT / "configs/toy/mask_rcnn_mlla_t_toy.py")!r}]\n'
        f'model = dict(backbone=dict(arch={TINY}), neck=dict(in_channels=[16, 32, 64, 128]))\n'
    )
    with pytest.warns(UserWarning, match='no checkpoint'):
        untrained = mlla_mm.MLLAInferencer(config)
    assert untrained.classes == CLASSES  # from the config, without a checkpoint
    ckpt = tmp / 'det_tiny.pth'
    torch.manual_seed(0)
    torch.save(
        dict(
            state_dict=untrained.model.state_dict(),
            meta=dict(dataset_meta=dict(classes=CLASSES, palette=[(220, 60, 60)] * 3)),
        ),
        ckpt,
    )
    images = sorted((tmp / 'data' / 'val').glob('*.png'))
    assert len(images) == 3 and Image.open(images[0]).size == (64, 64)
    return dict(tmp=tmp, config=config, ckpt=ckpt, images=images)


@pytest.fixture(scope='module')
def inferencer(det):
    from mlla_mm import MLLAInferencer

    return MLLAInferencer(str(det['config']), det['ckpt'], device='cpu')


def _bgr(path: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(path))


def _check_detections(result: dict, shape=(64, 64)) -> None:
    assert result['task'] == 'detection' and tuple(result['img_shape']) == shape
    n = len(result['scores'])
    assert result['bboxes'].shape == (n, 4) and result['bboxes'].dtype == np.float32
    assert result['labels'].shape == (n,) and result['labels'].dtype == np.int64
    assert result['masks'].shape == (n, *shape) and result['masks'].dtype == bool
    assert result['label_names'] == [CLASSES[i] for i in result['labels']]


def test_import_mlla_mm_does_not_import_the_libraries():
    code = (
        'import sys, mlla_mm; assert "mmdet" not in sys.modules and "mmcv" not in sys.modules; '
        'from mlla_mm import MLLAInferencer; assert "mmdet" not in sys.modules; '
        'print(MLLAInferencer.__name__)'
    )
    out = subprocess.run(
        [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == 'MLLAInferencer', out.stderr[-2000:]


def test_paths_arrays_folders_and_batches(det, inferencer):
    first = det['images'][0]
    by_path = inferencer(str(first), score_thr=0.0)
    _check_detections(by_path)
    assert by_path['img_path'] == str(first) and len(by_path['scores']) > 0
    by_array = inferencer(_bgr(first), score_thr=0.0)
    assert by_array['img_path'] is None
    np.testing.assert_allclose(by_array['bboxes'], by_path['bboxes'], atol=1e-4)

    folder = inferencer(det['images'][0].parent, score_thr=0.0)  # every image, sorted by name
    assert [r['img_path'] for r in folder] == [str(p) for p in det['images']]
    batched = inferencer([str(p) for p in det['images']], batch_size=2, score_thr=0.0)
    stacked = inferencer(np.stack([_bgr(p) for p in det['images']]), batch_size=3, score_thr=0.0)
    for one, two, three in zip(folder, batched, stacked):
        _check_detections(one)
        np.testing.assert_allclose(one['scores'], two['scores'], atol=1e-5)
        np.testing.assert_allclose(one['bboxes'], three['bboxes'], atol=1e-3)
    high = inferencer(str(first), score_thr=0.9)
    assert (high['scores'] >= 0.9).all() and len(high['scores']) <= len(by_path['scores'])


def test_draws_into_a_file_or_a_folder(det, inferencer, tmp_path):
    from PIL import Image

    out = tmp_path / 'one.png'
    result = inferencer(str(det['images'][0]), score_thr=0.0, out_file=str(out))
    assert result['out_file'] == str(out)
    assert Image.open(out).size == (512, 512)  # 64x64 is drawn enlarged 8x
    images = [str(det['images'][0]), _bgr(det['images'][2]), str(det['images'][1])]
    results = inferencer(images, out_dir=str(tmp_path / 'vis'))
    # named after the input file, arrays by their index; a clash gets the index appended
    expected = ['000000.png', '000001.png', '000001_2.png']
    assert [Path(r['out_file']).name for r in results] == expected
    assert sorted(p.name for p in (tmp_path / 'vis').iterdir()) == expected


def test_bad_inputs_give_one_clear_message(det, inferencer, tmp_path):
    from mlla_mm.apis.inference import InputError

    text = tmp_path / 'notes.txt'
    text.write_text('not an image')
    (tmp_path / 'empty').mkdir()
    cases = [
        (str(tmp_path / 'missing.png'), r"image '.*missing\.png' does not exist"),
        (str(text), r"'.*notes\.txt' is not an image OpenCV can decode"),
        (str(tmp_path / 'empty'), 'holds no image files'),
        (np.zeros((64, 64, 3), np.float32), r'array of shape \(64, 64, 3\) and dtype float32'),
        (np.zeros((2, 1, 64, 64, 3), np.uint8), r'array of shape \(2, 1, 64, 64, 3\)'),
        (np.zeros((64, 64, 7), np.uint8), 'HxWx3'),
        ([], 'empty'),
        (12, 'int 12|12 is not an image'),
    ]
    for value, match in cases:
        with pytest.raises(InputError, match=match) as err:
            inferencer(value)
        message = str(err.value)
        assert '\n' not in message and len(message) < 400, message
        assert '[[' not in message  # never an array's contents
    with pytest.raises(InputError, match='use out_dir'):
        inferencer([str(p) for p in det['images']], out_file=str(tmp_path / 'x.png'))


def test_inference_image_keeps_working(det, tmp_path):
    from mlla_mm.apis.inference import inference_image

    out = tmp_path / 'demo.png'
    found = inference_image(
        str(det['config']), str(det['ckpt']), str(det['images'][0]), str(out), score_thr=0.0
    )
    assert found['task'] == 'detection' and found['out_file'] == str(out) and out.is_file()
    assert found['detections'] and set(found['detections'][0]) == {'label', 'score', 'bbox'}
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        inference_image(str(det['config']), str(tmp_path / 'nope.pth'), 'x.png', str(out))


def _doc_snippet(page: str, marker: str) -> str:
    """The ```python block of a docs page that contains ``marker``."""
    blocks = re.findall(r'```python\n(.*?)```', (ROOT / page).read_text(), flags=re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_the_readme_snippet_runs(det, tmp_path, monkeypatch):
    """README "Inference in Python": run as written, with the toy paths swapped in."""
    code = _doc_snippet('README.md', 'MLLAInferencer(')
    code = code.replace('configs/toy/mask_rcnn_mlla_t_toy.py', str(det['config']))
    code = code.replace('work_dirs/demo/train/iter_250.pth', str(det['ckpt']))
    code = code.replace('data/toy_coco/val', str(det['images'][0].parent))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, 'README.md', 'exec'), scope)
    assert (tmp_path / 'vis').is_dir() and (tmp_path / 'prediction.png').is_file()


def test_mmdet_det_inferencer_takes_our_configs(det, tmp_path, monkeypatch):
    """docs/inference.md: mmdet's own DetInferencer with our config and checkpoint."""
    code = _doc_snippet('docs/inference.md', 'DetInferencer(')
    code = code.replace('configs/toy/mask_rcnn_mlla_t_toy.py', str(det['config']))
    code = code.replace('work_dirs/demo/train/iter_250.pth', str(det['ckpt']))
    code = code.replace('data/toy_coco/val/000001.png', str(det['images'][0]))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, 'docs/inference.md', 'exec'), scope)
    pred = scope['result']['predictions'][0]
    assert {'labels', 'scores', 'bboxes', 'masks'} <= set(pred)
    assert len(pred['labels']) == len(pred['scores']) == len(pred['bboxes']) > 0
    assert all(len(b) == 4 for b in pred['bboxes'])


@pytest.mark.slow
def test_segmentation_and_classification(tmp_path):
    pytest.importorskip('mmseg')
    pytest.importorskip('mmpretrain')
    from mlla_mm import MLLAInferencer

    seg_cfg = tmp_path / 'seg_tiny.py'
    seg_cfg.write_text(
        f'_base_ = [{str(ROOT / "configs/toy/upernet_mlla_t_toy.py")!r}]\n'
        f'model = dict(backbone=dict(arch={TINY}),\n'
        '    decode_head=dict(in_channels=[16, 32, 64, 128], channels=16),\n'
        '    auxiliary_head=dict(in_channels=64, channels=8))\n'
    )
    with pytest.warns(UserWarning, match='no checkpoint'):
        seg = MLLAInferencer(seg_cfg)
    img = np.random.default_rng(0).integers(0, 255, (70, 93, 3), dtype=np.uint8)
    out = seg([img, img[:50]], out_dir=str(tmp_path / 'seg'))
    assert [r['sem_seg'].shape for r in out] == [(70, 93), (50, 93)]  # the images' own sizes
    for r in out:
        assert r['sem_seg'].dtype == np.int64 and set(np.unique(r['sem_seg'])) <= {0, 1, 2, 3}
        assert abs(sum(r['class_fractions'].values()) - 1) < 1e-6
        assert set(r['class_fractions']) <= {'background', 'circle', 'square', 'triangle'}
        assert Path(r['out_file']).is_file()

    # docs/inference.md: mmseg's own inferencer with our config and a checkpoint
    from mmseg.apis import MMSegInferencer

    ckpt = tmp_path / 'seg_tiny.pth'
    meta = dict(classes=seg.classes, palette=list(seg.dataset_meta['palette']))
    torch.save(dict(state_dict=seg.model.state_dict(), meta=dict(dataset_meta=meta)), ckpt)
    found = MMSegInferencer(model=str(seg_cfg), weights=str(ckpt), device='cpu')(img)
    assert found['predictions'].shape == (70, 93)

    cls_cfg = tmp_path / 'cls_tiny.py'
    cls_cfg.write_text(
        f'_base_ = [{str(ROOT / "configs/mlla_t_in1k.py")!r}]\n'
        f'model = dict(backbone=dict(arch={TINY}, out_indices=(3,)), head=dict(in_channels=128))\n'
    )
    with pytest.warns(UserWarning, match='no checkpoint'):
        cls = MLLAInferencer(cls_cfg)
    result = cls(img, topk=3, out_file=str(tmp_path / 'cls.png'))
    assert result['task'] == 'classification' and len(result['topk_names']) == 3
    assert result['scores'].shape == (1000,) and abs(result['scores'].sum() - 1) < 1e-4
    assert list(result['topk_scores']) == sorted(result['topk_scores'], reverse=True)
    assert (tmp_path / 'cls.png').is_file()
    # docs/inference.md: mmpretrain's own inferencer with our config and a checkpoint
    from mmpretrain.apis import ImageClassificationInferencer

    ckpt = tmp_path / 'cls_tiny.pth'
    torch.save(dict(state_dict=cls.model.state_dict(), meta=dict()), ckpt)
    from mmengine.registry import DefaultScope

    # MMSegInferencer above left mmseg as the process's default scope, which mmpretrain's
    # inferencer (unlike ours) builds its pipeline in: set it, as one would in a script.
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        inferencer = ImageClassificationInferencer(model=str(cls_cfg), pretrained=str(ckpt))
    (found,) = inferencer(img)
    assert found['pred_scores'].shape == (1000,)
    assert found['pred_label'] == int(result['topk_labels'][0])  # the same weights, same answer

    # tools/image_demo.py --topk, in process
    import importlib.util

    import cv2

    spec = importlib.util.spec_from_file_location('image_demo', ROOT / 'tools' / 'image_demo.py')
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    cv2.imwrite(str(tmp_path / 'img.png'), img)
    args = [tmp_path / 'img.png', cls_cfg, ckpt, '--topk', '2', '--out-file', tmp_path / 'top2.png']
    shown = demo.main([str(a) for a in args])
    assert [t['label'] for t in shown['topk']] == list(result['topk_names'][:2])
    assert (tmp_path / 'top2.png').is_file()


def test_shipped_config_by_name(det):
    """``mlla_mm::NAME`` is a config path for the inferencer too, as for the tools."""
    from mlla_mm import MLLAInferencer

    arch = dict(_delete_=True, embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    tiny = {'model.backbone.arch': arch, 'model.neck.in_channels': [16, 32, 64, 128]}
    found = MLLAInferencer('mlla_mm::toy/mask_rcnn_mlla_t_toy.py', det['ckpt'], cfg_options=tiny)
    assert found.task == 'detection' and found.classes == CLASSES
    assert found.cfg.filename.endswith('mask_rcnn_mlla_t_toy.py')


def _seg_config(tmp_path: Path) -> Path:
    seg_cfg = tmp_path / 'seg_tiny.py'
    seg_cfg.write_text(
        f'_base_ = [{str(ROOT / "configs/toy/upernet_mlla_t_toy.py")!r}]\n'
        f'model = dict(backbone=dict(arch={TINY}),\n'
        '    decode_head=dict(in_channels=[16, 32, 64, 128], channels=16),\n'
        '    auxiliary_head=dict(in_channels=64, channels=8))\n'
    )
    return seg_cfg


def test_checkpoint_of_another_task_is_refused(det, tmp_path, capsys):
    """A Mask R-CNN checkpoint with an UperNet config: refused by the inferencer and the demo
    (as by tools/test.py), instead of running with random heads and class names like '3'."""
    pytest.importorskip('mmseg')
    from mlla_mm import MLLAInferencer
    from mlla_mm.utils.errors import CheckpointMismatchError

    seg_cfg = _seg_config(tmp_path)
    with pytest.raises(CheckpointMismatchError, match='decode_head.*check_checkpoint=False'):
        MLLAInferencer(seg_cfg, det['ckpt'])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / 'tools' / 'image_demo.py'), run_name='not_main')['main'](
            [str(det['images'][0]), str(seg_cfg), str(det['ckpt'])]
        )
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == '' and 'does not fit the model of this config' in captured.err
    with pytest.warns(UserWarning):  # opting out still works (mmengine warns of the keys)
        forced = MLLAInferencer(seg_cfg, det['ckpt'], check_checkpoint=False)
    assert forced.task == 'segmentation'


@pytest.mark.slow
def test_demo_stdout_is_json_only(det, tmp_path):
    """``mlla-demo ... | python -m json.tool``: what the libraries print while loading the
    checkpoint ("Loads checkpoint by local backend") goes to stderr."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'image_demo.py'), str(det['images'][0]),
         str(det['config']), str(det['ckpt']), '--out-file', str(tmp_path / 'out.png')],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert found['task'] == 'detection' and found['out_file'] == str(tmp_path / 'out.png')
    assert 'Loads checkpoint' in proc.stderr
