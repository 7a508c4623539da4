"""Time MLLA-T against mmdet's Swin-T (backbones, batch 1, no_grad) with the ``mlla_mm`` of a given
checkout, to compare two versions of the code side by side (run it alternately on each).

    git worktree add /tmp/before <commit>
    python tools/analysis/ab_inference.py /tmp/before --sizes 1280x800
    python tools/analysis/ab_inference.py . --sizes 1280x800

Prints, per size and precision (float32, bf16 autocast), the median latency of each model and
the ratio Swin-T / MLLA-T measured in the same process.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkout', help='folder whose mlla_mm is timed')
    parser.add_argument('--sizes', nargs='+', default=['1280x800'], help='WIDTHxHEIGHT')
    parser.add_argument('--repeats', type=int, default=4)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--fp32-only', action='store_true')
    args = parser.parse_args()
    root = str(Path(args.checkout).resolve())
    sys.path.insert(0, root)
    import torch
    from mmdet.models.backbones import SwinTransformer

    import mlla_mm
    from mlla_mm.models.backbones.mlla import MLLA

    if not mlla_mm.__file__.startswith(root):
        sys.exit(f'mlla_mm was imported from {mlla_mm.__file__}, not from {root}')
    torch.set_num_threads(args.threads)
    mlla = MLLA(arch='tiny').eval()
    swin = SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    swin.eval()  # mmdet's Swin returns None from train()

    def median_ms(model, x, autocast: bool) -> float:
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            model(x)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    for size in args.sizes:
        w, h = map(int, size.split('x'))
        x = torch.randn(1, 3, h, w)
        for autocast in (False,) if args.fp32_only else (False, True):
            a, b = median_ms(mlla, x, autocast), median_ms(swin, x, autocast)
            kind = 'bf16' if autocast else 'fp32'
            print(f'{root} {size} {kind}: MLLA-T {a:.0f} ms, Swin-T {b:.0f} ms, {b / a:.2f}x')


if __name__ == '__main__':
    main()
