"""Write the toy ADE20K-layout segmentation dataset (coloured shapes on textures).

    python tools/misc/make_toy_ade20k.py [data/toy_ade20k] [--num-train 200] [--num-val 40]
        [--size 128] [--seed 0]

The same as ``mlla-make-toy ade20k`` (:mod:`mlla_mm.datasets.toy_ade20k`). The layout is
ADEChallengeData2016's (images/{training,validation}/*.jpg, annotations/{training,validation}/*.png
with 0 = unlabelled), so that configs/toy/upernet_mlla_t_toy.py reads it with mmseg's pipelines
and IoUMetric.
"""

import argparse

from mlla_mm.datasets.toy_ade20k import add_arguments, run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Write the toy ADE20K-layout dataset')
    add_arguments(parser)
    run(parser.parse_args(argv), parser)


if __name__ == '__main__':
    main()
