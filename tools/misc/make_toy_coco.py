"""Write the toy COCO instance-segmentation dataset (coloured shapes with polygon masks).

    python tools/misc/make_toy_coco.py [data/toy_coco] [--num-train 400] [--num-val 50]
        [--size 128] [--max-objects 3] [--seed 0] [--force]

The layout is COCO's (annotations/instances_{train,val}.json, train/, val/), so that
configs/toy/mask_rcnn_mlla_t_toy.py reads it with mmdet's CocoDataset and CocoMetric. A complete
set written with the same arguments is kept (pass --force to write it again).
"""

import argparse

from mlla_mm.datasets.toy_coco import CLASSES, make_toy_coco


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Write the toy COCO dataset')
    parser.add_argument('out_dir', nargs='?', default='data/toy_coco', help='output folder')
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=50)
    parser.add_argument('--size', type=int, default=128, help='image side in pixels')
    parser.add_argument('--max-objects', type=int, default=3, help='shapes per image (max)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--force', action='store_true', help='rewrite an existing set')
    args = parser.parse_args(argv)
    files = make_toy_coco(
        args.out_dir,
        args.num_train,
        args.num_val,
        args.size,
        args.max_objects,
        args.seed,
        skip_existing=not args.force,
    )
    print(f'toy COCO ({", ".join(CLASSES)}): {args.num_train} train / {args.num_val} val images')
    for split, path in files.items():
        print(f'  {split}: {path}')


if __name__ == '__main__':
    main()
