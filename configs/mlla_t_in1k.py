# MLLA-T on ImageNet-1k with the official recipe: 300 epochs at 224x224, AdamW (lr 1e-3 for a
# total batch of 1024 = 8 GPUs x 128, weight decay 0.05 without decay on norms and biases,
# gradient clipping 5.0), 20 warm-up epochs, cosine to 5e-6, label smoothing 0.1, Mixup 0.8 /
# CutMix 1.0, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25 -- which is mmpretrain's Swin
# recipe, so we inherit it and change only the model, the batch split and the final lr.
# (MESA, the official recipe's self-distillation, has no mmpretrain counterpart; not used.)
_base_ = 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py'

custom_imports = dict(imports=['mlla_mm'], allow_failed_imports=False)

# Official ImageNet weights load unchanged (tools/model_converters/mlla2mm.py --task cls converts
# them to this model's keys for tools/test.py).
model = dict(
    backbone=dict(
        _delete_=True,
        type='mlla_mm.MLLA',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(3,),
    ),
    head=dict(in_channels=512),
)

train_dataloader = dict(batch_size=128)  # x 8 GPUs = 1024
param_scheduler = [
    dict(type='LinearLR', start_factor=5e-4, by_epoch=True, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=5e-6, by_epoch=True, begin=20),
]
