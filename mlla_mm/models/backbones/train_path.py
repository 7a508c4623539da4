"""Memory-lean training units of the MLLA backbone, taken only where their conditions hold.

As the fused inference path (:mod:`.fast_path`), a unit here replaces a module's forward only
when the module is exactly the standard one and nothing watches it; otherwise the module
forward runs, with the same result. Conditions (:func:`why_not_train_path`):

1. ``use_fast_path`` is True on the module (``MLLA(fast_path=False)`` turns it off);
2. autograd records: grad mode is on and the input or a parameter requires grad (without
   autograd there is nothing to save);
3. not traced, compiled or exported, no autocast (the unit's GEMMs would not be autocast);
4. no tensor subclass, no ``TorchDispatchMode`` or ``TorchFunctionMode`` active;
5. every submodule is exactly its standard type and has no hooks; no global module hooks.

The unit: :class:`MlpFunction`, ``fc2(GELU(fc1(x)))`` over chunks of tokens keeping only GELU's
input; plain autograd keeps both 4x-wide tensors (GELU's input, and its output for ``fc2``'s
weight gradient), and the backward here recomputes GELU from the kept input (bit for bit), so
the MLP saves a quarter of a block's activation memory less. Any device.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fast_path

__all__ = ['MlpFunction', 'mlp_forward', 'why_not_train_path']


def why_not_train_path(module: nn.Module, x: torch.Tensor) -> str | None:
    """Why ``module`` cannot take its training unit on ``x`` now, or None if it can."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return 'the forward is traced, compiled or exported'
    if not getattr(module, 'use_fast_path', True):
        return 'the fast path is switched off (fast_path=False)'
    params = list(module.parameters())
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        return 'autograd is not recording'
    if torch.is_autocast_enabled(x.device.type):
        return 'autocast is on'
    if type(x) is not torch.Tensor or any(type(p) is not nn.Parameter for p in params):
        return 'a tensor subclass is involved'
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return 'a TorchDispatchMode or TorchFunctionMode is active'
    return fast_path.why_not_standard_layers(module)


class MlpFunction(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` over chunks of tokens, keeping only the pre-activation.

    Forward and backward run over chunks of at most :data:`fast_path.CHUNK_ELEMENTS` hidden
    activations (the pre-activation is kept as those chunks), so no 4x-wide tensor exists whole;
    the weight gradients accumulate over the chunks.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        tokens = x.reshape(-1, x.shape[-1])
        step = fast_path.rows_per_chunk(w1.shape[0])
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
    @torch.autograd.function.once_differentiable
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


def mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An ``Mlp`` in training: :class:`MlpFunction` on its layers' parameters."""
    with torch.profiler.record_function('mlla.train_path.Mlp'):
        return MlpFunction.apply(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
