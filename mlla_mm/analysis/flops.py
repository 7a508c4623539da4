"""Parameter and FLOP counting that sees every matrix product, attention included.

Module-hook counters (mmcv 1.x ``get_model_complexity_info``, ``thop``, ``ptflops``) only count
``nn.Conv2d``/``nn.Linear`` layers, so the linear-attention products of MLLA (``k^T v``,
``q (k^T v)`` and the normaliser ``q . mean(k)``), written as tensor products, are missed.
:func:`count_flops` counts at the ATen level instead: a ``TorchDispatchMode`` sees every matrix
product and convolution that runs (``mm``, ``addmm``, ``bmm``, ``baddbmm`` and their in-place
forms, convolutions, CPU/GPU ``scaled_dot_product_attention``, oneDNN's fused linear/conv ops),
whatever Python code issued it, and labels each by the module it runs in:

* ``conv``: convolutions;
* ``linear``: matrix products with a weight parameter: ``nn.Linear`` layers, fused linear ops and
  1x1 convolutions (per-token linear maps: MLLA's stem and patch merging), whether they run as
  convolutions or as GEMMs over the tokens;
* ``attention``: matrix products inside a module whose class name names attention
  (``Attention``: MLLA's linear attention, ViT's softmax attention; ``MSA``: Swin's window
  attention), excluding its ``nn.Linear`` children;
* ``other_matmul``: any other matrix product.

Figures are multiply-accumulates (MACs; 1 MAC = 2 FLOPs), the convention of the MLLA paper
("FLOPs") and of most vision papers. Element-wise work (norms, activations, RoPE, softmax) is not
counted, by the same convention.

:func:`mlla_macs` is an independent hand count of the MLLA backbone from its equations; the
tests check that both agree exactly. :func:`config_flops` counts a whole detector, segmentor or
classifier built from an mmdet / mmseg / mmpretrain config.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import conv_flop_count, flop_registry, sdpa_flop_count

__all__ = [
    'FlopsReport',
    'MacCounting',
    'count_flops',
    'count_params',
    'mlla_macs',
    'backbone_flops',
    'config_flops',
]

_ATTENTION_NAMES = ('Attention', 'MSA')
_CONV_WORDS = ('conv',)
_GROUPS_ARG = {'convolution': 8, '_convolution_pointwise': 6, '_convolution_pointwise_': 7}


def _pointwise_conv(name: str, args) -> bool:
    """A dense 1x1 convolution (a per-token linear map)."""
    base = name.split('.')[-1]
    index = _GROUPS_ARG.get(base)
    if index is None or len(args) <= index:
        return False
    weight = args[2] if base == '_convolution_pointwise_' else args[1]
    kernel = tuple(weight.shape[-2:]) if isinstance(weight, torch.Tensor) else None
    return kernel == (1, 1) and args[index] == 1


_SDPA_WORDS = ('scaled_dot_product', 'flash_attention', 'efficient_attention', 'flex_attention')


def _shape(t) -> list:
    return list(t.shape)


def _registry_macs(packet) -> Callable:
    """Wrap a ``torch.utils.flop_counter`` formula (FLOPs) into one that returns MACs."""
    formula = flop_registry[packet]

    def macs(args, kwargs, out) -> int:
        return int(formula(*args, **kwargs, out_val=out)) // 2

    return macs


def _weight(args: tuple, dim: int) -> torch.Tensor:
    """The weight of a oneDNN fused op: ``(X, W, B, ...)``, or ``(X, other, W, ...)`` (binary)."""
    third = args[2] if len(args) > 2 else None
    return third if isinstance(third, torch.Tensor) and third.dim() == dim else args[1]


def _linear_macs(args, kwargs, out) -> int:
    x, w = args[0], _weight(args, 2)
    return x.numel() // x.shape[-1] * w.shape[0] * w.shape[1]


def _conv_pointwise_macs(args, kwargs, out) -> int:
    x, w = args[0], _weight(args, args[0].dim())
    return conv_flop_count(_shape(x), _shape(w), _shape(out)) // 2


def _sdpa_cpu_macs(args, kwargs, out) -> int:
    q, k, v = args[:3]
    return sdpa_flop_count(_shape(q), _shape(k), _shape(v)) // 2


def _build_formulas() -> dict:
    """Op overload packet -> ``f(args, kwargs, out) -> MACs`` of the forward ops we count."""
    aten = torch.ops.aten
    table = {p: _registry_macs(p) for p in flop_registry if 'backward' not in str(p)}
    # in-place forms have the formula of their out-of-place op
    for inplace, base in (('addmm_', 'addmm'), ('baddbmm_', 'baddbmm')):
        if hasattr(aten, inplace):
            table[getattr(aten, inplace)] = table[getattr(aten, base)]
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu'):
        table[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_macs
    for name, fn in (
        ('_linear_pointwise', _linear_macs),
        ('_convolution_pointwise', _conv_pointwise_macs),
        ('_convolution_pointwise_', _conv_pointwise_macs),  # (other, X, W, ...): other += conv
    ):
        with contextlib.suppress(AttributeError, RuntimeError):  # a build without oneDNN
            table[getattr(torch.ops.mkldnn, name)] = fn
    return table


_FORMULAS = _build_formulas()


@dataclass
class FlopsReport:
    """MACs of one forward pass, split by kind, and the parameter count.

    Attributes:
        params: Number of parameters.
        macs: Total multiply-accumulates (FLOPs as papers count them; 2x for arithmetic FLOPs).
        by_kind: MACs per kind (``conv``, ``linear``, ``attention``, ``other_matmul``).
        input_shape: Shape of the input the count was made at.
    """

    params: int
    macs: int
    by_kind: dict = field(default_factory=dict)
    input_shape: tuple = ()

    @property
    def flops(self) -> int:
        """Arithmetic floating-point operations (2 per multiply-accumulate)."""
        return 2 * self.macs

    def to_dict(self) -> dict:
        """JSON-friendly fields: ``params``, ``macs``, ``gmacs``, ``by_kind``, ``input_shape``."""
        return {
            'params': self.params,
            'macs': self.macs,
            'gmacs': self.macs / 1e9,
            'by_kind': dict(self.by_kind),
            'input_shape': list(self.input_shape),
        }

    def summary(self) -> str:
        """Human-readable lines: params, GMACs and the split by kind."""
        lines = [
            f'input shape: {tuple(self.input_shape)}',
            f'params: {self.params / 1e6:.2f} M',
            f'GMACs ("GFLOPs" as papers count them): {self.macs / 1e9:.3f}',
        ]
        for kind, macs in sorted(self.by_kind.items(), key=lambda kv: -kv[1]):
            share = 100.0 * macs / max(self.macs, 1)
            lines.append(f'  {kind:<13s} {macs / 1e9:10.3f} GMACs  ({share:5.1f}%)')
        return '\n'.join(lines)


class _MacCounter(TorchDispatchMode):
    """Counts the MACs of the ops in :data:`_FORMULAS`, labelled by module context."""

    def __init__(self, weights: set = frozenset()) -> None:
        super().__init__()
        self.by_kind: dict = defaultdict(int)
        self.stack: list = []
        self.weights = weights  # ids of the model's matrix (and conv kernel) parameters

    def _kind(self, packet, args) -> str:
        name = str(packet)
        if any(w in name for w in _CONV_WORDS):
            return 'linear' if _pointwise_conv(name, args) else 'conv'
        if any(w in name for w in _SDPA_WORDS):
            return 'attention'
        if 'linear' in name or (self.stack and isinstance(self.stack[-1], nn.Linear)):
            return 'linear'
        if any(self._is_weight(a) for a in args):
            return 'linear'  # a weight used directly (``x.addmm_(y, w.t())``, 1x1 conv as GEMM)
        if any(a in type(m).__name__ for m in self.stack for a in _ATTENTION_NAMES):
            return 'attention'
        return 'other_matmul'

    def _is_weight(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        return id(t) in self.weights or id(t._base) in self.weights

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in _FORMULAS and func is not torch.ops.prim.device.default:
            with self:  # composite ops (linear, matmul, einsum) down to mm/bmm/addmm
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if packet in _FORMULAS:
            self.by_kind[self._kind(packet, args)] += _FORMULAS[packet](args, kwargs, out)
        return out


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weight_ids(model: nn.Module) -> set:
    """Ids of the parameters of ``model`` with two or more dimensions (matrices, kernels)."""
    return {id(p) for p in model.parameters() if p.dim() >= 2}


class MacCounting:
    """Context manager that counts the MACs of whatever runs inside it, labelled by kind.

    :func:`count_flops` wraps it for one forward pass without autograd; use it directly to count
    with autograd (the backbone then takes its training code paths), e.g.::

        with MacCounting(model) as counting:
            model(x)
        counting.by_kind  # {'conv': ..., 'linear': ..., 'attention': ...}

    Args:
        model: The module whose parameters are the weights (for the ``linear`` label) and whose
            submodules give the context (``attention``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.counter = _MacCounter(weight_ids(model))

    @property
    def by_kind(self) -> dict:
        return dict(self.counter.by_kind)

    @property
    def macs(self) -> int:
        return sum(self.counter.by_kind.values())

    def __enter__(self) -> MacCounting:
        stack = self.counter.stack

        def push(module, _args):
            stack.append(module)

        def pop(module, _args, _out):
            if stack and stack[-1] is module:
                stack.pop()

        self._hooks = [
            nn.modules.module.register_module_forward_pre_hook(push),
            nn.modules.module.register_module_forward_hook(pop),
        ]
        self.counter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.counter.__exit__(*exc)
        for h in self._hooks:
            h.remove()


def count_flops(
    model: nn.Module,
    inputs: torch.Tensor | Sequence,
    forward: Callable | None = None,
) -> FlopsReport:
    """Count the MACs of one forward pass of ``model`` on ``inputs`` (run without autograd).

    Args:
        model: Any module; put it in eval mode first for inference figures.
        inputs: A tensor, or a tuple of positional arguments for ``forward``.
        forward: What to call (default ``model``), e.g. a detector's ``_forward``.

    Returns:
        FlopsReport: Params, total MACs and the split by kind.
    """
    forward = forward or model
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    with torch.no_grad(), MacCounting(model) as counting:
        forward(*args)
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    return FlopsReport(
        params=count_params(model),
        macs=counting.macs,
        by_kind=counting.by_kind,
        input_shape=tuple(first.shape) if first is not None else (),
    )


def mlla_macs(
    embed_dims: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    height: int,
    width: int,
    in_channels: int = 3,
    mlp_ratio: float = 4.0,
    num_classes: int = 0,
    batch_size: int = 1,
) -> dict:
    """Hand count of the MLLA backbone's MACs from its equations (no model is built).

    Per block with ``N`` tokens, ``C`` channels and ``d = C / heads``: depthwise 3x3 convs CPE x2,
    DWConv and LePE (``4 * 9 N C``); linears in/act/out (``3 N C^2``), q/k (``2 N C^2``) and the
    MLP (``2 r N C^2``); attention ``k^T v`` (``N C d``), ``q (k^T v)`` (``N C d``) and the
    normaliser ``q . mean(k)`` (``N C``). The stem and the patch merging are counted layer by layer
    on the padded grids (``ceil`` sizes), as the model pads; their 1x1 convs are per-token linear
    maps and count as ``linear``, like :func:`count_flops` labels them.

    Args:
        embed_dims: Width of stage 0.
        depths: Blocks per stage.
        num_heads: Heads per stage.
        height: Input image height.
        width: Input image width.
        in_channels: Image channels.
        mlp_ratio: MLP expansion.
        num_classes: Add a ``Linear(C_3, num_classes)`` classification head when > 0.
        batch_size: Images per batch.

    Returns:
        dict: MACs per kind (``conv``, ``linear``, ``attention``) and ``total``.
    """
    conv = linear = attention = 0
    mid, c0 = embed_dims // 2, embed_dims
    h2, w2 = math.ceil(height / 4) * 2, math.ceil(width / 4) * 2  # after the stride-2 conv1
    h, w = h2 // 2, w2 // 2
    conv += h2 * w2 * mid * in_channels * 9  # conv1 3x3 s2
    conv += 2 * h2 * w2 * mid * mid * 9  # conv2: two 3x3
    conv += h * w * c0 * 4 * mid * 9  # conv3[0] 3x3 s2 to 4C
    linear += h * w * c0 * c0 * 4  # conv3[1] 1x1 4C -> C
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        c = embed_dims * 2**i
        n = h * w
        d = c // heads
        hidden = int(c * mlp_ratio)
        conv += depth * 4 * 9 * n * c
        linear += depth * (5 * n * c * c + 2 * n * c * hidden)
        attention += depth * (2 * n * c * d + n * c)
        if i < len(depths) - 1:
            hp, wp = h + h % 2, w + w % 2
            h, w = hp // 2, wp // 2
            linear += hp * wp * c * 8 * c  # 1x1 C -> 8C (on the padded grid)
            conv += h * w * 8 * c * 9  # depthwise 3x3 stride 2
            linear += h * w * 8 * c * 2 * c  # 1x1 8C -> 2C
    if num_classes:
        linear += embed_dims * 2 ** (len(depths) - 1) * num_classes
    out = {'conv': conv, 'linear': linear, 'attention': attention}
    out = {k: v * batch_size for k, v in out.items()}
    out['total'] = sum(out.values())
    return out


class _Classifier(nn.Module):
    """Backbone -> global average pool -> Linear, as the official classification model."""

    def __init__(self, backbone: nn.Module, channels: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def backbone_flops(
    arch: str | dict = 'tiny',
    height: int = 224,
    width: int = 224,
    num_classes: int = 0,
    batch_size: int = 1,
) -> FlopsReport:
    """Params and MACs of an :class:`mlla_mm.MLLA` backbone at ``height x width``.

    Args:
        arch: MLLA arch name or dict.
        height: Input height.
        width: Input width.
        num_classes: Add the official classification head (final norm, average pool,
            ``Linear(C_3, num_classes)``) when > 0, as the paper's "25M params" includes it.
        batch_size: Images per batch.

    Returns:
        FlopsReport: For the backbone (plus head when asked).
    """
    from mlla_mm.models import MLLA

    backbone = MLLA(arch, drop_path_rate=0.0, out_indices=(3,) if num_classes else (0, 1, 2, 3))
    model: nn.Module = backbone
    if num_classes:
        model = _Classifier(backbone, backbone.num_features[-1], num_classes)
    model.eval()
    x = torch.zeros(batch_size, backbone.in_channels, height, width)
    return count_flops(model, x)


# ------------------------------------------------------------------------------------------
# Whole models from configs
# ------------------------------------------------------------------------------------------
def _data_sample(scope: str, height: int, width: int):
    """An empty data sample of ``scope`` with the meta information the heads read."""
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    elif scope == 'mmseg':
        from mmseg.structures import SegDataSample as Sample
    else:
        from mmpretrain.structures import DataSample as Sample
    hw = (height, width)
    meta = {'img_shape': hw, 'ori_shape': hw, 'pad_shape': hw, 'batch_input_shape': hw}
    meta['scale_factor'] = (1.0, 1.0)
    return Sample(metainfo=meta)


def build_from_config(config, cfg_options: dict | None = None) -> tuple:
    """Build the model of an mmdet / mmseg / mmpretrain config (weights not loaded).

    Args:
        config: A config file, ``mlla_mm::NAME`` or a loaded ``mmengine.Config`` (not modified).
        cfg_options: Keys to override, as ``--cfg-options`` does.

    Returns:
        tuple: ``(model, scope)``, the model in eval mode and the config's ``default_scope``.
    """
    from mmengine.registry import MODELS, DefaultScope

    from mlla_mm.utils.config_loader import load_config
    from mlla_mm.utils.scope import setup_scope

    cfg = load_config(config, cfg_options)
    scope = setup_scope(cfg)
    model_cfg = cfg.model.copy()
    model_cfg.pop('pretrained', None)
    _drop_pretrained(model_cfg)
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(model_cfg)
    return model.eval(), scope


def _drop_pretrained(node) -> None:
    """Remove ``init_cfg=dict(type='Pretrained')`` entries: counting needs no weights."""
    if isinstance(node, dict):
        init = node.get('init_cfg')
        if isinstance(init, dict) and init.get('type') == 'Pretrained':
            node['init_cfg'] = None
        for value in node.values():
            _drop_pretrained(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _drop_pretrained(value)


def model_inputs(model: nn.Module, scope: str, height: int, width: int, batch_size: int = 1):
    """A dummy batch ``(inputs, data_samples)`` for ``model(inputs, data_samples, mode='tensor')``.

    The image tensor is zeros of ``(batch_size, 3, height, width)`` on the model's device; the
    data samples carry the shapes that mmdet's RPN and mmseg's heads read.
    """
    device = next(model.parameters()).device
    inputs = torch.zeros(batch_size, 3, height, width, device=device)
    samples = [_data_sample(scope, height, width) for _ in range(batch_size)]
    return inputs, samples


def config_flops(
    config,
    height: int,
    width: int,
    cfg_options: dict | None = None,
    backbone_only: bool = False,
) -> FlopsReport:
    """Params and MACs of a whole model (or its backbone) built from a config.

    The model runs ``mode='tensor'`` (mmengine's ``_forward``): for a two-stage detector the
    backbone, neck, RPN and the RoI heads on the RPN's proposals (mmdet's own ``get_flops``
    convention), for a segmentor the backbone, neck and decode head, for a classifier the
    backbone, neck and head.

    Args:
        config: A config file, ``mlla_mm::NAME`` or a loaded ``mmengine.Config`` (not modified).
        height: Input height.
        width: Input width.
        cfg_options: Keys to override.
        backbone_only: Count ``model.backbone`` alone.

    Returns:
        FlopsReport: For the whole model (or the backbone).
    """
    model, scope = build_from_config(config, cfg_options)
    inputs, samples = model_inputs(model, scope, height, width)
    if backbone_only:
        return count_flops(model.backbone, inputs)
    report = count_flops(model, (inputs, samples), lambda x, s: model(x, s, mode='tensor'))
    report.input_shape = tuple(inputs.shape)
    return report
