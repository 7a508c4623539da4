"""Execution strategies of the MLLA layers: how :mod:`mlla_mm.models.backbones.mlla` runs fast.

:mod:`~mlla_mm.models.backbones.mlla` writes the equations (stem -> stages -> blocks ->
attention); every step that has a faster way to run calls one of the functions below, which give
the same result as the plain operation (the tests hold each one to the plain transcription,
:mod:`mlla_mm.testing`). The strategy is chosen per call from the call's context, not by a mode
switch: the same model object trains, runs inference, is exported to ONNX, runs under autocast or
as a bf16 model, and its state dict never changes (no folded or repacked weights are stored).

The interface
-------------
Primitives (the plain op under autograd, tracing, ``torch.compile``, on devices other than the
CPU and where a kernel is missing; without autograd on the CPU a fused oneDNN kernel):

* :func:`linear` - ``act(x W^T + b)``, bias and activation in the GEMM's epilogue;
* :func:`add_linear` - ``residual + x W^T + b``, accumulated into ``residual``;
* :func:`conv` / :func:`add_conv` - the same for convolutions;
* :func:`dwconv_nhwc` - a depthwise conv on channels-last tokens, ``x + conv(x)`` as one conv;
* :func:`elu_plus_one` - ``ELU(x) + 1`` as ``exp(min(x, 0)) + max(x, 0)``, in place in chunks;
* :func:`rope_rotate` - RoPE of q and k as one complex product with a cached table;
* :func:`gate` - ``y * g`` in place into ``g`` (the float32 attention output cast first);
* :func:`to_nchw` - tokens to a contiguous NCHW output as one 2-D transpose per image;
* :func:`layer_norm` - LayerNorm, into a workspace for large results (see Memory);
* :func:`to_float` / :func:`workspace` - float32 copies of half/bf16 q/k and v for the attention
  core in reused buffers (no fresh pages per block).

Fused C kernels (:mod:`.cpu_kernels`, compiled on first use; ATen ops where no C compiler works):
``ELU + 1``, RoPE and the normaliser of q and k in two passes over the tokens (bf16 or float32
in, float32 out) inside :func:`attend_inplace`, and the gate product with one rounding inside
:func:`gate`.

Layer strategies (inference without autograd, on the layer's modules):

* :func:`attend_inplace` - the attention core in place on strided per-head views;
* :func:`add_mlp` / :func:`mlp` - ``x + MLP(LN(x))`` over chunks of tokens, in place (training:
  a custom autograd function over chunks that keeps only GELU's input);
* :func:`stem_conv3_bands`, :func:`patch_merging_bands` - the stride-2 convs over bands of rows,
  so that their 4x / 8x-wide hidden tensors never exist whole.

Precision
---------
:func:`kernel_dtype` decides which fused kernel may run: float32; bfloat16 for a bf16 model
(``model.to(torch.bfloat16)``) and under bf16 autocast (float32 weights are cast once and cached
per parameter version, :func:`cast`), where oneDNN takes AMX or AVX512-BF16 instructions. The
linear-attention core (``ELU + 1`` of q/k, normaliser, KV and query products, LePE) always runs
in float32.

Why per call, not a ``fuse()`` / ``switch_to_deploy()`` switch: a deploy switch would fold
BatchNorm and repack weights into the model once, and then the model could no longer train,
export or load a checkpoint unchanged; every entry point (mmdet, mmseg, mmpretrain runners, the
inferencer, ONNX export) would have to know to call it. Choosing per call costs a few Python
checks per layer and keeps one model object correct everywhere.

Memory
------
Large fresh tensors are faulted in afresh at every call (glibc maps every allocation at or
above its mmap threshold anew): the cause of the superlinear latency at high resolution
(docs/performance.md). Inside a block, results of at least :data:`SCRATCH_MIN_BYTES` (the
stage-0/1 maps above ~1280x800) go to per-thread :func:`workspace` buffers instead: the
``scratch=`` argument of :func:`linear` (``torch.mm(out=)`` and a C bias/activation epilogue),
:func:`layer_norm` (C kernel) and :func:`dwconv_nhwc` (oneDNN's conv accumulating into a zeroed
buffer); a module's output is always a fresh tensor. Below that size oneDNN's fused epilogues
on heap-reused tensors are faster. :func:`keep_freed_memory` (opt-in, process-wide) stops glibc
from returning freed memory at all, for every tensor of the process.

Capabilities
------------
The private ``torch.ops.mkldnn`` kernels are used only where :data:`CAPS` says they exist
(``onednn``), bf16 kernels only where oneDNN reports bf16 support (``bf16``), and the C kernels
only where they may (``cpu_kernels``, off with ``MLLA_MM_CPU_KERNELS=0``) and could be built;
otherwise the plain ops run, with the same results. Tests switch the flags off to check that
fallback.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels

__all__ = [
    'CAPS',
    'CHUNK_ELEMENTS',
    'Capabilities',
    'add_conv',
    'add_linear',
    'add_mlp',
    'apply_rope',
    'attend_inplace',
    'c_kernels_for',
    'cast',
    'conv',
    'dwconv_nhwc',
    'elu_plus_one',
    'gate',
    'inference',
    'keep_freed_memory',
    'kernel_dtype',
    'layer_norm',
    'linear',
    'patch_merging_bands',
    'release_workspace',
    'rope_rotate',
    'rope_tables',
    'stem_conv3_bands',
    'to_float',
    'to_nchw',
    'workspace',
]


# --------------------------------------------------------------------------------------------
# Capabilities and context
# --------------------------------------------------------------------------------------------
@dataclass
class Capabilities:
    """What this torch build and CPU offer (detected once at import; tests may switch it off).

    Attributes:
        onednn: oneDNN is available and torch has the fused ``torch.ops.mkldnn`` kernels
            (``_linear_pointwise``, ``_convolution_pointwise``, ``_convolution_pointwise_``).
        bf16: oneDNN runs bf16 kernels on this CPU (AVX512-BF16 or AMX; oneDNN reports it).
        amx: The CPU has AMX tiles for bf16 (``amx_bf16`` in ``/proc/cpuinfo``).
        isa: ``torch.backends.cpu.get_cpu_capability()`` (ATen's vector ISA).
        cpu_kernels: The fused attention-core kernels of :mod:`.cpu_kernels` may be used (not
            turned off by ``MLLA_MM_CPU_KERNELS=0``); they are compiled on first use, and the
            ATen path runs where that fails.
    """

    onednn: bool
    bf16: bool
    amx: bool
    isa: str
    cpu_kernels: bool = True

    @classmethod
    def detect(cls) -> Capabilities:
        ops = torch.ops.mkldnn
        names = ('_linear_pointwise', '_convolution_pointwise', '_convolution_pointwise_')
        onednn = torch.backends.mkldnn.is_available() and all(hasattr(ops, n) for n in names)
        try:
            bf16 = onednn and bool(ops._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            bf16 = False
        try:
            isa = torch.backends.cpu.get_cpu_capability()
        except (AttributeError, RuntimeError):  # pragma: no cover - very old torch
            isa = 'unknown'
        amx = 'amx_bf16' in cpu_kernels.cpu_flags()
        return cls(onednn, bf16, amx, isa, cpu_kernels=cpu_kernels.enabled())

    def describe(self) -> str:
        """One line for logs and benchmark output (compiles the C kernels if not yet done)."""
        ready = self.cpu_kernels and cpu_kernels.library() is not None
        core = 'fused C kernels' if ready else 'ATen ops'
        if not self.onednn:
            return (
                f'plain ATen ops (no fused oneDNN kernels); attention core: {core}; '
                f'ATen ISA {self.isa}'
            )
        kind = 'AMX' if self.amx else 'AVX512-BF16' if self.bf16 else 'none'
        return (
            f'oneDNN fused fp32 kernels; bf16 kernels: {kind}; attention core: {core}; '
            f'ATen ISA {self.isa}'
        )


CAPS = Capabilities.detect()


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on ``device_type``, or None when autocast is off there."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4
        if device_type == 'cpu':
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def inference(x: torch.Tensor) -> bool:
    """Whether the inference strategies (in place, chunked) may run: no autograd, no tracing."""
    return not torch.is_grad_enabled() and not _tracing()


def kernel_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a fused oneDNN kernel runs ``x`` with ``weight`` in, or None for the plain op.

    Fused kernels run on the CPU without autograd or tracing: in float32 when both are float32,
    in bf16 when both are bf16 or under bf16 autocast (float32 operands are cast), where the CPU
    has bf16 kernels.
    """
    if not (CAPS.onednn and inference(x) and x.device.type == 'cpu'):
        return None
    autocast = _autocast_dtype('cpu')
    if autocast is not None:
        floats = (torch.float32, torch.bfloat16)
        ok = autocast == torch.bfloat16 and CAPS.bf16
        return torch.bfloat16 if ok and x.dtype in floats and weight.dtype in floats else None
    if x.dtype != weight.dtype:
        return None
    if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and CAPS.bf16):
        return x.dtype
    return None


_CAST_CACHE: dict = {}  # id(parameter) -> (key, cast); an entry dies with its parameter
_CAST_LOCK = threading.Lock()


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype``. A parameter's cast is cached until the parameter changes (its version
    counter or storage), so bf16 autocast casts each float32 weight once, not at every call;
    the cache holds one bf16 copy of the weights per model and dies with the model (it is not
    an attribute: nothing of it reaches a state dict or a pickle)."""
    if t is None or t.dtype == dtype:
        return t
    if (
        not isinstance(t, nn.Parameter)
        or (t.requires_grad and torch.is_grad_enabled())  # differentiable
        or t.is_inference()  # made under inference_mode: no version counter to key on
    ):
        return t.to(dtype)
    key = (t._version, t.data_ptr(), dtype)
    hit = _CAST_CACHE.get(id(t))
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.inference_mode(False), torch.no_grad():
        value = t.detach().to(dtype)
    with _CAST_LOCK:
        if id(t) not in _CAST_CACHE:
            weakref.finalize(t, _CAST_CACHE.pop, id(t), None)
        _CAST_CACHE[id(t)] = (key, value)
    return value


_WORKSPACE = threading.local()


def workspace(
    name: str, like: torch.Tensor, dtype: torch.dtype, shape: tuple | None = None
) -> torch.Tensor:
    """A reusable buffer of ``like``'s shape (or ``shape``) in ``dtype`` (inference scratch).

    Fresh large tensors are page-faulted in at every call (glibc maps every allocation at or
    above its mmap threshold afresh and unmaps it on free; a 16 MB float32 stage-0 map at
    1280x800 costs ~3.5 ms of faults on one core here), which cost as much as the work on them.
    One buffer per name and thread is kept instead, grown when a larger one is needed and reused
    by the next block and the next call; :func:`release_workspace` frees them. Callers must be
    done with a buffer before they ask for the same name again, and a buffer never leaves the
    layer that asked for it (a module's output is always a fresh tensor).
    """
    shape = tuple(like.shape if shape is None else shape)
    numel = math.prod(shape)
    buffers = _WORKSPACE.__dict__
    buf = buffers.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != like.device:
        with torch.inference_mode(False), torch.no_grad():
            buf = torch.empty(numel, dtype=dtype, device=like.device)
        buffers[name] = buf
    return buf[:numel].view(shape)


def release_workspace() -> None:
    """Free this thread's :func:`workspace` buffers."""
    _WORKSPACE.__dict__.clear()


def to_float(x: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``x.to(dtype)``; at inference a conversion lands in the :func:`workspace` ``name``."""
    if x.dtype == dtype or not inference(x):
        return x.to(dtype)
    return workspace(name, x, dtype).copy_(x)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory(enable: bool = True) -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it (process-wide).

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with
    fresh pages from the kernel and unmaps them on free, and trims the heap when its free top
    exceeds the trim threshold: a high-resolution forward then faults in every large tensor
    afresh (MLLA-T at 2048x2048: ~0.94M page faults, 3.8 GB, per forward in float32). With
    ``enable`` no allocation is mmapped and the heap is never trimmed, so freed tensors are
    reused without page faults; the process keeps its peak heap. The same as starting Python
    with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` in the environment; jemalloc or
    tcmalloc (``LD_PRELOAD``) do the same for any program. ``enable=False`` restores glibc's
    defaults (mmap on, 128 KiB trim threshold).

    Returns:
        bool: Whether the setting was applied (False where the C library is not glibc).
    """
    try:
        import ctypes

        libc = ctypes.CDLL('libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt takes an int: the largest trim threshold keeps up to 2 GiB of free heap top
    trim = 2**31 - 1 if enable else 128 * 1024
    mmap_ok = mallopt(_M_MMAP_MAX, 0 if enable else 65536) == 1
    return mmap_ok and mallopt(_M_TRIM_THRESHOLD, trim) == 1


# --------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------
_ONEDNN_ACTS = {None: 'none', 'relu': 'relu', 'gelu': 'gelu', 'silu': 'swish'}


def _act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    inplace = not torch.is_grad_enabled()
    if act == 'relu':  # in place with autograd too: ReLU's backward reads its output only
        return F.relu(y, inplace=True)
    if act == 'silu':
        return F.silu(y, inplace=inplace)
    if act == 'gelu':
        return torch.ops.aten.gelu_(y) if inplace else F.gelu(y)
    return y


# glibc serves every allocation at or above its mmap threshold (dynamic, at most 32 MiB on
# 64-bit) with freshly mapped pages; smaller ones come from its heap and are reused
SCRATCH_MIN_BYTES = 16 * 2**20


def c_kernels_for(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels of :mod:`.cpu_kernels` may run on these tensors: allowed by
    :data:`CAPS`, built, and the tensors plain contiguous float32/bf16 CPU tensors."""
    return CAPS.cpu_kernels and cpu_kernels.usable(*tensors)


def scratch_dtype(x: torch.Tensor, dtype: torch.dtype | None, numel: int) -> torch.dtype | None:
    """The dtype in which a layer may write a result of ``numel`` elements into a
    :func:`workspace` buffer with the C kernels (:mod:`.cpu_kernels`), or None; ``dtype`` is
    the layer's :func:`kernel_dtype` (None: no fused kernel).

    Only results of at least :data:`SCRATCH_MIN_BYTES` go to a workspace: those the allocator
    would map afresh (page faults at every call; the high-resolution maps of stages 0 and 1),
    while below it oneDNN's fused epilogues on a heap-reused tensor are faster. float32 or bf16,
    where :func:`kernel_dtype` allows a fused kernel and the C kernels are built.
    """
    if dtype is None or numel * dtype.itemsize < SCRATCH_MIN_BYTES:
        return None
    return dtype if c_kernels_for(x) else None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    act: str | None = None,
    scratch: str | None = None,
) -> torch.Tensor:
    """``act(x W^T + b)`` for ``act`` in None/relu/gelu (exact)/silu; x is (..., C_in).

    A fused kernel (:func:`kernel_dtype`) computes it in one GEMM with the bias and the
    activation in its epilogue; otherwise ``F.linear`` and the activation (in place without
    autograd). With ``scratch`` (a layer-internal result) the GEMM writes into the
    :func:`workspace` of that name and a C kernel adds the bias and the activation in place.
    """
    dtype = kernel_dtype(x, weight)
    shape = None if scratch is None or act == 'relu' else (*x.shape[:-1], weight.shape[0])
    if shape is not None and scratch_dtype(x, dtype, math.prod(shape)) is not None:
        out = workspace(scratch, x, dtype, shape)
        with torch.autocast('cpu', enabled=False):
            tokens = cast(x, dtype).view(-1, x.shape[-1])
            torch.mm(tokens, cast(weight, dtype).t(), out=out.view(-1, shape[-1]))
        return cpu_kernels.bias_act_(out, cast(bias, torch.float32), act)
    if dtype is not None:
        algorithm = 'none' if act == 'gelu' else ''
        return torch.ops.mkldnn._linear_pointwise(
            cast(x, dtype), cast(weight, dtype), cast(bias, dtype), _ONEDNN_ACTS[act], [], algorithm
        )
    return _act(F.linear(x, weight, bias), act)


def add_linear(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``residual + x W^T + b``; without autograd the product accumulates into ``residual``."""
    if (
        torch.is_grad_enabled()
        or _tracing()  # an in-place add into a view is recorded wrongly by the JIT tracer
        or not residual.is_contiguous()
    ):
        return residual + F.linear(x, weight, bias)
    dtype = residual.dtype
    if kernel_dtype(x, weight) is None and not (x.dtype == weight.dtype == dtype):
        return residual + F.linear(x, weight, bias)  # mixed dtypes (autocast without kernels)
    with torch.autocast('cpu', enabled=False):
        out = residual.view(-1, residual.shape[-1])
        out.addmm_(cast(x, dtype).reshape(-1, x.shape[-1]), cast(weight, dtype).t())
        if bias is not None:
            out.add_(cast(bias, dtype))
    return residual


def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    dilation=1,
    groups: int = 1,
    act: str | None = None,
) -> torch.Tensor:
    """``act(conv2d(x))`` (act None, relu or silu); fused as :func:`linear`."""
    dtype = kernel_dtype(x, weight)
    if dtype is not None:
        pair = nn.modules.utils._pair
        return torch.ops.mkldnn._convolution_pointwise(
            cast(x, dtype), cast(weight, dtype), cast(bias, dtype), pair(padding), pair(stride),
            pair(dilation), groups, _ONEDNN_ACTS[act], [], '',
        )  # fmt: skip
    return _act(F.conv2d(x, weight, bias, stride, padding, dilation, groups), act)


def add_conv(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """``residual + conv2d(x)``; fused, the conv accumulates into ``residual``."""
    dtype = kernel_dtype(x, weight)
    if dtype is not None and residual.dtype == dtype:
        pair = nn.modules.utils._pair
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            residual, cast(x, dtype), cast(weight, dtype), cast(bias, dtype), pair(padding),
            pair(stride), pair(dilation), groups, 'add', 1.0, None, [], None,
        )  # fmt: skip
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return y.add_(residual) if not torch.is_grad_enabled() else y + residual


def _identity_taps(layer: nn.Conv2d) -> torch.Tensor:
    """A depthwise kernel that is the identity: 1 at the centre tap, 0 elsewhere."""
    kh, kw = layer.kernel_size
    eye = layer.weight.new_zeros(layer.weight.shape)
    eye[:, :, kh // 2, kw // 2] = 1.0
    return eye


def dwconv_nhwc(
    x: torch.Tensor,
    layer: nn.Conv2d,
    residual: bool = False,
    act: str | None = None,
    scratch: str | None = None,
) -> torch.Tensor:
    """Apply a (depthwise) conv to channels-last tokens (B, H, W, C) without copies.

    The conv sees the NCHW view of the NHWC tensor (channels-last memory format), so oneDNN
    runs its channels-last kernel and the result, permuted back, is a contiguous (B, H, W, C).

    Args:
        x: Tokens (B, H, W, C).
        layer: The conv; a stride-1, same-padding depthwise conv when ``residual`` is set.
        residual: Return ``x + conv(x)`` computed as one conv whose centre tap is increased by
            one (exact in real arithmetic; the gradient w.r.t. ``conv.weight`` is unchanged),
            which saves the separate addition pass.
        act: None or ``'silu'``, applied to the result (in the fused kernel's epilogue).
        scratch: For a layer-internal result: the conv accumulates into the
            :func:`workspace` of that name, zeroed or holding ``x`` (``residual``), with
            oneDNN's in-place conv; the activation runs in place.
    """
    weight, bias = layer.weight, layer.bias
    args = (layer.stride, layer.padding, layer.dilation, layer.groups)
    dtype = None
    if scratch is not None:
        pair = nn.modules.utils._pair
        same_shape = pair(layer.stride) == (1, 1) and pair(layer.dilation) == (1, 1)
        same_shape &= pair(layer.padding) == tuple(k // 2 for k in pair(layer.kernel_size))
        dtype = scratch_dtype(x, kernel_dtype(x, weight), x.numel()) if same_shape else None
    if dtype is not None:
        out = workspace(scratch, x, dtype)
        out.copy_(x) if residual else out.zero_()
        add_conv(out.permute(0, 3, 1, 2), cast(x, dtype).permute(0, 3, 1, 2), weight, bias, *args)
        return _act(out, act)  # oneDNN fuses only ReLU after the addition
    if weight.dtype != x.dtype and _autocast_dtype(x.device.type) is None:
        # the LePE of a half/bf16 model runs in float32, as under autocast
        weight, bias = cast(weight, x.dtype), cast(bias, x.dtype)
    if residual:
        weight = weight + _identity_taps(layer)
    return conv(x.permute(0, 3, 1, 2), weight, bias, *args, act=act).permute(0, 2, 3, 1)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm, scratch: str | None = None) -> torch.Tensor:
    """``norm(x)``; with ``scratch`` (a layer-internal result) and the C kernels, computed
    into the :func:`workspace` of that name, in ``x``'s dtype (as ATen's LayerNorm of a bf16
    input under autocast)."""
    fits = x.dtype in (torch.float32, torch.bfloat16) and len(norm.normalized_shape) == 1
    fits = fits and scratch is not None and norm.weight is not None and norm.bias is not None
    if not fits or scratch_dtype(x, kernel_dtype(x, norm.weight), x.numel()) is None:
        return norm(x)
    out = workspace(scratch, x, x.dtype)
    f32 = torch.float32
    return cpu_kernels.layer_norm(x, cast(norm.weight, f32), cast(norm.bias, f32), norm.eps, out)


def gate(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``y * g`` in ``g``'s dtype; without autograd in place into ``g``.

    ``y`` (the attention core's float32 output for half/bf16 input) is cast first: ATen's
    mixed-dtype product is not vectorised (a 64000 x 64 bf16 * float32 product: 17 ms, against
    3 ms for the cast and the bf16 product on one thread here).
    """
    fusable = inference(y) and y.shape == g.shape and y.dtype == torch.float32
    if fusable and c_kernels_for(y, g):
        return cpu_kernels.gate_(y, g)  # one pass, one rounding
    y = y.to(g.dtype)
    if inference(y) and g.is_contiguous() and y.shape == g.shape:
        return g.mul_(y)
    return y * g


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """Channels-last tokens (B, H, W, C) -> a contiguous (B, C, H, W) tensor.

    At inference each image is copied as one 2-D transpose ``(H W, C) -> (C, H W)``, a path
    that ATen runs about five times faster than the general 4-D permuted copy here (a 64-channel
    1280x800 stage-0 map: 26 ms -> 5 ms in float32 on one thread).
    """
    if not inference(x):
        return x.permute(0, 3, 1, 2).contiguous()
    b, h, w, c = x.shape
    out = x.new_empty(b, c, h, w)
    for i in range(b):
        out[i].view(c, h * w).copy_(x[i].reshape(h * w, c).t())
    return out


class _EluPlusOne(torch.autograd.Function):
    """``ELU(x) + 1`` computed as ``exp(min(x, 0)) + max(x, 0)``, keeping only the output.

    The derivative is ``min(y, 1)`` of the output ``y`` (``exp(x) = y`` below zero, 1 above).
    """

    @staticmethod
    def forward(ctx, x):
        y = torch.clamp_max(x, 0.0).exp_().add_(torch.clamp_min(x, 0.0))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * torch.clamp_max(y, 1.0)


ELU_CHUNK = 2**18  # elements: a 1 MB float32 chunk and its temporary stay in the L2 cache


def elu_plus_one(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``ELU(x) + 1`` in ``dtype`` (default ``x.dtype``), the positive feature map of q and k.

    ATen's ELU evaluates ``expm1`` element by element (about ten times slower than its vectorised
    ``exp`` on a CPU), so it is computed as ``exp(min(x, 0)) + max(x, 0)``: the same value above
    zero, and within an ulp of 1 below it. Without autograd it runs over cache-sized chunks, in
    place when ``x`` (contiguous) already has ``dtype``, else converting chunk by chunk into the
    :func:`workspace` ``'elu_plus_one'``; tracing and export keep the ELU operator.
    """
    dtype = x.dtype if dtype is None else dtype
    if _tracing():
        return F.elu(x.to(dtype)) + 1.0
    if torch.is_grad_enabled() or not x.is_contiguous():
        return _EluPlusOne.apply(x.to(dtype))
    out = x if x.dtype == dtype else workspace('elu_plus_one', x, dtype)
    src, dst = x.view(-1), out.view(-1)
    for start in range(0, dst.numel(), ELU_CHUNK):
        chunk = dst[start : start + ELU_CHUNK]
        if out is not x:
            chunk.copy_(src[start : start + ELU_CHUNK])
        negative = torch.clamp_max(chunk, 0.0).exp_()  # before the chunk is overwritten
        chunk.clamp_min_(0.0).add_(negative)
    return out


# --------------------------------------------------------------------------------------------
# RoPE tables and rotation
# --------------------------------------------------------------------------------------------
def _rope_angles(h: int, w: int, dim: int, base: float, device, dtype) -> tuple:
    k_max = dim // 4
    theta = 1.0 / (base ** (torch.arange(k_max, device=device, dtype=torch.float32) / k_max))
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None, None] * theta
    cols = torch.arange(w, device=device, dtype=torch.float32)[None, :, None] * theta
    angles = torch.cat([rows.expand(h, w, k_max), cols.expand(h, w, k_max)], dim=-1)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


_ROPE_CACHE: dict = {}
_ROPE_PAIR_CACHE: dict = {}
_ROPE_COMPLEX_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 256


def _cached(cache: dict, key: tuple, make) -> tuple | torch.Tensor:
    """``cache[key]``, made by ``make()`` on a miss.

    Tables are made outside inference mode and without autograd, so that a table first made
    under ``torch.inference_mode()`` is an ordinary tensor that a later autograd forward may save
    for backward. Writes are locked (several threads may run models at once); a full cache is
    emptied rather than grown.
    """
    table = cache.get(key)
    if table is None:
        with torch.inference_mode(False), torch.no_grad():
            table = make()
        with _CACHE_LOCK:
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[key] = table
    return table


def rope_tables(h: int, w: int, dim: int, device, dtype, base: float = 10000.0) -> tuple:
    """Cosine and sine tables of the 2-D RoPE over an ``h x w`` token grid.

    Channel pair ``p`` (channels ``2p, 2p+1``) is rotated by ``row * theta_p`` for the first
    ``dim // 4`` pairs and by ``col * theta_{p - dim // 4}`` for the rest, with
    ``theta_k = base ** (-k / (dim // 4))``, as in the official code.

    Returns:
        tuple[Tensor, Tensor]: ``cos`` and ``sin``, each of shape (h, w, dim // 2).
    """
    if _tracing():
        return _rope_angles(h, w, dim, base, device, dtype)  # traced into the graph, not cached
    key = (h, w, dim, base, torch.device(device), dtype)
    return _cached(_ROPE_CACHE, key, lambda: _rope_angles(h, w, dim, base, device, dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` (..., H, W, C) by the angles whose cos/sin are given."""
    x = x.unflatten(-1, (-1, 2))
    x_re, x_im = x[..., 0], x[..., 1]
    return torch.stack([x_re * cos - x_im * sin, x_im * cos + x_re * sin], dim=-1).flatten(-2)


def rope_pair_tables(h: int, w: int, dim: int, device, dtype) -> tuple:
    """RoPE tables laid out per channel: ``rope(x) = x * cos2 + swap_pairs(x) * sin2``.

    ``cos2[..., 2p] = cos2[..., 2p + 1] = cos_p`` and ``sin2[..., 2p] = -sin_p``,
    ``sin2[..., 2p + 1] = sin_p``: the rotation of :func:`apply_rope` in three full-width
    element-wise passes (the real formulation that tracing and half precision take).

    Returns:
        tuple[Tensor, Tensor]: ``cos2`` and ``sin2``, each of shape (h, w, dim).
    """

    def make() -> tuple:
        cos, sin = rope_tables(h, w, dim, device, dtype)
        return (
            torch.stack([cos, cos], dim=-1).flatten(-2),
            torch.stack([-sin, sin], dim=-1).flatten(-2),
        )

    if _tracing():
        return make()  # traced into the graph, not cached
    return _cached(_ROPE_PAIR_CACHE, (h, w, dim, torch.device(device), dtype), make)


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)`` along the last dimension (a copy)."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def rope_complex_table(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """``exp(i * angle)`` of every RoPE channel pair over an ``h x w`` grid, as a complex tensor.

    Multiplying the complex view of ``x`` (pairs ``(x_2p, x_2p+1)`` as ``x_2p + i x_2p+1``) by it
    is :func:`apply_rope` in one element-wise pass that can run in place. Cached like
    :func:`rope_tables`; ``dtype`` is the real dtype (float32 or float64).

    Returns:
        Tensor: Complex, of shape (h * w, 1, dim // 2) (broadcasting over the q/k axis).
    """

    def make() -> torch.Tensor:
        cos, sin = rope_tables(h, w, dim, device, dtype)
        return torch.complex(cos, sin).reshape(h * w, 1, dim // 2)

    return _cached(_ROPE_COMPLEX_CACHE, (h, w, dim, torch.device(device), dtype), make)


def rope_rotate(qk: torch.Tensor, h: int, w: int, inplace: bool = False) -> torch.Tensor:
    """RoPE of q and k together: ``qk`` is (B, h * w, 2, C), the result has the same shape.

    float32/float64 tensors in eager mode take the complex product with
    :func:`rope_complex_table` (one pass, in place when ``inplace``); half precision, tracing and
    ``torch.compile`` take the real formulation with :func:`rope_pair_tables`.
    """
    c = qk.shape[-1]
    if qk.dtype in (torch.float32, torch.float64) and not _tracing():
        table = rope_complex_table(h, w, c, qk.device, qk.dtype)
        pairs = torch.view_as_complex(qk.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs.mul_(table) if inplace else pairs * table).flatten(-2)
    cos2, sin2 = rope_pair_tables(h, w, c, qk.device, qk.dtype)
    cos2, sin2 = cos2.reshape(h * w, 1, c), sin2.reshape(h * w, 1, c)
    return (qk * cos2).addcmul_(swap_pairs(qk), sin2)


# --------------------------------------------------------------------------------------------
# Layer strategies
# --------------------------------------------------------------------------------------------
# The MLP (inference and training), the patch merging and the stem's stride-2 conv (inference)
# run over chunks of tokens / bands of rows, so that their 4x / 8x-wide hidden tensors hold at
# most this many elements (16 MB in float32) at a time.
CHUNK_ELEMENTS = 2**22


def rows_per_chunk(elements_per_row: int) -> int:
    """How many rows (tokens, or rows of a feature map) keep a chunk within CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // elements_per_row)


def attend_inplace(
    qk: torch.Tensor,
    v: torch.Tensor,
    lepe: torch.Tensor,
    h: int,
    w: int,
    heads: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The attention core without autograd (``LinearAttention._attend`` computed in place).

    ``ELU + 1``, rotation and the normaliser of q and k run as the fused kernels of
    :func:`cpu_kernels.attention_features` where they can (CPU, float32 or bf16 q/k, float32
    values), else as :func:`elu_plus_one` and in-place ATen ops. The two products run per
    image on strided per-head views, each one batched GEMM over the heads without a transpose
    copy; the output product accumulates into ``lepe``.

    Args:
        qk: (B, N, 2, C) q and k before the feature map (may be overwritten).
        v: (B, N, C) values, in ``dtype``.
        lepe: (B, N, C) LePE of the values (the output is accumulated into it).
        dtype: The core's dtype (float32 for half/bf16 input).

    Returns:
        Tensor: ``lepe``, now LePE(v) plus the attention output.
    """
    b, n, _, c = qk.shape
    d = c // heads

    def split(t):  # (N, C) -> (heads, N, d), a view
        return t.view(n, heads, d).transpose(0, 1)

    if dtype == torch.float32 and c_kernels_for(qk, v, lepe):
        # rotated q / normaliser and rotated k, fused
        out = qk if qk.dtype == dtype else workspace('qk_features', qk, dtype)
        table = torch.view_as_real(rope_complex_table(h, w, c, qk.device, dtype))
        rot = cpu_kernels.attention_features(qk, out, table, heads)
        scaled = [split(rot[i, :, 0]) for i in range(b)]
    else:
        qk = elu_plus_one(qk, dtype)
        k_mean = qk[:, :, 1].mean(1).view(b, heads, 1, d)
        z = []  # (heads, N, 1) per image; as a (1 x d) @ (d x N) product: a fast GEMM shape
        for i in range(b):
            dots = torch.bmm(k_mean[i], split(qk[i, :, 0]).transpose(1, 2))  # (heads, 1, N)
            z.append(dots.add_(1e-6).reciprocal_().transpose(1, 2))
        rot = rope_rotate(qk, h, w, inplace=True)
        scaled = [split(rot[i, :, 0]).mul_(z[i]) for i in range(b)]
    for i in range(b):
        kv = torch.bmm(split(rot[i, :, 1]).transpose(1, 2), split(v[i])).mul_(1.0 / n)
        split(lepe[i]).baddbmm_(scaled[i], kv)
    return lepe


class _MlpFunction(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` for training, over chunks of tokens, keeping only the pre-activation.

    Plain autograd keeps both 4x-wide tensors (GELU's input, and its output for ``fc2``'s weight
    gradient); here the backward recomputes GELU from the kept input (the same values, bit for
    bit), which saves a quarter of the block's activation memory. Forward and backward run over
    chunks of at most :data:`CHUNK_ELEMENTS` hidden activations (the pre-activation is kept as
    those chunks), so no 4x-wide tensor exists whole: at high resolution a whole one is large
    enough that the allocator maps fresh pages for it every step, and page faults then cost more
    than the GEMMs. The weight gradients accumulate over the chunks.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        tokens = x.reshape(-1, x.shape[-1])
        step = rows_per_chunk(w1.shape[0])
        out = tokens.new_empty(tokens.shape[0], w2.shape[0])
        pres = []
        for start in range(0, tokens.shape[0], step):
            pre = F.linear(tokens[start : start + step], w1, b1)
            out[start : start + step] = F.linear(F.gelu(pre), w2, b2)
            pres.append(pre)
        ctx.step = step
        ctx.save_for_backward(x, w1, w2, *pres)
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, *pres = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.reshape(-1, grad.shape[-1])
        tokens = x.reshape(-1, x.shape[-1])
        grad_x = torch.empty_like(tokens) if need[0] else None
        grad_w1 = torch.zeros_like(w1) if need[1] else None
        grad_b1 = w1.new_zeros(w1.shape[0]) if need[2] else None
        grad_w2 = torch.zeros_like(w2) if need[3] else None
        for i, pre in enumerate(pres):
            rows = slice(i * ctx.step, i * ctx.step + pre.shape[0])
            g = grad[rows]
            if need[3]:
                grad_w2.addmm_(g.t(), F.gelu(pre))
            if need[0] or need[1] or need[2]:
                grad_pre = torch.ops.aten.gelu_backward(g @ w2, pre)
                if need[0]:
                    torch.mm(grad_pre, w1, out=grad_x[rows])
                if need[1]:
                    grad_w1.addmm_(grad_pre.t(), tokens[rows])
                if need[2]:
                    grad_b1 += grad_pre.sum(0)
        grad_b2 = grad.sum(0) if need[4] else None
        grad_x = grad_x.view_as(x) if need[0] else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """``fc2(GELU(fc1(x)))``: with autograd (no tracing or autocast) the chunked
    :class:`_MlpFunction`, otherwise the two fused linears."""
    if torch.is_grad_enabled() and not (_tracing() or _autocast_dtype(x.device.type)):
        return _MlpFunction.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    return linear(linear(x, fc1.weight, fc1.bias, 'gelu'), fc2.weight, fc2.bias)


def add_mlp(x: torch.Tensor, norm: nn.Module, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """``x + fc2(GELU(fc1(norm(x))))``; without autograd in place, over chunks of tokens.

    Every op of the MLP is per token, so chunks of at most :data:`CHUNK_ELEMENTS` hidden
    activations give the same result while the 4x-wide hidden tensor never exists whole: lower
    peak memory, and chunk buffers the allocator reuses instead of fresh pages.
    """
    if not inference(x) or not x.is_contiguous():
        return x + mlp(norm(x), fc1, fc2)
    tokens = x.view(-1, x.shape[-1])
    step = rows_per_chunk(fc1.out_features)
    for start in range(0, tokens.shape[0], step):
        rows = tokens[start : start + step]
        normed = layer_norm(rows, norm, scratch='mlp_norm')
        hidden = linear(normed, fc1.weight, fc1.bias, 'gelu', scratch='mlp_hidden')
        out = add_linear(rows, hidden, fc2.weight, fc2.bias)
        if out is not rows:  # mixed dtypes without fused kernels: not accumulated in place
            rows.copy_(out)
    return x


def stem_conv3_bands(x: torch.Tensor, wide: nn.Module, project: nn.Module) -> torch.Tensor:
    """The stem's ``project(wide(x))`` (3x3 stride-2 conv to 4C, then 1x1 to C) at inference,
    over bands of output rows, so that the 4x-wide hidden tensor (the largest of the model)
    never exists whole.

    Output rows ``[r0, r1)`` of the stride-2 3x3 conv read input rows ``2 r0 - 1 .. 2 r1 - 1``
    (row -1 is the zero padding, which the first band keeps; the others slice it out).

    Args:
        x: (B, C_mid, H, W), channels-last memory.
        wide, project: The two :class:`~mlla_mm.models.backbones.mlla.ConvLayer` of ``conv3``.

    Returns:
        Tensor: Tokens (B, H / 2, W / 2, C).
    """
    b, _, h, w = x.shape
    out = None
    rows = rows_per_chunk(b * (w // 2) * wide.conv.out_channels)
    for r0 in range(0, h // 2, rows):
        r1 = min(r0 + rows, h // 2)
        if r0 == 0:
            t = wide(x[:, :, : 2 * r1])
        else:
            t = wide(x[:, :, 2 * r0 - 1 : 2 * r1], padding=(0, 1))
        band = project.forward_tokens(t.permute(0, 2, 3, 1))
        if out is None:
            out = band.new_empty(b, h // 2, w // 2, band.shape[-1])
        out[:, r0:r1] = band
    return out


def patch_merging_bands(
    x: torch.Tensor, expand: nn.Module, dwconv: nn.Module, project: nn.Module
) -> torch.Tensor:
    """Patch merging at inference over bands of output rows, so the 8x-wide hidden tensor
    never exists whole.

    Output rows ``[r0, r1)`` of the stride-2 3x3 conv read input rows ``2 r0 - 1 .. 2 r1 - 1``.
    Each band expands its own rows ``2 r0 .. 2 r1 - 1`` once and runs the conv with a zero
    row on top; the top kernel row's taps on the previous band's last row (the zero row's
    place) are then added to the band's first output row before the ReLU.

    Args:
        x: Tokens (B, H, W, C), H and W even.
        expand, dwconv, project: The three ``ConvLayer`` of the patch merging.

    Returns:
        Tensor: Tokens (B, H / 2, W / 2, 2C).
    """
    b, h, w, _ = x.shape
    out = None
    rows = rows_per_chunk(2 * b * w * expand.conv.out_channels)
    weight, bias, groups = dwconv.conv.weight, dwconv.conv.bias, dwconv.conv.groups
    halo = None  # the previous band's last expanded row, NCHW (B, C, 1, W)
    for r0 in range(0, h // 2, rows):
        r1 = min(r0 + rows, h // 2)
        t = expand.forward_tokens(x[:, 2 * r0 : 2 * r1]).permute(0, 3, 1, 2)
        wt, bt = cast(weight, t.dtype), cast(bias, t.dtype)
        with torch.autocast(t.device.type, enabled=False):
            y = F.conv2d(t, wt, bt, 2, 1, 1, groups)
            if halo is not None:
                y[:, :, :1] += F.conv2d(halo, wt[:, :, :1], None, (1, 2), (0, 1), 1, groups)
        halo = t[:, :, -1:]
        band = project.forward_tokens(F.relu_(y).permute(0, 2, 3, 1))
        if out is None:
            out = band.new_empty(b, h // 2, w // 2, band.shape[-1])
        out[:, r0:r1] = band
    return out
