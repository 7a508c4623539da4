# Mask R-CNN + FPN with an MLLA-T backbone on COCO, 1x schedule (12 epochs), as the official
# LeapLabTHU/MLLA downstream/detection/configs/mlla/mlla_t_mrcnn_1x.py, in mmdet 3.x terms.
# Only what differs from mmdet's ResNet-50 config is written here.
_base_ = [
    'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
    './_base_/models/mlla_t.py',  # mlla_backbone: the MLLA-T backbone dict
]
custom_imports = dict(imports=['mlla_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(_base_.mlla_backbone, _delete_=True, drop_path_rate=0.1),
    neck=dict(in_channels=[64, 128, 256, 512]),
)

# Augmentation from DETR / Sparse R-CNN, as the official config: random flip, then either a
# multi-scale resize (shorter side 480..800, longer <= 1333) or resize -> crop 384..600 -> resize.
# Test: mmdet's 1333x800 resize (inherited).
_ms_scales = [(1333, s) for s in range(480, 801, 32)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [dict(type='RandomChoiceResize', scales=_ms_scales, keep_ratio=True)],
            [
                dict(
                    type='RandomChoiceResize',
                    scales=[(1333, 400), (1333, 500), (1333, 600)],
                    keep_ratio=True,
                ),
                dict(
                    type='RandomCrop',
                    crop_type='absolute_range',
                    crop_size=(384, 600),
                    allow_negative_crop=True,
                ),
                dict(type='RandomChoiceResize', scales=_ms_scales, keep_ratio=True),
            ],
        ],
    ),
    dict(type='PackDetInputs'),
]
# 2 images per GPU x 8 GPUs = batch 16 (auto_scale_lr rescales lr for other batch sizes when
# training with --auto-scale-lr).
train_dataloader = dict(batch_size=2, dataset=dict(pipeline=train_pipeline))

# AdamW, lr 1e-4, weight decay 0.05, except on parameters whose name contains 'norm', as the
# official config (its other no-decay keys, 'absolute_pos_embed', 'relative_position_bias_table',
# 'an_bias', ..., are Swin / Agent-attention names that match nothing here). In MLLA 'norm' is
# every LayerNorm (norm1/norm2 in the blocks, the output norms norm0..norm3) and every BatchNorm
# (the stem's and the patch mergings' ConvLayer.norm); biases, the position terms (cpe1, cpe2,
# attn.lepe) and the neck and heads decay. To exempt cpe/lepe as well (this package's earlier
# choice), see docs/recipes.md "Opting into our deviations".
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.0)}),
)
# Mixed precision on CUDA: tools/train.py --amp (AmpOptimWrapper, dynamic loss scale), or
# configs/mask_rcnn_mlla_t_amp.py.
auto_scale_lr = dict(enable=False, base_batch_size=16)
