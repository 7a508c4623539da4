"""The models a benchmark compares: MLLA and peer backbones, and whole models of configs."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    'ARCH_ALIASES',
    'PEERS',
    'build_peer',
]


def _mlla(arch: str, **kwargs) -> nn.Module:
    from mlla_mm import MLLA

    model = MLLA(arch, drop_path_rate=0.0, **kwargs)
    model.init_weights()
    return model


def _mlla_plain(arch: str) -> nn.Module:
    from mlla_mm import MLLA
    from mlla_mm.testing import PlainMLLA

    ref = MLLA(arch, drop_path_rate=0.0)
    ref.init_weights()
    plain = PlainMLLA(ref.embed_dims, ref.depths, ref.num_heads)
    plain.load_state_dict(ref.state_dict())
    return plain


def _swin_t(**kwargs) -> nn.Module:
    from mmdet.models.backbones import SwinTransformer

    return SwinTransformer(
        embed_dims=96,
        depths=(2, 2, 6, 2),
        num_heads=(3, 6, 12, 24),
        window_size=7,
        mlp_ratio=4,
        qkv_bias=True,
        drop_path_rate=0.0,
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        convert_weights=False,
        **kwargs,
    )


def _convnext_t() -> nn.Module:
    from mmpretrain.models.backbones import ConvNeXt

    return ConvNeXt(arch='tiny', out_indices=(0, 1, 2, 3), gap_before_final_norm=False)


def _resnet50() -> nn.Module:
    try:
        from mmdet.models.backbones import ResNet
    except ImportError:
        import torchvision

        net = torchvision.models.resnet50()
        return nn.Sequential(*list(net.children())[:-2])
    return ResNet(depth=50, out_indices=(0, 1, 2, 3))


def _vit_b16() -> nn.Module:
    from mmpretrain.models.backbones import VisionTransformer

    return VisionTransformer(arch='b', img_size=224, patch_size=16, out_type='featmap')


# name -> (description, builder)
PEERS: dict = {
    'mlla_t': ('MLLA-T (this package)', lambda: _mlla('tiny')),
    'mlla_s': ('MLLA-S (this package)', lambda: _mlla('small')),
    'mlla_b': ('MLLA-B (this package)', lambda: _mlla('base')),
    'mlla_t_cp': ('MLLA-T, with_cp=True', lambda: _mlla('tiny', with_cp=True)),
    'mlla_t_plain': ('MLLA-T, plain transcription (baseline)', lambda: _mlla_plain('tiny')),
    'mlla_s_plain': ('MLLA-S, plain transcription', lambda: _mlla_plain('small')),
    'mlla_b_plain': ('MLLA-B, plain transcription', lambda: _mlla_plain('base')),
    'swin_t': ('Swin-T (mmdet)', _swin_t),
    'swin_t_cp': ('Swin-T (mmdet), with_cp=True', lambda: _swin_t(with_cp=True)),
    'convnext_t': ('ConvNeXt-T (mmpretrain)', _convnext_t),
    'resnet50': ('ResNet-50 (mmdet, or torchvision)', _resnet50),
    'vit_b16': ('ViT-B/16, global attention (mmpretrain)', _vit_b16),
}


ARCH_ALIASES = {'t': 'mlla_t', 'tiny': 'mlla_t', 's': 'mlla_s', 'small': 'mlla_s'}


class _ConfigModel(nn.Module):
    """A whole model from a config, called as ``model(inputs, data_samples, mode='tensor')``."""

    def __init__(self, config: str) -> None:
        super().__init__()
        from mlla_mm.analysis.flops import build_from_config

        self.model, self.scope = build_from_config(config)

    def forward(self, x: torch.Tensor):
        from mlla_mm.analysis.flops import model_inputs

        _, samples = model_inputs(self.model, self.scope, *x.shape[-2:], batch_size=x.shape[0])
        return self.model(x, samples, mode='tensor')


def build_peer(name: str) -> nn.Module:
    """Build a model of :data:`PEERS`, or a whole model for ``config:PATH``.

    Raises:
        KeyError: For an unknown name (the message lists the known ones).
        ImportError: When the peer's library is not installed.
    """
    if name.startswith('config:'):
        return _ConfigModel(name[len('config:') :])
    if name not in PEERS:
        raise KeyError(f'Unknown model {name!r}; choose from {sorted(PEERS)} or config:PATH')
    return PEERS[name][1]()
