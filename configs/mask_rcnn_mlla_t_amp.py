# Mask R-CNN + FPN, MLLA-T, COCO 1x with mixed precision (CUDA): the same as
# `tools/train.py configs/mask_rcnn_mlla_t.py --amp`. MLLA's linear attention runs in float32
# inside autocast (see mlla_mm/models/backbones/mlla.py), so fp16 does not overflow it.
_base_ = './mask_rcnn_mlla_t.py'

optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
