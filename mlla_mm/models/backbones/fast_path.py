"""The fused CPU inference path of the MLLA backbone: one unit per block, stem, patch merging and
stage output, taken only where its conditions hold.

:mod:`~mlla_mm.models.backbones.mlla` writes the model plainly: each layer is a module that is
called. Like PyTorch's ``nn.TransformerEncoderLayer`` fast path, each :class:`MLLABlock`, the
:class:`Stem`, each :class:`PatchMerging` and each stage-output norm checks once, at the top of
its ``forward``, whether the conditions below hold (:func:`why_not_fast_path` returns the first
that fails, or None). If they do, the whole unit runs here; otherwise the plain module forward
runs. Either way the result is the same (the tests hold both to the plain transcription of the
official code, :mod:`mlla_mm.testing`), so hooks, LoRA wrappers, quantisation or pruning change
the speed, never the result.

Conditions (all must hold; see docs/performance.md):

1. The unit's ``use_fast_path`` is True (``MLLA(fast_path=False)`` sets it False everywhere).
2. No autograd: grad mode is off (``torch.no_grad()``, ``torch.inference_mode()``) or neither
   the input nor any parameter of the unit requires grad.
3. The unit is in eval mode (``model.eval()``).
4. Not traced, compiled or exported (``torch.jit.trace``, ``torch.compile``, ``torch.export``,
   ONNX export see the module forward).
5. CPU tensors, no tensor subclass, no ``TorchDispatchMode`` or ``TorchFunctionMode`` active
   (FLOP counters, FakeTensor, ...).
6. oneDNN's fused kernels exist in this torch build, and the precision is float32 (a float32
   model, no autocast) or bf16 (a bf16 model, or CPU bf16 autocast) on a CPU with bf16 kernels.
7. Every submodule of the unit is exactly its standard type (``nn.Linear``, ``nn.Conv2d`` with
   zero padding, ``nn.LayerNorm``, ``nn.BatchNorm2d``, ``nn.GELU`` exact, ...; no subclass, no
   parametrization, no quantised or LoRA-wrapped layer) and has no forward or backward hooks or
   pre-hooks (pruning adds one); no global module hooks are registered.

What runs here, in the unit: oneDNN's fused GEMM/conv kernels with bias and activation in their
epilogue (``torch.ops.mkldnn``), BatchNorm folded into the convs, the attention core in place on
strided per-head views, ``x + MLP(LN(x))`` over chunks of tokens, the stem's and the patch
merging's wide convs over bands of rows (their 4x / 8x wide hidden tensors never exist whole),
and the custom operators of :mod:`.cpu_kernels` (``torch.ops.mlla.*``). Weights are cast to
bf16 at each call (no cache that a ``.data`` write could make stale).

Memory: large fresh tensors are faulted in afresh at every call (glibc maps every allocation at
or above its mmap threshold anew). Inside a block, results of at least :data:`SCRATCH_MIN_BYTES`
(the stage-0/1 maps above ~1280x800) go to per-thread :func:`workspace` buffers instead; a
unit's output is always a fresh tensor. :func:`release_workspace` frees them;
:func:`keep_freed_memory` (opt-in, process-wide) stops glibc from returning freed memory.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module_globals

from . import cpu_kernels

__all__ = [
    'CAPS',
    'CHUNK_ELEMENTS',
    'Capabilities',
    'block_forward',
    'keep_freed_memory',
    'output_forward',
    'patch_merging_forward',
    'release_workspace',
    'stem_forward',
    'unit_dtype',
    'why_not_fast_path',
    'workspace',
]


# --------------------------------------------------------------------------------------------
# Capabilities
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
            turned off by ``MLLA_MM_CPU_KERNELS=0``); they are compiled on first use, and ATen
            ops run where that fails.
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
            return f'no fused oneDNN kernels: the module path runs; ATen ISA {self.isa}'
        kind = 'AMX' if self.amx else 'AVX512-BF16' if self.bf16 else 'none'
        return (
            f'oneDNN fused fp32 kernels; bf16 kernels: {kind}; attention core: {core}; '
            f'ATen ISA {self.isa}'
        )


CAPS = Capabilities.detect()


# --------------------------------------------------------------------------------------------
# The conditions, in one place
# --------------------------------------------------------------------------------------------
def _conv_ok(m: nn.Conv2d) -> bool:
    return m.padding_mode == 'zeros' and isinstance(m.padding, tuple)


def _ln_ok(m: nn.LayerNorm) -> bool:
    return m.weight is not None and m.bias is not None and len(m.normalized_shape) == 1


def _bn_ok(m: nn.BatchNorm2d) -> bool:
    return m.track_running_stats and m.running_var is not None


def _always(m: nn.Module) -> bool:
    return True


# The exact torch layer types the units know, with a check of their settings
STANDARD_LAYERS = {
    nn.Linear: _always,
    nn.Conv2d: _conv_ok,
    nn.LayerNorm: _ln_ok,
    nn.BatchNorm2d: _bn_ok,
    nn.ReLU: _always,
    nn.SiLU: _always,
    nn.GELU: lambda m: m.approximate == 'none',
    nn.Identity: _always,
    nn.Sequential: _always,
}
# and the backbone's own containers (by module and name: this file does not import the model)
BACKBONE_MODULE = 'mlla_mm.models.backbones.mlla'
BACKBONE_LAYERS = {
    'ConvLayer', 'DropPath', 'LinearAttention', 'Mlp', 'MLLABlock', 'Stem', 'PatchMerging',
}  # fmt: skip


def _standard(m: nn.Module) -> bool:
    kind = type(m)
    check = STANDARD_LAYERS.get(kind)
    if check is not None:
        return check(m)
    return kind.__module__ == BACKBONE_MODULE and kind.__qualname__ in BACKBONE_LAYERS


def _global_hooks() -> bool:
    g = _module_globals
    names = (
        '_global_forward_hooks',
        '_global_forward_pre_hooks',
        '_global_backward_hooks',
        '_global_backward_pre_hooks',
    )
    return any(getattr(g, n, None) for n in names)


def _has_hooks(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    )


def unit_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused kernels of ``module`` run in on ``x``: float32 for a float32 model
    and input without autocast; bf16 for a bf16 model or under CPU bf16 autocast (float32
    operands are cast), where the CPU has bf16 kernels; else None."""
    param = next(module.parameters(), None)
    weights = x.dtype if param is None else param.dtype
    floats = (torch.float32, torch.bfloat16)
    if torch.is_autocast_enabled('cpu'):
        auto = torch.get_autocast_dtype('cpu')
        ok = auto == torch.bfloat16 and CAPS.bf16 and x.dtype in floats and weights in floats
        return torch.bfloat16 if ok else None
    if x.dtype != weights:
        return None
    if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and CAPS.bf16):
        return x.dtype
    return None


def why_not_fast_path(module: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``module`` cannot take its fused inference path on ``x`` now, or None if it can.

    The conditions are listed in this module's docstring; the first that fails is named.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return 'the forward is traced, compiled or exported'
    if not getattr(module, 'use_fast_path', True):
        return 'the fast path is switched off (fast_path=False)'
    params = list(module.parameters())
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return 'autograd is recording (grad mode on and a tensor requires grad)'
    if module.training:
        return 'the module is in training mode'
    if x.device.type != 'cpu':
        return f'the input is on {x.device.type}, not the CPU'
    if type(x) is not torch.Tensor or any(type(p) is not nn.Parameter for p in params):
        return 'a tensor subclass is involved'
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return 'a TorchDispatchMode or TorchFunctionMode is active'
    if not CAPS.onednn:
        return 'this torch build has no fused oneDNN kernels'
    if any(p.device.type != 'cpu' for p in params):
        return 'a parameter is not on the CPU'
    if unit_dtype(module, x) is None:
        return (
            f'unsupported precision (input {x.dtype}, autocast '
            f'{torch.is_autocast_enabled("cpu")}): float32, or bf16 on a CPU with bf16 kernels'
        )
    return why_not_standard_layers(module)


def why_not_standard_layers(module: nn.Module) -> str | None:
    """Why ``module``'s layers rule out a unit that calls their parameters directly (a global
    module hook, a submodule that is not exactly a standard layer, or one with hooks), or None.
    Shared by the inference units and the training units (:mod:`.train_path`)."""
    if _global_hooks():
        return 'global module hooks are registered'
    for name, m in module.named_modules():
        if not _standard(m):
            return f'{name or type(module).__name__} is a {type(m).__name__}, not a standard layer'
        if _has_hooks(m):
            return f'{name or type(module).__name__} has hooks'
    return None


# --------------------------------------------------------------------------------------------
# Reused buffers
# --------------------------------------------------------------------------------------------
_WORKSPACE = threading.local()

# glibc serves every allocation at or above its mmap threshold (dynamic, at most 32 MiB on
# 64-bit) with freshly mapped pages; smaller ones come from its heap and are reused
SCRATCH_MIN_BYTES = 16 * 2**20


def workspace(
    name: str, like: torch.Tensor, dtype: torch.dtype, shape: tuple | None = None
) -> torch.Tensor:
    """A reusable buffer of ``like``'s shape (or ``shape``) in ``dtype`` (inference scratch).

    Fresh large tensors are page-faulted in at every call (glibc maps every allocation at or
    above its mmap threshold afresh and unmaps it on free), which costs as much as the work on
    them. One buffer per name and thread is kept instead, grown when a larger one is needed and
    reused by the next block and the next call; :func:`release_workspace` frees them. A buffer
    never leaves the unit that asked for it.
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


def _scratch(x: torch.Tensor, dtype: torch.dtype, numel: int) -> bool:
    """Whether a result of ``numel`` elements goes to a workspace (large, C kernels built)."""
    return numel * dtype.itemsize >= SCRATCH_MIN_BYTES and _c_kernels(x)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory(enable: bool = True) -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it (process-wide).

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB) with
    fresh pages from the kernel and unmaps them on free, and trims the heap when its free top
    exceeds the trim threshold: a high-resolution forward then faults in every large tensor
    afresh. With ``enable`` no allocation is mmapped and the heap is never trimmed, so freed
    tensors are reused without page faults; the process keeps its peak heap. The same as
    starting Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>``.
    ``enable=False`` restores glibc's defaults (mmap on, 128 KiB trim threshold).

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
    trim = 2**31 - 1 if enable else 128 * 1024
    mmap_ok = mallopt(_M_MMAP_MAX, 0 if enable else 65536) == 1
    return mmap_ok and mallopt(_M_TRIM_THRESHOLD, trim) == 1


# --------------------------------------------------------------------------------------------
# Fused primitives (inside a unit: no autograd, CPU, oneDNN, float32 or bf16)
# --------------------------------------------------------------------------------------------
_ONEDNN_ACTS = {None: 'none', 'relu': 'relu', 'gelu': 'gelu', 'silu': 'swish'}
_pair = nn.modules.utils._pair


def _c_kernels(*tensors: torch.Tensor) -> bool:
    return CAPS.cpu_kernels and cpu_kernels.usable(*tensors)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype``; made at every call, never cached (a cached cast can go stale)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def linear(
    x: torch.Tensor,
    layer: nn.Linear,
    dtype: torch.dtype,
    act: str | None = None,
    scratch: str | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(layer(x))`` (or of the given ``weight``/``bias``) as one oneDNN GEMM with the bias
    and activation in its epilogue; with ``scratch`` a large result is written into the
    :func:`workspace` of that name, the C kernel adding bias and activation in place."""
    weight = layer.weight if weight is None else weight
    bias = layer.bias if layer is not None and weight is layer.weight else bias
    shape = (*x.shape[:-1], weight.shape[0])
    if scratch is not None and act != 'relu' and _scratch(x, dtype, math.prod(shape)):
        out = workspace(scratch, x, dtype, shape)
        with torch.autocast('cpu', enabled=False):
            tokens = _cast(x, dtype).reshape(-1, x.shape[-1])
            torch.mm(tokens, _cast(weight, dtype).t(), out=out.view(-1, shape[-1]))
        return cpu_kernels.bias_act_(out, _cast(bias, torch.float32), act)
    algorithm = 'none' if act == 'gelu' else ''
    return torch.ops.mkldnn._linear_pointwise(
        _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype), _ONEDNN_ACTS[act], [], algorithm
    )


def add_linear(residual: torch.Tensor, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``residual + layer(x)``, the product accumulated into ``residual`` (contiguous)."""
    dtype = residual.dtype
    residual = residual.contiguous()
    with torch.autocast('cpu', enabled=False):
        out = residual.view(-1, residual.shape[-1])
        out.addmm_(_cast(x, dtype).reshape(-1, x.shape[-1]), _cast(layer.weight, dtype).t())
        if layer.bias is not None:
            out.add_(_cast(layer.bias, dtype))
    return residual


def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    c: nn.Conv2d,
    dtype: torch.dtype,
    act: str | None = None,
    padding=None,
) -> torch.Tensor:
    """``act(conv2d(x))`` with the settings of ``c`` (act None, relu or silu), one oneDNN
    kernel."""
    return torch.ops.mkldnn._convolution_pointwise(
        _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype),
        _pair(c.padding if padding is None else padding), _pair(c.stride), _pair(c.dilation),
        c.groups, _ONEDNN_ACTS[act], [], '',
    )  # fmt: skip


def add_conv(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    c: nn.Conv2d,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``residual + conv2d(x)``, the conv accumulating into ``residual`` (of dtype ``dtype``)."""
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        residual, _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype), _pair(c.padding),
        _pair(c.stride), _pair(c.dilation), c.groups, 'add', 1.0, None, [], None,
    )  # fmt: skip


def plus_identity(weight: torch.Tensor) -> torch.Tensor:
    """A depthwise kernel plus the identity (its centre tap plus one), a new tensor: the conv
    ``x + conv(x)`` as one (exact in real arithmetic)."""
    kh, kw = weight.shape[2:]
    weight = weight.clone()
    weight[:, :, kh // 2, kw // 2] += 1.0
    return weight


def dwconv_nhwc(
    x: torch.Tensor,
    layer: nn.Conv2d,
    dtype: torch.dtype,
    residual: bool = False,
    act: str | None = None,
    scratch: str | None = None,
) -> torch.Tensor:
    """A stride-1 same-padding depthwise ``layer`` on channels-last tokens (B, H, W, C).

    The conv sees the NCHW view of the tokens (channels-last memory), so oneDNN runs its
    channels-last kernel and the result, permuted back, is contiguous tokens. ``residual``:
    ``x + conv(x)`` as one conv whose centre tap is increased by one (exact in real arithmetic).
    ``act``: None or ``'silu'``. ``scratch``: a large result accumulates into the
    :func:`workspace` of that name (zeroed, or holding ``x`` for ``residual``).
    """
    weight, bias = layer.weight, layer.bias
    if scratch is not None and _scratch(x, dtype, x.numel()):
        out = workspace(scratch, x, dtype)
        out.copy_(x) if residual else out.zero_()
        add_conv(out.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, bias, layer, dtype)
        return F.silu(out, inplace=True) if act == 'silu' else out
    if residual:
        weight = plus_identity(weight)
    return conv(x.permute(0, 3, 1, 2), weight, bias, layer, dtype, act).permute(0, 2, 3, 1)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm, scratch: str | None = None) -> torch.Tensor:
    """``norm(x)``; a large result with ``scratch`` goes into the :func:`workspace` of that
    name (C kernel), in ``x``'s dtype (as ATen's LayerNorm of a bf16 input under autocast)."""
    if scratch is None or not _scratch(x, x.dtype, x.numel()):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    out = workspace(scratch, x, x.dtype)
    f32 = torch.float32
    return cpu_kernels.layer_norm(x, _cast(norm.weight, f32), _cast(norm.bias, f32), norm.eps, out)


def to_float(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` in float32; a conversion lands in the :func:`workspace` ``name``."""
    if x.dtype == torch.float32:
        return x
    return workspace(name, x, torch.float32).copy_(x)


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """Channels-last tokens (B, H, W, C) -> a contiguous (B, C, H, W) tensor, each image copied
    as one 2-D transpose ``(H W, C) -> (C, H W)`` (about five times faster here than ATen's
    general 4-D permuted copy)."""
    b, h, w, c = x.shape
    out = x.new_empty(b, c, h, w)
    for i in range(b):
        out[i].view(c, h * w).copy_(x[i].reshape(h * w, c).t())
    return out


ELU_CHUNK = 2**18  # elements: a 1 MB float32 chunk and its temporary stay in the L2 cache


def elu_plus_one_(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = ELU(x) + 1`` as ``exp(min(x, 0)) + max(x, 0)`` (ATen's ELU evaluates ``expm1``
    element by element, about ten times slower than its vectorised ``exp``), over cache-sized
    chunks; ``out`` may be ``x``."""
    src, dst = x.view(-1), out.view(-1)
    for start in range(0, dst.numel(), ELU_CHUNK):
        chunk = dst[start : start + ELU_CHUNK]
        if out is not x:
            chunk.copy_(src[start : start + ELU_CHUNK])
        negative = torch.clamp_max(chunk, 0.0).exp_()  # before the chunk is overwritten
        chunk.clamp_min_(0.0).add_(negative)
    return out


_TABLES: dict = {}


def _rope_table(rope_tables, h: int, w: int, c: int, device) -> torch.Tensor:
    """(N, C / 2, 2) float32 (cos, sin) table for :func:`cpu_kernels.attention_features`,
    cached per grid (it depends on nothing else)."""
    key = (h, w, c, torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        cos, sin = rope_tables(h, w, c, device, torch.float32)
        with torch.inference_mode(False), torch.no_grad():
            table = torch.stack([cos, sin], dim=-1).reshape(h * w, c // 2, 2)
        if len(_TABLES) >= 64:
            _TABLES.clear()
        _TABLES[key] = table
    return table


# --------------------------------------------------------------------------------------------
# The units
# --------------------------------------------------------------------------------------------
def _unit(name: str):
    """Run a unit under a profiler scope ``mlla.fast_path.<name>``."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args):
            with torch.profiler.record_function(f'mlla.fast_path.{name}'):
                return fn(*args)

        return run

    return wrap


# The MLP, the patch merging and the stem's stride-2 conv run over chunks of tokens / bands of
# rows, so that their 4x / 8x-wide hidden tensors hold at most this many elements at a time.
CHUNK_ELEMENTS = 2**22


def rows_per_chunk(elements_per_row: int) -> int:
    """How many rows (tokens, or rows of a feature map) keep a chunk within CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // elements_per_row)


def attention(attn: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``LinearAttention`` of tokens (B, H, W, C) in place, float32 out.

    ``ELU + 1``, rotation and the normaliser of q and k run as the custom operator
    ``mlla::attention_features`` where the C kernels are built; the two products run per image
    on strided per-head views, each one batched GEMM over the heads without a transpose copy;
    the output product accumulates into the float32 LePE. Without the C kernels ``ELU + 1``
    runs in place here and the core is the reference :func:`~.mlla.linear_attention`.
    """
    b, h, w, c = x.shape
    n, heads = h * w, attn.num_heads
    qk = linear(x, attn.qk, dtype, scratch='qk').view(b, n, 2, c)
    v = to_float(x, 'v')  # LePE and the products in float32: v converted once
    lepe = dwconv_nhwc(v, attn.lepe, torch.float32, scratch='attn').reshape(b, n, c)
    v = v.view(b, n, c)
    with torch.autocast('cpu', enabled=False):  # the core runs in float32
        core = attention_core_(qk, v, lepe, h, w, heads, attn.rope_tables, attn.core)
        return core.view(b, h, w, c)


def attention_core_(
    qk: torch.Tensor,
    v: torch.Tensor,
    lepe: torch.Tensor,
    h: int,
    w: int,
    heads: int,
    rope_tables,
    reference,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`~mlla_mm.models.backbones.mlla.linear_attention` of ``ELU(qk) + 1`` in place,
    accumulated into ``lepe``.

    Args:
        qk: (B, N, 2, C) q and k before the feature map, float32 or bf16 (may be overwritten).
        v: (B, N, C) float32 values.
        lepe: (B, N, C) float32 LePE of the values (the output is accumulated into it).
        h, w: The token grid; heads: number of heads.
        rope_tables, reference: The model's :func:`~.mlla.rope_tables` and
            :func:`~.mlla.linear_attention` (``LinearAttention.rope_tables``/``.core``).
        features: (B, N, 2, C) float32 buffer for q's and k's features (then ``qk`` is left
            as it is); by default ``qk`` itself if float32, else a :func:`workspace`.

    Returns:
        Tensor: ``lepe``, now LePE(v) plus the attention output.
    """
    b, n, _, c = qk.shape
    d = c // heads

    def split(t):  # (N, C) -> (heads, N, d), a view
        return t.view(n, heads, d).transpose(0, 1)

    out = features
    if not _c_kernels(qk, v, lepe):  # no C compiler: ELU + 1 here, the reference core
        if out is None:
            f32 = torch.float32
            out = qk if qk.dtype == f32 else workspace('elu_plus_one', qk, f32)
        q, k = elu_plus_one_(qk, out).unbind(2)
        return lepe.add_(reference(q, k, v, h, w, heads))
    # rotated q / normaliser and rotated k, fused; then the two products on per-head views
    if out is None:
        out = qk if qk.dtype == torch.float32 else workspace('qk_features', qk, torch.float32)
    table = _rope_table(rope_tables, h, w, c, qk.device)
    rot = cpu_kernels.attention_features(qk, out, table, heads)
    for i in range(b):
        kv = torch.bmm(split(rot[i, :, 1]).transpose(1, 2), split(v[i])).mul_(1.0 / n)
        split(lepe[i]).baddbmm_(split(rot[i, :, 0]), kv)
    return lepe


def gate(y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``y * g`` in ``g``'s dtype, in place into ``g`` (one rounding with the C kernel)."""
    if _c_kernels(y, g):
        return cpu_kernels.gate_(y, g)
    return g.mul_(y.to(g.dtype))


def add_mlp(x: torch.Tensor, norm: nn.LayerNorm, mlp: nn.Module, dtype) -> torch.Tensor:
    """``x + mlp(norm(x))`` in place, over chunks of tokens (every op of the MLP is per token,
    so the 4x-wide hidden tensor never exists whole)."""
    x = x.contiguous()
    tokens = x.view(-1, x.shape[-1])
    step = rows_per_chunk(mlp.fc1.out_features)
    for start in range(0, tokens.shape[0], step):
        rows = tokens[start : start + step]
        normed = layer_norm(rows, norm, scratch='mlp_norm')
        hidden = linear(normed, mlp.fc1, dtype, 'gelu', scratch='mlp_hidden')
        add_linear(rows, hidden, mlp.fc2)
    return x


@_unit('MLLABlock')
def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An :class:`MLLABlock` (eval, no autograd): the module forward's result, fused.

    The gate, the activations and the residual additions run in place; block-internal results
    may be :func:`workspace` buffers.
    """
    dtype = unit_dtype(block, x)
    x = x.contiguous()
    # x + CPE(x), one conv; block-internal (the next CPE reads it), so it may be scratch
    x = dwconv_nhwc(x, block.cpe1, dtype, residual=True, scratch='cpe1')
    shortcut = x
    x = layer_norm(x, block.norm1, scratch='norm1')
    g = linear(x, block.act_proj, dtype, 'silu', scratch='gate')
    x = linear(x, block.in_proj, dtype, scratch='in_proj')
    x = dwconv_nhwc(x, block.dwc, dtype, act='silu', scratch='dwc')  # SiLU(DWConv(x))
    x = gate(attention(block.attn, x, dtype), g)  # float32 core, then * gate in gate's dtype
    if shortcut.dtype != dtype:  # bf16 autocast over a float32 input
        shortcut = shortcut.to(dtype)
    x = add_linear(shortcut, x, block.out_proj)
    x = dwconv_nhwc(x, block.cpe2, dtype, residual=True)  # x + CPE(x)
    return add_mlp(x, block.norm2, block.mlp, dtype)


def _folded(layer: nn.Module) -> tuple:
    """Conv weight and bias of a ``ConvLayer`` with its (eval-mode) BatchNorm folded in."""
    conv_, bn = layer.conv, layer.norm
    if bn is None:
        return conv_.weight, conv_.bias
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv_.bias is not None:
        bias = bias + conv_.bias * scale
    return conv_.weight * scale.reshape(-1, 1, 1, 1), bias


def _conv_layer(layer: nn.Module, x: torch.Tensor, dtype, padding=None) -> torch.Tensor:
    """A ``ConvLayer`` (conv, folded BatchNorm, ReLU) on NCHW ``x``."""
    weight, bias = _folded(layer)
    act = 'relu' if layer.act is not None else None
    return conv(x, weight, bias, layer.conv, dtype, act, padding)


def _conv_layer_tokens(layer: nn.Module, x: torch.Tensor, dtype) -> torch.Tensor:
    """A 1x1 ``ConvLayer`` on channels-last tokens (B, H, W, C_in): one GEMM."""
    weight, bias = _folded(layer)
    act = 'relu' if layer.act is not None else None
    return linear(x, None, dtype, act, weight=weight.flatten(1), bias=bias)


@_unit('Stem')
def stem_forward(stem: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The :class:`Stem` (eval, no autograd) on a padded channels-last image batch.

    The 3x3 stride-2 conv to 4C and the 1x1 projection run over bands of output rows, so the
    4x-wide hidden tensor (the largest of the model) never exists whole. Output rows
    ``[r0, r1)`` of the stride-2 conv read input rows ``2 r0 - 1 .. 2 r1 - 1`` (row -1 is the
    zero padding, which the first band keeps; the others slice it out).
    """
    dtype = unit_dtype(stem, x)
    x = _conv_layer(stem.conv1, x, dtype)
    first, second = stem.conv2
    weight, bias = _folded(second)
    x = add_conv(x, _conv_layer(first, x, dtype), weight, bias, second.conv, dtype)
    wide, project = stem.conv3
    b, _, h, w = x.shape
    out = None
    rows = rows_per_chunk(b * (w // 2) * wide.conv.out_channels)
    for r0 in range(0, h // 2, rows):
        r1 = min(r0 + rows, h // 2)
        if r0 == 0:
            t = _conv_layer(wide, x[:, :, : 2 * r1], dtype)
        else:
            t = _conv_layer(wide, x[:, :, 2 * r0 - 1 : 2 * r1], dtype, padding=(0, 1))
        band = _conv_layer_tokens(project, t.permute(0, 2, 3, 1), dtype)
        if out is None:
            out = band.new_empty(b, h // 2, w // 2, band.shape[-1])
        out[:, r0:r1] = band
    return out


@_unit('PatchMerging')
def patch_merging_forward(merging: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A :class:`PatchMerging` (eval, no autograd) on tokens (B, H, W, C), H and W even, over
    bands of output rows, so the 8x-wide hidden tensor never exists whole.

    Each band expands its own rows ``2 r0 .. 2 r1 - 1`` once and runs the stride-2 conv with a
    zero row on top; the top kernel row's taps on the previous band's last row (the zero row's
    place) are then added to the band's first output row before the ReLU.
    """
    dtype = unit_dtype(merging, x)
    expand, dwconv, project = merging.conv
    b, h, w, _ = x.shape
    out = None
    rows = rows_per_chunk(2 * b * w * expand.conv.out_channels)
    c = dwconv.conv
    weight, bias = _cast(c.weight, dtype), _cast(c.bias, dtype)
    halo = None  # the previous band's last expanded row, NCHW (B, C, 1, W)
    for r0 in range(0, h // 2, rows):
        r1 = min(r0 + rows, h // 2)
        t = _conv_layer_tokens(expand, x[:, 2 * r0 : 2 * r1], dtype).permute(0, 3, 1, 2)
        with torch.autocast('cpu', enabled=False):
            y = F.conv2d(t, weight, bias, c.stride, c.padding, c.dilation, c.groups)
            if halo is not None:
                taps = weight[:, :, :1]
                y[:, :, :1] += F.conv2d(halo, taps, None, (1, 2), (0, 1), 1, c.groups)
        halo = t[:, :, -1:]
        band = _conv_layer_tokens(project, F.relu_(y).permute(0, 2, 3, 1), dtype)
        if out is None:
            out = band.new_empty(b, h // 2, w // 2, band.shape[-1])
        out[:, r0:r1] = band
    return out


@_unit('output')
def output_forward(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """A stage output: ``norm(x)`` as a contiguous NCHW tensor (:func:`to_nchw`)."""
    return to_nchw(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
