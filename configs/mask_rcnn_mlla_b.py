# Mask R-CNN + FPN, MLLA-B, COCO 1x: as mask_rcnn_mlla_t.py with the base arch (wider stages).
_base_ = './mask_rcnn_mlla_t.py'

pretrained = 'checkpoints/MLLA_B.pth'
model = dict(
    backbone=dict(arch='base', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]),
)
