"""The main job (``make demo``): Mask R-CNN with MLLA-T, trained and evaluated on toy COCO data.

    python tools/misc/demo.py [--work-dir work_dirs/demo] [--min-map50 0.5]

1. writes the toy COCO set to data/toy_coco (once; tools/misc/make_toy_coco.py),
2. trains configs/toy/mask_rcnn_mlla_t_toy.py from scratch with tools/train.py,
3. evaluates the last checkpoint on the toy val split with tools/test.py (mmdet's COCO metric),
4. draws the prediction on one val image with tools/image_demo.py (scores >= 0.5).

Every step runs the same tool a user would run, and shows its progress (mmengine's log, with an
ETA; the full logs are in the work dirs). Exits non-zero if the val bbox mAP_50 is below
``--min-map50``. The tools run with one intra-op thread unless OMP_NUM_THREADS is set.
"""

import argparse
import json
import os.path as osp
import subprocess
import sys
import time

from mmengine.runner.checkpoint import find_latest_checkpoint

from mlla_mm.utils.run_config import read_logged_metrics

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = 'configs/toy/mask_rcnn_mlla_t_toy.py'
DATA = 'data/toy_coco'


def _run(step: str, *args: str) -> float:
    """Run ``python ARGS`` in the repository root, streaming its output; return the seconds."""
    print(f'\n=== {step}: python {" ".join(args)}', flush=True)
    # The tools pick their threads themselves (one unless OMP_NUM_THREADS or --threads says
    # otherwise; see mlla_mm.utils.config_check.DEFAULT_THREADS).
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f'{step} failed (exit status {proc.returncode}); see its output above')
    return time.monotonic() - start


def _busiest_val_image() -> str:
    """The first toy val image with the most objects (the most to look at in the drawing)."""
    with open(osp.join(ROOT, DATA, 'annotations', 'instances_val.json')) as f:
        coco = json.load(f)
    counts = {img['id']: 0 for img in coco['images']}
    for ann in coco['annotations']:
        counts[ann['image_id']] += 1
    best = max(counts, key=lambda i: (counts[i], -i))
    name = next(img['file_name'] for img in coco['images'] if img['id'] == best)
    return f'{DATA}/val/{name}'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--min-map50', type=float, default=0.5, help='bbox mAP_50 to reach')
    args = parser.parse_args(argv)
    train_dir, test_dir = osp.join(args.work_dir, 'train'), osp.join(args.work_dir, 'test')
    out_png = osp.join(args.work_dir, 'prediction.png')

    times = {}
    times['data'] = _run('1/4 toy COCO data', 'tools/misc/make_toy_coco.py', DATA)
    times['train'] = _run('2/4 train', 'tools/train.py', CONFIG, '--work-dir', train_dir)
    ckpt = find_latest_checkpoint(osp.join(ROOT, train_dir))
    times['test'] = _run('3/4 test', 'tools/test.py', CONFIG, ckpt, '--work-dir', test_dir)
    metrics = read_logged_metrics(osp.join(ROOT, test_dir))
    times['draw'] = _run(
        '4/4 draw',
        'tools/image_demo.py',
        _busiest_val_image(),
        CONFIG,
        ckpt,
        '--out-file',
        out_png,
        '--score-thr',
        '0.5',
    )

    map50 = metrics['coco/bbox_mAP_50']
    print('\n=== Mask R-CNN + MLLA-T on the toy COCO val split')
    for key in ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'segm_mAP', 'segm_mAP_50'):
        print(f'  {key:12s} {metrics[f"coco/{key}"]:.3f}')
    print(f'  checkpoint   {ckpt}\n  prediction   {osp.join(ROOT, out_png)}')
    print('  time         ' + ', '.join(f'{k} {v:.0f} s' for k, v in times.items()))
    print(f'  total        {sum(times.values()) / 60:.1f} min')
    if map50 < args.min_map50:
        sys.exit(f'bbox mAP_50 {map50:.3f} is below {args.min_map50}: the detector did not learn')
    print(f'OK: bbox mAP_50 {map50:.3f} >= {args.min_map50}')


if __name__ == '__main__':
    main()
