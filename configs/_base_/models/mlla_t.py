# The MLLA-T backbone, once, for the task configs to take as a delta:
#   _base_ = ['mmdet::...', './_base_/models/mlla_t.py']
#   model = dict(backbone=dict(_base_.mlla_backbone, _delete_=True, drop_path_rate=0.1))
# (a variable, not a `model` dict: mmengine refuses the same key in two bases). The official
# ImageNet-1k checkpoint (MLLA_T.pth, see README) initialises it; change it with --cfg-options
# model.backbone.init_cfg.checkpoint=PATH (or init_cfg=None to train from scratch).
# map_cls_norm=False: as the official downstream backbone, which loads it with strict=False, the
# classifier's final `norm` is not loaded (norm0..norm3 start as LayerNorm 1/0).
pretrained = 'checkpoints/MLLA_T.pth'
mlla_backbone = dict(
    type='mlla_mm.MLLA',
    arch='tiny',
    drop_path_rate=0.2,
    out_indices=(0, 1, 2, 3),
    with_cp=False,
    map_cls_norm=False,
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
