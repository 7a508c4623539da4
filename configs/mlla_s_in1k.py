# MLLA-S on ImageNet-1k with the official recipe (cfgs/mlla_s.yaml): the MLLA-T recipe with drop
# path 0.3, 64 images per GPU x 8 GPUs = 512 (so lr 5e-4, warm-up from 5e-7, cosine to 5e-6:
# the official linear scaling by total batch / 512), EMA decay 0.9996 ** (512 / 4096) = 0.99995
# and MESA ratio 1.5.
_base_ = './mlla_t_in1k.py'

model = dict(backbone=dict(arch='small', drop_path_rate=0.3))

train_dataloader = dict(batch_size=64)
optim_wrapper = dict(optimizer=dict(lr=5e-4))  # 5e-4 * 512 / 512
auto_scale_lr = dict(base_batch_size=512)

custom_hooks = [
    dict(
        type='EMAHook',
        momentum=1 - 0.9996 ** (512 / 4096),
        update_buffers=True,
        priority='ABOVE_NORMAL',
    ),
    dict(type='mlla_mm.MESAHook', ratio=1.5),
]
