# UperNet + MLLA-B on ADE20K: the official LeapLabTHU/MLLA mlla_b_upernet.py (51.9 mIoU
# single-scale reported there), with the recipe of configs/upernet_mlla_t.py. MLLA-B is wider
# (96..768), so the heads' input channels change with it.
_base_ = './upernet_mlla_t.py'

pretrained = 'checkpoints/MLLA_B.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained),
    ),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384),
)
