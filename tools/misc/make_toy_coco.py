"""Write the toy COCO instance-segmentation dataset (coloured shapes with polygon masks).

    python tools/misc/make_toy_coco.py [data/toy_coco] [--num-train 400] [--num-val 50]
        [--size 128] [--max-objects 3] [--seed 0] [--force]

The same as ``mlla-make-toy coco`` (:mod:`mlla_mm.datasets.toy_coco`). The layout is COCO's
(annotations/instances_{train,val}.json, train/, val/), so that configs/toy/mask_rcnn_mlla_t_toy.py
reads it with mmdet's CocoDataset and CocoMetric. A complete set written with the same arguments
is kept (pass --force to write it again).
"""

import argparse

from mlla_mm.datasets.toy_coco import add_arguments, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Write the toy COCO dataset')
    add_arguments(parser)
    run(parser.parse_args(argv), parser)


if __name__ == '__main__':
    main()
