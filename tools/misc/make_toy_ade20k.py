"""Write the toy ADE20K-layout segmentation dataset (coloured shapes on textures).

    python tools/misc/make_toy_ade20k.py data/toy_ade20k [--num-train 200] [--num-val 40]
        [--size 128] [--seed 0]

The layout is ADEChallengeData2016's (images/{training,validation}/*.jpg,
annotations/{training,validation}/*.png with 0 = unlabelled), so that
configs/toy/upernet_mlla_t_toy.py reads it with mmseg's pipelines and IoUMetric.
"""

import argparse

from mlla_mm.datasets.toy_ade20k import CLASSES, make_toy_ade20k


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Write the toy ADE20K-layout dataset')
    parser.add_argument('out_dir', nargs='?', default='data/toy_ade20k', help='output folder')
    parser.add_argument('--num-train', type=int, default=200)
    parser.add_argument('--num-val', type=int, default=40)
    parser.add_argument('--size', type=int, default=128, help='image height in pixels')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    try:
        root = make_toy_ade20k(args.out_dir, args.num_train, args.num_val, args.size, args.seed)
    except ValueError as e:
        parser.error(str(e))
    print(
        f'toy ADE20K ({", ".join(CLASSES)}): {args.num_train} training / {args.num_val} '
        f'validation images in {root}'
    )


if __name__ == '__main__':
    main()
