# Mask R-CNN + FPN, MLLA-S, COCO 3x: as mask_rcnn_mlla_t_3x.py with the small arch.
_base_ = './mask_rcnn_mlla_t_3x.py'

pretrained = 'checkpoints/MLLA_S.pth'
model = dict(
    backbone=dict(arch='small', init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
)
