"""Across tasks: how the ImageNet checkpoint starts each backbone, consistent weight decay, and
the opt-in documented in docs/recipes.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

from mlla_mm.registry import MODELS
from mlla_mm.testing import fake_official_state_dict

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / 'configs'
LAYOUTS = json.loads((ROOT / 'tests' / 'data' / 'mlla_official_layouts.json').read_text())
TINY_ARCH = dict(embed_dims=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
DOWNSTREAM = sorted(p.name for p in CONFIGS.glob('*.py') if not p.name.startswith('mlla_'))


def _config(name: str) -> Config:
    pytest.importorskip('mmdet' if name.startswith('mask_rcnn') else 'mmseg')
    return Config.fromfile(str(CONFIGS / name))


@pytest.fixture(scope='module')
def official_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """A stand-in for the official MLLA_T.pth: {'model': state dict with a classifier norm}."""
    state = fake_official_state_dict(LAYOUTS['cls_tiny'], seed=3)
    path = tmp_path_factory.mktemp('ckpt') / 'MLLA_T.pth'
    torch.save({'model': state}, path)
    return path, state


@pytest.mark.parametrize(
    'name,options,mapped',
    [
        ('mask_rcnn_mlla_t.py', {}, False),
        ('upernet_mlla_t.py', {}, False),
        ('mlla_t_in1k.py', {}, True),
        # docs/recipes.md: opting into the mapping for a downstream config.
        ('mask_rcnn_mlla_t.py', {'model.backbone.map_cls_norm': True}, True),
    ],
)
def test_norm3_starts_as_the_official_code_starts_it(name, options, mapped, official_checkpoint):
    """Detection/segmentation: norm3 fresh (official strict=False load); classification: the
    classifier's final norm (what reproduces the official logits)."""
    if name.startswith('mlla_'):
        pytest.importorskip('mmpretrain')
    path, state = official_checkpoint
    cfg = Config.fromfile(str(CONFIGS / name)) if name.startswith('mlla_') else _config(name)
    cfg.merge_from_dict(options)
    backbone_cfg = cfg.model.backbone
    backbone_cfg.init_cfg = dict(type='Pretrained', checkpoint=str(path))
    backbone = MODELS.build(backbone_cfg)
    backbone.init_weights()
    # The checkpoint was loaded ...
    torch.testing.assert_close(
        backbone.patch_embed.conv1.conv.weight, state['patch_embed.conv1.conv.weight']
    )
    # ... and norm3 is either the classifier's norm or LayerNorm's initial 1/0.
    if mapped:
        torch.testing.assert_close(backbone.norm3.weight, state['norm.weight'])
        torch.testing.assert_close(backbone.norm3.bias, state['norm.bias'])
    else:
        for i in backbone.out_indices:
            norm = getattr(backbone, f'norm{i}')
            assert torch.equal(norm.weight, torch.ones_like(norm.weight)), i
            assert torch.equal(norm.bias, torch.zeros_like(norm.bias)), i


@pytest.mark.parametrize('name', DOWNSTREAM)
def test_every_downstream_config_drops_the_classifier_norm(name):
    assert _config(name).model.backbone.map_cls_norm is False


def _decays(cfg: Config) -> dict:
    """{backbone parameter name: weight decay} under the config's optimiser settings."""
    backbone_cfg = cfg.model.backbone
    backbone_cfg.update(arch=TINY_ARCH, init_cfg=None)
    backbone = MODELS.build(backbone_cfg)
    wrapper = build_optim_wrapper(backbone, cfg.optim_wrapper)
    names = {id(p): n for n, p in backbone.named_parameters()}
    return {
        names[id(p)]: g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']
    }


def _position_terms(decays: dict) -> set:
    return {n for n in decays if '.cpe' in n or '.lepe.' in n}


def test_detection_and_segmentation_spare_the_same_parameters():
    det, seg = _config('mask_rcnn_mlla_t.py'), _config('upernet_mlla_t.py')
    assert det.optim_wrapper.paramwise_cfg == seg.optim_wrapper.paramwise_cfg
    det_decay, seg_decay = _decays(det), _decays(seg)
    assert {n for n, w in det_decay.items() if w == 0} == {
        n for n, w in seg_decay.items() if w == 0
    }
    assert {det_decay[n] for n in _position_terms(det_decay)} == {0.05}
    assert {seg_decay[n] for n in _position_terms(seg_decay)} == {0.01}


def _docs_snippet() -> str:
    text = (ROOT / 'docs' / 'recipes.md').read_text()
    match = re.search(r'<!-- no-decay-position -->\s*```python\n(.*?)```', text, re.S)
    assert match, 'docs/recipes.md lost its no-decay-position snippet'
    return match.group(1)


@pytest.mark.parametrize('base', ['mask_rcnn_mlla_t.py', 'upernet_mlla_t.py'])
def test_documented_opt_in_exempts_the_position_terms(base, tmp_path):
    """The docs/recipes.md snippet, saved next to any det/seg config, adds cpe1/cpe2/attn.lepe to
    the no-decay set and changes nothing else."""
    official = _decays(_config(base))
    snippet = _docs_snippet().replace("'./mask_rcnn_mlla_t.py'", repr(str(CONFIGS / base)))
    assert repr(str(CONFIGS / base)) in snippet
    user = tmp_path / 'my_config.py'
    user.write_text(snippet)
    ours = _decays(Config.fromfile(str(user)))
    position = _position_terms(ours)
    assert len(position) == 6 * 4  # cpe1, cpe2, attn.lepe: weight and bias, one block per stage
    assert {ours[n] for n in position} == {0.0}
    assert {n: w for n, w in ours.items() if n not in position} == {
        n: w for n, w in official.items() if n not in position
    }
