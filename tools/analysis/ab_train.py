"""Time training steps of MLLA-T and mmdet's Swin-T alternately in one process (backbones,
forward + backward of the outputs' squared means), and optionally where each step's op time goes.

    python tools/analysis/ab_train.py --size 1280x800 --batch-size 2 --steps 3 [--dtype bf16]
    python tools/analysis/ab_train.py --size 1280x800 --batch-size 2 --profile --only mlla_t
    python tools/analysis/ab_train.py --size 1280x800 --batch-size 2 --flops

The models step in turn (MLLA-T, Swin-T, MLLA-T, ...), so both see the same machine state and
the same heap; each line gives a step's time and its minor page faults (``getrusage``), the
last the medians and the ratio Swin-T / MLLA-T. ``--profile`` instead profiles one step of each
(after a warm-up) and prints the op self time by kind: GEMMs, depthwise and other convs, this
package's C kernels (``mlla::*``) and everything else (element-wise ops, casts, norms, copies);
``--only`` builds and profiles one model, so that its process holds no other model's heap.
``--flops`` counts each model's training-step FLOPs (``FlopCounterMode``: matmuls and convs),
with a grouped conv's weight gradient counted per group (torch's formula counts it as a dense
conv's, C times too many for a depthwise one) and the in-place ``addmm_`` / ``baddbmm_`` it has
no formula for: the module path's, which FLOP counters see
(MLLA's training units step aside under them), and, for MLLA-T, what its units run (they also
recompute parts of the forward in backward) - the work both steps do, against which their
times compare.
"""

import argparse
import math
import resource
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from mlla_mm.analysis.benchmark.peers import build_peer
from mlla_mm.models.backbones import train_path

GEMMS = {'aten::mm', 'aten::addmm', 'aten::addmm_', 'aten::bmm', 'aten::baddbmm', 'aten::baddbmm_'}
CONVS = {'aten::mkldnn_convolution', 'aten::convolution_backward', 'aten::slow_conv_transpose2d'}
WRAPPERS = ('autograd::', 'mlla.', 'ProfilerStep')  # whose self time is their children's


def step(model, x: torch.Tensor, bf16: bool) -> None:
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        outs = model(x)
    sum(o.float().square().mean() for o in outs).backward()


def op_time_by_kind(model, x: torch.Tensor, bf16: bool) -> dict:
    """Milliseconds of op self time in one profiled step, by kind."""
    step(model, x, bf16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(model, x, bf16)
    kinds = dict.fromkeys(('GEMM', 'depthwise conv', 'other conv', 'C kernels', 'other'), 0.0)
    for event in prof.key_averages(group_by_input_shape=True):
        name, ms = event.key, event.self_cpu_time_total / 1e3
        if name.startswith(WRAPPERS) or name.endswith(('Function', 'FunctionBackward')):
            continue
        if name in GEMMS:
            kinds['GEMM'] += ms
        elif name in CONVS:
            weight = event.input_shapes[2] if 'backward' in name else event.input_shapes[1]
            depthwise = len(weight) == 4 and weight[1] == 1
            kinds['depthwise conv' if depthwise else 'other conv'] += ms
        elif name.startswith('mlla::'):
            kinds['C kernels'] += ms
        else:
            kinds['other'] += ms
    return kinds


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs):
    """Two FLOPs per multiply-add of each gradient computed, the forward conv's count each
    (its weight's ``w_shape[1:]`` taps per output element), grouped or not."""
    transposed, output_mask = args[4], args[7]
    forward = 2 * math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    """``addmm_`` and ``baddbmm_`` (in-place accumulations the units use, which torch's
    counter has no formula for): two FLOPs per multiply-add of the product."""
    return 2 * math.prod(a_shape) * b_shape[-1]


def step_flops(model, x: torch.Tensor, bf16: bool, units: bool) -> int:
    """FLOPs of one training step; with ``units``, MLLA's training units run under the counter
    (they step aside under any dispatch mode, so counters see the module path otherwise)."""
    aten = torch.ops.aten
    mapping = {
        aten.convolution_backward: _conv_backward_flops,
        aten.addmm_: _addmm_flops,
        aten.baddbmm_: _addmm_flops,
    }
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    original = train_path.why_not_train_path

    def counted(module, t, autocast=False):
        why = original(module, t, autocast)
        return None if units and why and 'DispatchMode' in why else why

    train_path.why_not_train_path = counted
    try:
        with counter:
            step(model, x, bf16)
    finally:
        train_path.why_not_train_path = original
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', default='1280x800', help='WIDTHxHEIGHT')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--steps', type=int, default=3, help='timed steps of each model')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32')
    parser.add_argument('--profile', action='store_true', help='op time by kind instead')
    parser.add_argument('--only', choices=('mlla_t', 'swin_t'), help='with --profile: one model')
    parser.add_argument('--flops', action='store_true', help="each step's FLOPs instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w, h = map(int, args.size.split('x'))
    x = torch.randn(args.batch_size, 3, h, w)
    bf16 = args.dtype == 'bf16'
    names = {'mlla_t': 'MLLA-T', 'swin_t': 'Swin-T'}
    if args.only and not args.profile:
        parser.error('--only goes with --profile (the timing compares both models)')
    peers = [args.only] if args.only else list(names)
    models = {names[peer]: build_peer(peer) for peer in peers}
    for model in models.values():
        model.train()  # mmdet's Swin returns None from train()
    if args.flops:
        for name, model in models.items():
            seen = step_flops(model, x, bf16, units=False) / 1e9
            line = f'{name} {args.size} b{args.batch_size} training step: {seen:.1f} GFLOP'
            if name == 'MLLA-T':
                run = step_flops(model, x, bf16, units=True) / 1e9
                line += f' of the module path, {run:.1f} GFLOP as its training units run it'
            print(line)
        return
    if args.profile:
        for name, model in models.items():
            kinds = op_time_by_kind(model, x, bf16)
            parts = ', '.join(f'{k} {v:.0f}' for k, v in kinds.items())
            print(f'{name} {args.size} b{args.batch_size} {args.dtype} op ms: {parts}; '
                  f'total {sum(kinds.values()):.0f}')  # fmt: skip
        return
    times = {name: [] for name in models}
    for i in range(args.steps + 1):  # the first round warms up
        for name, model in models.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step(model, x, bf16)
            ms = 1e3 * (time.perf_counter() - t0)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            print(f'{name} step {i}{" (warm-up)" if i == 0 else ""}: {ms:.0f} ms, {faults} faults')
            if i:
                times[name].append(ms)
    a, b = (statistics.median(times[name]) for name in models)
    print(f'{args.size} b{args.batch_size} {args.dtype}: MLLA-T {a:.0f} ms, Swin-T {b:.0f} ms, '
          f'{b / a:.2f}x')  # fmt: skip


if __name__ == '__main__':
    main()
