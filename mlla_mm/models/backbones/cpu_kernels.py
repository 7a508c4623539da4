"""Fused CPU kernels for inference and the attention's backward, compiled on first use.

ATen runs the attention core's element-wise steps (``ELU + 1`` of q and k, the bf16 -> float32
conversion, RoPE, the normaliser, the gate product) as separate passes over memory; on the
64-channel stage-0 maps those passes cost more than the GEMMs around them. ``cpu_kernels.c``
does them in two passes over the tokens (keys, then queries) and one for the gate, leaving the
two products (``K^T V`` and ``Q (K^T V)``) to ATen's batched GEMMs. It also holds what the
reused buffers of large results need (:mod:`.fast_path`): a GEMM's bias and activation
epilogue in place (:func:`bias_act_`) and a LayerNorm into a given tensor (:func:`layer_norm`).

Each kernel is a torch custom operator (``torch.ops.mlla.attention_features``, ``gate_``,
``bias_act_``, ``layer_norm``, made with ``torch.library.custom_op``) with a fake
implementation, so the dispatcher, the profiler, FakeTensor and FLOP counters see it. Only the
fused inference path (:mod:`.fast_path`) and the training units (:mod:`.train_path`) call them;
the units' attention backward uses ``features`` (the features and their rotations in one
pass), ``attention_core_backward`` (the products, per head with its d x d state in cache, in
three passes over the tokens) and ``features_grad`` (RoPE's transpose, the normaliser's terms
and ELU's derivative in one pass), their float32 gate ``silu_gate_`` and
``silu_gate_backward_``, and their depthwise convs' backward ``dw3_backward``.

The C file has no Python or torch headers: on first use it is compiled with the system C
compiler (``$CC``, else ``cc``; about a second) for this machine's CPU (``-march=native``) into
a cache folder (``$MLLA_MM_KERNEL_CACHE``, else ``~/.cache/mlla_mm/kernels``), keyed by the
source, the compiler and the CPU flags, and called through :mod:`ctypes` (which releases the
GIL); the C code runs ``torch.get_num_threads()`` OpenMP threads on torch's own OpenMP runtime.
Why ctypes behind ``custom_op`` and not ``torch.utils.cpp_extension``: the C file compiles in
about a second, where a C++ extension against torch's headers takes about a minute on first use
(measured in docs/performance.md), and it needs no torch headers or ABI match.
Where no compiler works, one warning says so and the ATen path runs, with the same results;
``MLLA_MM_CPU_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = [
    'KernelBuildError',
    'attention_features',
    'bias_act_',
    'build',
    'cpu_flags',
    'dw3_backward',
    'enabled',
    'features',
    'features_grad',
    'gate_',
    'layer_norm',
    'library',
    'load',
    'silu_gate',
    'silu_gate_backward_',
    'usable',
]

SOURCE = Path(__file__).with_name('cpu_kernels.c')
X86 = platform.machine() in ('x86_64', 'AMD64')
FLAGS = (
    '-O3', '-fno-math-errno', '-fno-trapping-math', '-fno-signed-zeros', '-fopenmp-simd', '-fPIC',
    '-shared', *(('-mprefer-vector-width=512',) if X86 else ()),
)  # fmt: skip
# Tried in turn: OpenMP threads (on torch's libgomp, see cpu_kernels.c) and glibc's vector expf;
# without libmvec (not glibc) expf per element; without OpenMP one thread. Same results.
ATTEMPTS = (
    ('-fopenmp', '-lmvec', '-lm'),
    ('-fopenmp', '-DMLLA_NO_LIBMVEC', '-lm'),
    ('-DMLLA_NO_LIBMVEC', '-lm'),
)
MIN_SPLIT = 2**16  # elements: smaller calls run on one thread


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded."""


def enabled() -> bool:
    """Whether the kernels may be used (``MLLA_MM_CPU_KERNELS`` is not ``0``)."""
    return os.environ.get('MLLA_MM_CPU_KERNELS', '1') != '0'


def _cache_dir() -> Path:
    folder = os.environ.get('MLLA_MM_KERNEL_CACHE')
    if folder:
        return Path(folder)
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(root) / 'mlla_mm' / 'kernels'


def cpu_flags() -> set:
    """The CPU's feature flags (``/proc/cpuinfo``: ``flags`` on x86, ``Features`` on ARM), or an
    empty set where that file is missing."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return set()


def build(
    cc: str | None = None, cache_dir: str | Path | None = None, march: str = 'native'
) -> Path:
    """Compile ``cpu_kernels.c`` for this machine, or find it compiled in the cache.

    Args:
        cc: The C compiler (default ``$CC``, else ``cc``).
        cache_dir: Where compiled libraries are kept (default :func:`_cache_dir`).
        march: The target CPU (``-march``): this machine's by default; the tests also build
            for the x86-64 baseline (SSE2), as a CPU without AVX would run them.

    Returns:
        Path: The shared library.

    Raises:
        KernelBuildError: No compiler, or every compile attempt failed (the message holds the
            compiler's error).
    """
    cc = cc or os.environ.get('CC') or 'cc'
    compiler = shutil.which(cc)
    if compiler is None:
        raise KernelBuildError(f'no C compiler {cc!r} on PATH (set CC or install gcc/clang)')
    try:
        version = subprocess.run(
            [compiler, '--version'], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f'C compiler {compiler} does not run: {e}') from e
    source = SOURCE.read_bytes()
    flags = (f'-march={march}', *FLAGS)
    cpu_id = ' '.join(sorted(cpu_flags())) or platform.processor()
    key = hashlib.sha256(
        b'\0'.join([source, str(version).encode(), ' '.join(flags).encode(), cpu_id.encode()])
    ).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else _cache_dir()
    target = folder / f'mlla_kernels_{key}.so'
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: the temporary folder
        folder = Path(tempfile.gettempdir()) / f'mlla_mm_kernels_{getattr(os, "getuid", int)()}'
        target = folder / target.name
        if target.exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for libs in ATTEMPTS:
        fd, tmp = tempfile.mkstemp(suffix='.so', dir=folder)
        os.close(fd)
        defines = [f for f in libs if not f.startswith('-l')]
        links = [f for f in libs if f.startswith('-l')]
        cmd = [compiler, *flags, *defines, str(SOURCE), '-o', tmp, *links]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            try:
                ctypes.CDLL(tmp)  # all symbols resolve (libmvec present)
            except OSError as e:
                errors.append(str(e))
            else:
                os.replace(tmp, target)  # atomic: a concurrent build writes the same file
                return target
        else:
            errors.append(f'{" ".join(cmd)}: {result.stderr.strip()[-500:]}')
        os.unlink(tmp)
    raise KernelBuildError('compiling cpu_kernels.c failed: ' + ' | '.join(errors))


_LIB: ctypes.CDLL | None = None
_TRIED = False
_LOCK = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they are off or cannot be built (warned once)."""
    global _LIB, _TRIED
    if not enabled():
        return None
    if _TRIED:
        return _LIB
    with _LOCK:
        if not _TRIED:
            try:
                _LIB = load(build())
            except (KernelBuildError, OSError, subprocess.SubprocessError) as e:
                warnings.warn(
                    f'mlla_mm: fused CPU kernels unavailable, using ATen ops instead ({e}); set '
                    'MLLA_MM_CPU_KERNELS=0 to silence this',
                    RuntimeWarning,
                    stacklevel=2,
                )
            _TRIED = True
    return _LIB


def load(path: str | Path) -> ctypes.CDLL:
    """Load a library :func:`build` made, with its functions' signatures declared."""
    lib = ctypes.CDLL(str(path))
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.mlla_keys.argtypes = [p, i, p, p, p, n, n, i]
    lib.mlla_queries.argtypes = [p, i, p, p, p, n, n, n, i]
    lib.mlla_gate.argtypes = [p, p, i, n, i]
    lib.mlla_bias_act.argtypes = [p, i, p, n, n, i, i]
    lib.mlla_layer_norm.argtypes = [p, i, p, p, ctypes.c_float, p, i, n, n, i]
    lib.mlla_features.argtypes = [p, i, p, p, p, p, n, n, i]
    lib.mlla_features_grad.argtypes = [p, p, p, p, p, p, p, i, n, n, n, i]
    lib.mlla_silu_gate.argtypes = [p, p, p, n, i]
    lib.mlla_silu_gate_backward.argtypes = [p, p, p, n, i]
    lib.mlla_dw3_backward.argtypes = [p, p, i, p, p, p, n, n, n, n, i]
    lib.mlla_attention_core_backward.argtypes = [p, p, p, p, p, p, p, i, p, p, p, n, n, n, i]
    kernels = (
        lib.mlla_keys,
        lib.mlla_queries,
        lib.mlla_gate,
        lib.mlla_bias_act,
        lib.mlla_layer_norm,
        lib.mlla_features,
        lib.mlla_features_grad,
        lib.mlla_silu_gate,
        lib.mlla_silu_gate_backward,
        lib.mlla_dw3_backward,
        lib.mlla_attention_core_backward,
    )
    for f in kernels:
        f.restype = None
    return lib


def _threads(elements: int) -> int:
    """torch's thread count, or 1 for a call too small to split."""
    return max(1, min(torch.get_num_threads(), elements // MIN_SPLIT))


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can run on these tensors: CPU, contiguous, float32 or bfloat16, and
    the library built."""
    ok = all(
        t.device.type == 'cpu' and t.is_contiguous() and t.dtype in (torch.float32, torch.bfloat16)
        for t in tensors
    )
    return ok and library() is not None


# The kernels are torch custom operators (``torch.ops.mlla.*``): the dispatcher, the profiler
# (events named ``mlla::...``), FakeTensor / ``torch.compile`` (through their fake
# implementations) and FLOP counters (a formula where they do matrix work) see them. Each writes
# into a tensor it is given (``mutates_args``) and returns nothing; the Python wrappers below
# return that tensor.
@torch.library.custom_op('mlla::attention_features', mutates_args=('out',), device_types='cpu')
def _attention_features_op(
    qk: torch.Tensor, out: torch.Tensor, table: torch.Tensor, heads: int
) -> None:
    lib = library()
    b, n, _, c = qk.shape
    bf16 = int(qk.dtype == torch.bfloat16)
    threads = _threads(n * 2 * c)
    ksum = torch.empty(threads, c, dtype=torch.float64)
    for i in range(b):
        src, dst = qk[i].data_ptr(), out[i].data_ptr()
        ksum.zero_()
        lib.mlla_keys(src, bf16, dst, table.data_ptr(), ksum.data_ptr(), n, c, threads)
        kmean = (ksum.sum(0) / n).float()
        lib.mlla_queries(src, bf16, dst, table.data_ptr(), kmean.data_ptr(), n, c, heads, threads)


@_attention_features_op.register_fake
def _(qk, out, table, heads) -> None:
    return None


@register_flop_formula(torch.ops.mlla.attention_features)
def _attention_features_flops(qk_shape, buffer_shape, table_shape, heads, **kwargs) -> int:
    """The normaliser ``q . mean(k)`` (a (1 x C) @ (C x N) product per image) and the mean."""
    b, n, _, c = qk_shape
    return 2 * b * n * c + b * n * c


@torch.library.custom_op('mlla::gate_', mutates_args=('g',), device_types='cpu')
def _gate_op(y: torch.Tensor, g: torch.Tensor) -> None:
    n, bf16 = g.numel(), int(g.dtype == torch.bfloat16)
    library().mlla_gate(y.data_ptr(), g.data_ptr(), bf16, n, _threads(n))


@_gate_op.register_fake
def _(y, g) -> None:
    return None


@torch.library.custom_op('mlla::bias_act_', mutates_args=('y',), device_types='cpu')
def _bias_act_op(y: torch.Tensor, bias: torch.Tensor, act: int) -> None:
    c = y.shape[-1]
    rows, bf16, threads = y.numel() // c, int(y.dtype == torch.bfloat16), _threads(y.numel())
    library().mlla_bias_act(y.data_ptr(), bf16, bias.data_ptr(), rows, c, act, threads)


@_bias_act_op.register_fake
def _(y, bias, act) -> None:
    return None


@torch.library.custom_op('mlla::layer_norm', mutates_args=('out',), device_types='cpu')
def _layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out: torch.Tensor
) -> None:
    c = x.shape[-1]
    library().mlla_layer_norm(
        x.data_ptr(), int(x.dtype == torch.bfloat16), weight.data_ptr(), bias.data_ptr(), eps,
        out.data_ptr(), int(out.dtype == torch.bfloat16), x.numel() // c, c, _threads(x.numel()),
    )  # fmt: skip


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, out) -> None:
    return None


@torch.library.custom_op('mlla::features', mutates_args=('feat', 'rot'), device_types='cpu')
def _features_op(
    qk: torch.Tensor, feat: torch.Tensor, rot: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    n, _, c = qk.shape
    threads = _threads(n * 2 * c)
    ksum = torch.zeros(threads, c, dtype=torch.float64)
    library().mlla_features(
        qk.data_ptr(), int(qk.dtype == torch.bfloat16), feat.data_ptr(), rot.data_ptr(),
        table.data_ptr(), ksum.data_ptr(), n, c, threads,
    )  # fmt: skip
    return (ksum.sum(0) / n).float()


@_features_op.register_fake
def _(qk, feat, rot, table) -> torch.Tensor:
    return qk.new_empty(qk.shape[-1], dtype=torch.float32)


@torch.library.custom_op('mlla::features_grad', mutates_args=('out',), device_types='cpu')
def _features_grad_op(
    grad_rot: torch.Tensor,
    feat: torch.Tensor,
    table: torch.Tensor,
    gs: torch.Tensor,
    kmean: torch.Tensor,
    kconst: torch.Tensor,
    out: torch.Tensor,
) -> None:
    n, _, c = feat.shape
    library().mlla_features_grad(
        grad_rot.data_ptr(), feat.data_ptr(), table.data_ptr(), gs.data_ptr(), kmean.data_ptr(),
        kconst.data_ptr(), out.data_ptr(), int(out.dtype == torch.bfloat16), n, c, gs.shape[1],
        _threads(n * 2 * c),
    )  # fmt: skip


@_features_grad_op.register_fake
def _(grad_rot, feat, table, gs, kmean, kconst, out) -> None:
    return None


def features(
    qk: torch.Tensor, feat: torch.Tensor, rot: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """One image's positive features and their rotations, in one pass (training; the backward
    of a block's attention, ``torch.ops.mlla.features``).

    ``feat = ELU(qk) + 1`` and ``rot = RoPE(feat)`` for q and k.

    Args:
        qk: (N, 2, C) q and k before the feature map, float32 or bfloat16, contiguous.
        feat, rot: (N, 2, C) float32 outputs.
        table: (N, C / 2, 2) float32 RoPE table (cos, sin), contiguous.

    Returns:
        Tensor: (C,) float32 mean of the key features over the tokens (summed in float64).
    """
    return torch.ops.mlla.features(qk, feat, rot, table)


def features_grad(
    grad_rot: torch.Tensor,
    feat: torch.Tensor,
    table: torch.Tensor,
    gs: torch.Tensor,
    kmean: torch.Tensor,
    kconst: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """The gradient of one image's ``qk`` from its rotated features' (``torch.ops.mlla.
    features_grad``): RoPE's transpose, plus the normaliser's terms, times ELU's derivative.

    Args:
        grad_rot: (N, 2, C) float32 gradient of the rotated q and k features.
        feat: (N, 2, C) float32 features (:func:`features`).
        table: (N, C / 2, 2) float32 RoPE table.
        gs: (N, heads) float32 gradient of each token's normaliser sum ``q . mean(k) + 1e-6``
            (q's term: ``gs * mean(k)``).
        kmean: (C,) float32 mean of the key features.
        kconst: (C,) float32 gradient every key feature gets through ``mean(k)``.
        out: (N, 2, C) float32 or bfloat16 output (rounded once).

    Returns:
        Tensor: ``out``.
    """
    torch.ops.mlla.features_grad(grad_rot, feat, table, gs, kmean, kconst, out)
    return out


@torch.library.custom_op(
    'mlla::attention_core_backward',
    mutates_args=('rot', 'y', 'gv', 'gs', 'gkmean'),
    device_types='cpu',
)
def _attention_core_backward_op(
    feat: torch.Tensor,
    rot: torch.Tensor,
    v: torch.Tensor,
    go: torch.Tensor,
    lepe: torch.Tensor,
    kmean: torch.Tensor,
    y: torch.Tensor,
    gv: torch.Tensor,
    gs: torch.Tensor,
    gkmean: torch.Tensor,
) -> None:
    n, _, c = feat.shape
    library().mlla_attention_core_backward(
        feat.data_ptr(), rot.data_ptr(), v.data_ptr(), go.data_ptr(), lepe.data_ptr(),
        y.data_ptr(), gv.data_ptr(), int(v.dtype == torch.bfloat16), kmean.data_ptr(),
        gs.data_ptr(), gkmean.data_ptr(), n, c, gs.shape[1], _threads(n * 2 * c),
    )  # fmt: skip


@_attention_core_backward_op.register_fake
def _(feat, rot, v, go, lepe, kmean, y, gv, gs, gkmean) -> None:
    return None


@register_flop_formula(torch.ops.mlla.attention_core_backward)
def _attention_core_backward_flops(feat_shape, rot_shape, v_shape, *args, **kwargs) -> int:
    """Two FLOPs per multiply-add of the six d x d products per token and head (kv, the
    output, grad_kv, and q's, k's and v's gradients; the normaliser's dot products aside)."""
    n, _, c = feat_shape
    heads = args[5][1]  # gs: (N, heads)
    return 2 * 6 * n * c * (c // heads)


def attention_core_backward(
    feat: torch.Tensor,
    rot: torch.Tensor,
    v: torch.Tensor,
    go: torch.Tensor,
    lepe: torch.Tensor,
    kmean: torch.Tensor,
    y: torch.Tensor,
    gv: torch.Tensor,
    gs: torch.Tensor,
    gkmean: torch.Tensor,
) -> None:
    """The products of one image's attention backward, fused (training; ``torch.ops.mlla.
    attention_core_backward``): what :func:`~.mlla.core_backward` computes with nine ATen
    products and seven element-wise passes, in three passes over the tokens with each head's
    d x d matrices in cache, reading the values, the output's gradient and the LePE in their
    dtype and writing the output and the values' gradient rounded once.

    Args:
        feat, rot: (N, 2, C) float32 features and their rotations (:func:`features`); ``rot``
            is overwritten with the rotations' gradients.
        v, go, lepe: (N, C) values, output gradient and LePE, all float32 or all bfloat16.
        kmean: (C,) float32 mean of the key features.
        y: (N, C) output ``attention + lepe``, in ``v``'s dtype; may be ``lepe`` itself (each
            row is read before it is written).
        gv: (N, C) values' gradient, in ``v``'s dtype.
        gs: (N, heads) float32 gradient of each token's normaliser sum.
        gkmean: (C,) float32 gradient every key feature gets through ``mean(k)``.
    """
    torch.ops.mlla.attention_core_backward(feat, rot, v, go, lepe, kmean, y, gv, gs, gkmean)


@torch.library.custom_op('mlla::silu_gate', mutates_args=('out',), device_types='cpu')
def _silu_gate_op(y: torch.Tensor, a: torch.Tensor, out: torch.Tensor) -> None:
    n = y.numel()
    library().mlla_silu_gate(y.data_ptr(), a.data_ptr(), out.data_ptr(), n, _threads(n))


@_silu_gate_op.register_fake
def _(y, a, out) -> None:
    return None


@torch.library.custom_op('mlla::silu_gate_backward_', mutates_args=('g', 'y'), device_types='cpu')
def _silu_gate_backward_op(g: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> None:
    n = g.numel()
    library().mlla_silu_gate_backward(g.data_ptr(), y.data_ptr(), a.data_ptr(), n, _threads(n))


@_silu_gate_backward_op.register_fake
def _(g, y, a) -> None:
    return None


def silu_gate(y: torch.Tensor, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = y * SiLU(a)`` in one pass (``torch.ops.mlla.silu_gate``; a block's gate in
    training, and the gradient of its other factor), float32 contiguous tensors of one shape;
    ``out`` may be ``y``.

    Returns:
        Tensor: ``out``.
    """
    torch.ops.mlla.silu_gate(y, a, out)
    return out


def silu_gate_backward_(
    g: torch.Tensor, y: torch.Tensor, a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest of the backward of ``m = y * SiLU(a)`` in one pass, in place
    (``torch.ops.mlla.silu_gate_backward_``), float32 contiguous tensors of one shape: given
    ``g``, the gradient of ``m``, writes ``m`` into ``y`` and the gradient of ``a`` into ``g``
    (``y``'s is ``silu_gate(g, a)``).

    Returns:
        tuple: ``(m, g_a)``, the tensors ``y`` and ``g``.
    """
    torch.ops.mlla.silu_gate_backward_(g, y, a)
    return y, g


@torch.library.custom_op('mlla::dw3_backward', mutates_args=('gx', 'sums'), device_types='cpu')
def _dw3_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    taps: torch.Tensor,
    gx: torch.Tensor | None,
    sums: torch.Tensor | None,
) -> None:
    b, h, w, c = x.shape
    threads = sums.shape[0] if sums is not None else _threads(x.numel())
    library().mlla_dw3_backward(
        grad.data_ptr(), x.data_ptr(), int(x.dtype == torch.bfloat16), taps.data_ptr(),
        None if gx is None else gx.data_ptr(), None if sums is None else sums.data_ptr(),
        b, h, w, c, threads,
    )  # fmt: skip


@_dw3_backward_op.register_fake
def _(grad, x, taps, gx, sums) -> None:
    return None


@register_flop_formula(torch.ops.mlla.dw3_backward)
def _dw3_backward_flops(grad_shape, x_shape, taps_shape, gx_shape, sums_shape, **kwargs) -> int:
    """Two FLOPs per multiply-add of each gradient computed: the forward conv's count for the
    input's and again for the taps' (torch's ``convolution_backward`` formula counts the
    weight's gradient of a grouped conv as if it were dense)."""
    per_token = 9 * ((gx_shape is not None) + (sums_shape is not None))
    return 2 * per_token * x_shape[0] * x_shape[1] * x_shape[2] * x_shape[3]


def dw3_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward of a depthwise 3x3 conv with stride 1 and zero padding 1 on channels-last
    tokens, in one pass over the rows (``torch.ops.mlla.dw3_backward``): oneDNN's runs the
    input's and the weight's gradients as two convolutions, and in bf16 about 1.5x slower
    than in float32.

    Args:
        grad: (B, H, W, C) gradient of the conv's output, contiguous, ``x``'s dtype.
        x: (B, H, W, C) the conv's input, float32 or bfloat16, contiguous.
        weight: (C, 1, 3, 3) the conv's weight (in the dtype the conv ran in).
        bias: (C,) its bias, or None.
        need_x, need_w, need_b: Which gradients to compute.
        out: Where to write the input's gradient (a contiguous tensor of ``x``'s shape and
            dtype that is neither ``grad`` nor ``x``), else a new tensor.

    Returns:
        tuple: The gradients of ``x`` (float32 sums rounded once to its dtype), ``weight`` and
        ``bias`` (float64 sums of float32 row sums, rounded to their dtypes), None where not
        asked for.
    """
    b, h, w, c = x.shape
    need_b = need_b and bias is not None
    taps = weight.reshape(c, 9).t().float().contiguous()
    gx = None if not need_x else torch.empty_like(x) if out is None else out
    sums = None
    if need_w or need_b:
        sums = torch.zeros(_threads(x.numel()), 10, c, dtype=torch.float64, device=x.device)
    torch.ops.mlla.dw3_backward(grad, x, taps, gx, sums)
    if sums is None:
        return gx, None, None
    total = sums.sum(0)
    gw = total[:9].t().reshape(weight.shape).to(weight.dtype) if need_w else None
    gb = total[9].to(bias.dtype) if need_b else None
    return gx, gw, gb


def attention_features(
    qk: torch.Tensor, out: torch.Tensor, table: torch.Tensor, heads: int
) -> torch.Tensor:
    """The rotated, normalised q and the rotated k of the attention core, in one call
    (``torch.ops.mlla.attention_features``).

    For each image: ``k = ELU(qk[:, 1]) + 1``, ``out[:, 1] = RoPE(k)``; then ``q = ELU(qk[:, 0])
    + 1``, ``out[:, 0] = RoPE(q) / (q . mean(k) + 1e-6)`` per head.

    Args:
        qk: (B, N, 2, C) q and k before the feature map, float32 or bfloat16, contiguous.
        out: (B, N, 2, C) float32 (may be ``qk`` itself when that is float32).
        table: (N, C / 2, 2) float32 RoPE table (cos, sin), contiguous.
        heads: Number of heads (the normaliser is per head).

    Returns:
        Tensor: ``out``.
    """
    torch.ops.mlla.attention_features(qk, out, table, heads)
    return out


def gate_(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``g *= y`` in ``g``'s dtype (float32 or bfloat16, rounded once), ``y`` float32
    (``torch.ops.mlla.gate_``)."""
    torch.ops.mlla.gate_(y, g)
    return g


ACTS = {None: 0, 'silu': 1, 'gelu': 2}


def bias_act_(y: torch.Tensor, bias: torch.Tensor | None, act: str | None) -> torch.Tensor:
    """``y = act(y + bias)`` in place over the last dimension, a GEMM's epilogue
    (``torch.ops.mlla.bias_act_``).

    Args:
        y: (..., C) float32 or bf16, contiguous.
        bias: (C,) float32, or None.
        act: None, ``'silu'`` or ``'gelu'`` (exact, with erf).
    """
    if bias is None:
        bias = y.new_zeros(y.shape[-1], dtype=torch.float32)
    torch.ops.mlla.bias_act_(y, bias, ACTS[act])
    return y


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out: torch.Tensor
) -> torch.Tensor:
    """``out = LayerNorm(x)`` over the last dimension, into ``out`` (float32 maths;
    ``torch.ops.mlla.layer_norm``).

    Args:
        x, out: (..., C) float32 or bf16, contiguous.
        weight, bias: (C,) float32.
    """
    torch.ops.mlla.layer_norm(x, weight, bias, eps, out)
    return out
