"""Run a detector, segmentor or classifier (top-5 classes) on one image and draw the result.

    python tools/image_demo.py IMG CONFIG CHECKPOINT --out-file OUT.png [--device cpu]
        [--score-thr 0.3] [--opacity 0.5]

The task comes from the config's ``default_scope`` (see mlla_mm/inference.py).
"""

import argparse
import json

from mlla_mm.inference import inference_image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Inference on one image')
    parser.add_argument('img', help='image file')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out-file', required=True, help='drawing of the result (PNG)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--score-thr', type=float, default=0.3, help='detection score threshold')
    parser.add_argument('--opacity', type=float, default=0.5, help='segmentation overlay opacity')
    args = parser.parse_args(argv)
    result = inference_image(
        args.config,
        args.checkpoint,
        args.img,
        args.out_file,
        args.device,
        score_thr=args.score_thr,
        opacity=args.opacity,
    )
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
