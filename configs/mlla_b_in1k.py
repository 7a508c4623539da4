# MLLA-B on ImageNet-1k with the official recipe (cfgs/mlla_b.yaml): the MLLA-S recipe (64 images
# per GPU x 8 = 512, lr 5e-4, EMA decay 0.99995) with the base arch (768 head channels), drop
# path 0.5 and MESA ratio 2.0.
_base_ = './mlla_s_in1k.py'

model = dict(backbone=dict(arch='base', drop_path_rate=0.5), head=dict(in_channels=768))

custom_hooks = [
    dict(
        type='EMAHook',
        momentum=1 - 0.9996 ** (512 / 4096),
        update_buffers=True,
        priority='ABOVE_NORMAL',
    ),
    dict(type='mlla_mm.MESAHook', ratio=2.0),
]
