# UperNet + MLLA-S on ADE20K (recipe of configs/upernet_mlla_t.py): only the arch, the drop path
# rate and the pretrained checkpoint differ. MLLA-S has T's widths (64..512), so the heads match.
_base_ = './upernet_mlla_t.py'

pretrained = 'checkpoints/MLLA_S.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained),
    ),
)
