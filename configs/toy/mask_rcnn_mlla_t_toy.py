# The main job's config: Mask R-CNN + MLLA-T on the toy COCO set written by
# `python tools/misc/make_toy_coco.py data/toy_coco` (400 train / 50 val images of 128x128),
# trained from scratch on a CPU in minutes (`make demo`). It inherits the COCO config
# configs/mask_rcnn_mlla_t.py and changes only what the toy set and the time budget need.
_base_ = '../mask_rcnn_mlla_t.py'

data_root = 'data/toy_coco/'
# The palette only colours the drawn predictions: the shapes themselves have random colours.
metainfo = dict(
    classes=('circle', 'square', 'triangle'),
    palette=[(220, 60, 60), (60, 190, 70), (60, 100, 230)],
)
img_scale = (128, 128)

# MLLA-T as in the COCO config, trained from scratch (no pretrained weights are reachable here)
# and without stochastic depth. The heads are the same Mask R-CNN heads at 128 channels instead
# of 256 (FPN, RPN, RoI heads; box FCs 512 wide instead of 1024), and sample fewer anchors and
# RoIs: objects are few and the budget is a CPU, where the RoI heads would otherwise cost twice
# the backbone.
head_channels = 128
model = dict(
    backbone=dict(drop_path_rate=0.0, init_cfg=None),
    neck=dict(out_channels=head_channels),
    rpn_head=dict(in_channels=head_channels, feat_channels=head_channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=head_channels),
        bbox_head=dict(
            in_channels=head_channels, fc_out_channels=512, num_classes=len(metainfo['classes'])
        ),
        mask_roi_extractor=dict(out_channels=head_channels),
        mask_head=dict(
            in_channels=head_channels,
            conv_out_channels=head_channels,
            num_classes=len(metainfo['classes']),
        ),
    ),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=1000, max_per_img=200),
        rcnn=dict(sampler=dict(num=64)),
    ),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20),
    ),
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'),
    ),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# A short iteration-based schedule: 250 iterations of 4 images (2.5 passes over the 400 training
# images), linear warm-up then cosine decay; validation and a checkpoint at the end (and one
# halfway, for --resume). A fixed seed makes runs repeatable.
max_iters = 250
train_cfg = dict(
    _delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters
)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, eta_min_ratio=0.01),
]
# From scratch on a tiny set: a larger lr than the COCO fine-tuning (1e-4), gradients clipped;
# foreach=True: one multi-tensor AdamW update instead of one per parameter (the CPU default).
optim_wrapper = dict(optimizer=dict(lr=1e-3, foreach=True), clip_grad=dict(max_norm=10.0))
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(by_epoch=False, interval=125, max_keep_ckpts=1),
)
randomness = dict(seed=0)
log_processor = dict(by_epoch=False)
auto_scale_lr = dict(base_batch_size=4)
