"""Conversion of official MLLA checkpoints: every key of the T/S/B layouts is covered, nothing is
dropped silently, and a converted ImageNet checkpoint gives the official model's logits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import load_checkpoint

from mlla_mm.apis.conversion import convert_state_dict, infer_arch
from mlla_mm.testing import PlainMLLA, fake_official_state_dict

ROOT = Path(__file__).parents[2]
LAYOUTS = json.loads((ROOT / 'tests' / 'data' / 'mlla_official_layouts.json').read_text())


def build_classifier(arch: str):
    pytest.importorskip('mmpretrain')
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(str(ROOT / 'configs' / f'mlla_{arch[0]}_in1k.py'))
    return MODELS.build(cfg.model)


@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_cls_conversion_covers_every_key(arch):
    official = fake_official_state_dict(LAYOUTS[f'cls_{arch}'])
    converted = convert_state_dict(official, 'cls')
    assert infer_arch(dict(official)) == arch
    model_keys = set(build_classifier(arch).state_dict())
    assert set(converted) == model_keys
    rope = [k for k in official if k.endswith('attn.rope.rotations')]
    assert len(converted) == len(official) - len(rope)  # only the recomputable buffers go
    assert torch.equal(converted['backbone.norm3.weight'], official['norm.weight'])
    assert torch.equal(converted['head.fc.bias'], official['head.bias'])


@pytest.mark.parametrize('task', ['det', 'seg'])
@pytest.mark.parametrize('arch', ['tiny', 'small', 'base'])
def test_downstream_conversion_covers_every_key(task, arch):
    backbone = fake_official_state_dict(LAYOUTS[f'downstream_{arch}'])
    heads = {
        'det': [
            'neck.fpn_convs.0.conv.weight',
            'rpn_head.rpn_cls.weight',
            'roi_head.bbox_head.fc_cls.weight',
            'roi_head.mask_head.conv_logits.bias',
        ],
        'seg': ['decode_head.conv_seg.weight', 'auxiliary_head.conv_seg.bias'],
    }[task]
    sd = {'backbone.' + k: v for k, v in backbone.items()}
    sd.update({k: torch.zeros(2) for k in heads})
    converted = convert_state_dict(sd, task)
    rope = {k for k in sd if k.endswith('rope.rotations')}
    assert set(converted) == set(sd) - rope and rope
    with pytest.raises(KeyError, match='not understood.*mask_iou_head'):
        convert_state_dict({**sd, 'mask_iou_head.fc.weight': torch.zeros(1)}, task)


def test_unknown_and_mismatched_keys_fail_loudly():
    official = fake_official_state_dict(LAYOUTS['cls_tiny'])
    with pytest.raises(KeyError, match="not understood: 'dist_head.weight'"):
        convert_state_dict({**official, 'dist_head.weight': torch.zeros(1)}, 'cls')
    with pytest.raises(KeyError, match='not MLLA'):
        convert_state_dict(
            {**official, 'layers.0.blocks.0.attn.proj.weight': torch.zeros(1)}, 'cls'
        )
    with pytest.raises(ValueError, match='the weights are MLLA-tiny, not MLLA-base'):
        convert_state_dict(official, 'cls', arch='base')
    bad_shape = {**official, 'layers.1.blocks.0.attn.qk.bias': torch.zeros(3)}
    with pytest.raises(ValueError, match=r'qk.bias has shape \(3,\), MLLA-tiny expects \(256,\)'):
        convert_state_dict(bad_shape, 'cls')
    with pytest.raises(ValueError, match="task must be 'cls', 'det' or 'seg'"):
        convert_state_dict(official, 'pose')


def test_converted_imagenet_checkpoint_gives_the_official_logits(tmp_path):
    official = fake_official_state_dict(LAYOUTS['cls_tiny'], seed=3)
    src, dst = tmp_path / 'mlla_t.pth', tmp_path / 'mlla_t_mm.pth'
    torch.save({'model': official, 'epoch': 299}, src)
    tool = ROOT / 'tools' / 'model_converters' / 'mlla2mm.py'
    out = subprocess.run(
        [sys.executable, str(tool), str(src), str(dst), '--task', 'cls'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 'wrote' in out.stdout
    model = build_classifier('tiny').eval()
    load_checkpoint(model, str(dst), strict=True)

    # The official classifier: backbone -> final norm -> average pool -> head.
    ref = PlainMLLA(64, (2, 4, 8, 4), (2, 4, 8, 16), out_indices=(3,)).eval()
    backbone = {k: v for k, v in official.items() if k.startswith(('patch_embed', 'layers'))}
    ref_sd = {
        **backbone,
        'norm3.weight': official['norm.weight'],
        'norm3.bias': official['norm.bias'],
    }
    missing, unexpected = ref.load_state_dict(ref_sd, strict=False)
    assert not missing and all(k.endswith('rope.rotations') for k in unexpected)
    x = torch.randn(2, 3, 96, 112)
    with torch.no_grad():
        logits = model(x, mode='tensor')
        feat = ref(x)[0].mean((2, 3))
        expected = feat @ official['head.weight'].T + official['head.bias']
    assert ((logits - expected).norm() / expected.norm()).item() <= 1e-5


def test_converter_cli_reports_errors(tmp_path):
    bad = tmp_path / 'bad.pth'
    torch.save({'model': {'foo.weight': torch.zeros(1)}}, bad)
    tool = ROOT / 'tools' / 'model_converters' / 'mlla2mm.py'
    out = subprocess.run(
        [sys.executable, str(tool), str(bad), str(tmp_path / 'o.pth'), '--task', 'cls'],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "key not understood: 'foo.weight'" in out.stderr
    assert not (tmp_path / 'o.pth').exists()


def _cli(*args):
    tool = ROOT / 'tools' / 'model_converters' / 'mlla2mm.py'
    return subprocess.run(
        [sys.executable, str(tool), *map(str, args)], capture_output=True, text=True
    )


def test_converter_refuses_a_variant_with_the_same_widths(tmp_path):
    """MLLA-T weights with --arch small (same widths, other depths) must not be written."""
    src = tmp_path / 'MLLA_T.pth'
    torch.save({'model': fake_official_state_dict(LAYOUTS['cls_tiny'])}, src)
    out = _cli(src, tmp_path / 'o.pth', '--task', 'cls', '--arch', 'small')
    assert out.returncode == 1 and 'the weights are MLLA-tiny, not MLLA-small' in out.stderr
    assert not (tmp_path / 'o.pth').exists()
    # and blocks missing from a checkpoint are named
    official = fake_official_state_dict(LAYOUTS['cls_tiny'])
    del official['layers.2.blocks.7.mlp.fc2.bias']
    with pytest.raises(KeyError, match=r'lacks 1 weights of MLLA-tiny.*blocks.7.mlp.fc2.bias'):
        convert_state_dict(official, 'cls')


CUSTOM = {'embed_dims': 32, 'depths': [1, 2, 2, 1], 'num_heads': [1, 2, 4, 8]}


def _custom_official(tmp_path):
    from mlla_mm import MLLA

    sd = MLLA(arch=CUSTOM, out_indices=(3,)).state_dict()
    sd = {('norm.' + k[6:] if k.startswith('norm3.') else k): v for k, v in sd.items()}
    sd['head.weight'], sd['head.bias'] = torch.randn(10, 256), torch.randn(10)
    src = tmp_path / 'custom.pth'
    torch.save({'model': sd}, src)
    return src, sd


def test_converter_reads_a_custom_arch_from_the_weights(tmp_path):
    src, sd = _custom_official(tmp_path)
    assert infer_arch(sd) == {'embed_dims': 32, 'depths': (1, 2, 2, 1)}
    out = _cli(src, tmp_path / 'auto.pth', '--task', 'cls')
    assert out.returncode == 0, out.stderr
    assert "arch {'embed_dims': 32, 'depths': (1, 2, 2, 1)}" in out.stdout
    out = _cli(src, tmp_path / 'json.pth', '--task', 'cls', '--arch', json.dumps(CUSTOM))
    assert out.returncode == 0, out.stderr
    saved = torch.load(tmp_path / 'json.pth', weights_only=True)
    assert torch.equal(saved['state_dict']['backbone.norm3.weight'], sd['norm.weight'])
    wrong = {**CUSTOM, 'depths': [1, 2, 3, 1]}
    out = _cli(src, tmp_path / 'wrong.pth', '--task', 'cls', '--arch', json.dumps(wrong))
    assert out.returncode == 1 and 'not MLLA(embed_dims=32, depths=[1, 2, 3, 1])' in out.stderr
    out = _cli(src, tmp_path / 'bad.pth', '--task', 'cls', '--arch', '{embed_dims: 32}')
    assert out.returncode == 2 and '--arch is not valid JSON' in out.stderr
