# UperNet + MLLA-T on the toy ADE20K-layout set of tools/misc/make_toy_ade20k.py, trained from
# scratch on a CPU in minutes. It inherits configs/upernet_mlla_t.py (and so the ADE20K recipe and
# pipelines) and changes only what the toy set and the time budget need:
# - 4 classes (background + 3 shapes) instead of 150, read by mmseg's BaseSegDataset with
#   ADE20K's convention (label 0 = unlabelled, ignored via reduce_zero_label=True);
# - images 128 pixels high instead of 512, so 128x128 crops and a 256x128 test resize (the
#   2048x512 protocol scaled down by 4); --tta works as for ADE20K (scales 0.5..1.75, flips);
# - decode/auxiliary heads 128/64 channels instead of 512/256 (at 1/4 resolution UperNet's
#   512-channel 3x3 convs would cost more than the backbone on a CPU);
# - no pretrained weights, no stochastic depth, batch 8, lr 1e-3 and a short schedule:
#   20 warm-up iterations, then poly decay to 0 at max_iters.
_base_ = '../upernet_mlla_t.py'

data_root = 'data/toy_ade20k/'
metainfo = dict(
    classes=('background', 'circle', 'square', 'triangle'),
    palette=[(120, 120, 120), (220, 60, 60), (60, 190, 70), (60, 100, 230)],
)
num_classes = 4
crop_size = (128, 128)
test_scale = (256, 128)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(drop_path_rate=0.0, init_cfg=None),
    decode_head=dict(channels=128, num_classes=num_classes),
    auxiliary_head=dict(channels=64, num_classes=num_classes),
)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=test_scale, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=test_scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
toy_dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.jpg',
    seg_map_suffix='.png',
    reduce_zero_label=True,
)
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(
        **toy_dataset,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    num_workers=1,
    dataset=dict(
        **toy_dataset,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader

max_iters = 120
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=20, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1),
)
