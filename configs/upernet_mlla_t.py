# UperNet + MLLA-T on ADE20K, 512x512 crops, 160k iterations, 2 images/GPU x 8 GPUs, following
# the official LeapLabTHU/MLLA downstream/segmentation/configs/mlla/mlla_b_upernet.py in mmseg 1.x
# terms. Test: whole image resized to 2048x512 (the official protocol); sliding window in
# configs/upernet_mlla_t_slide.py; multi-scale + flip with tools/test.py --tta (mmseg's ADE20K
# tta_pipeline: scales 0.5..1.75 of the image, with and without flip).
#
# It inherits mmseg's Swin-T UperNet config, not the ResNet-50 one: that config already holds the
# official recipe (AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01, linear warm-up over 1500
# iterations then poly decay to 0, batch 2 per GPU, 512x512 crops, 160k iterations, whole-image
# test at 2048x512, UperNet/FCN heads on stages 0-3 / 2), so only the backbone, the heads' input
# channels and the no-decay keys differ. The ResNet-50 config would also need the optimiser,
# the schedule and the batch size rewritten.
_base_ = [
    'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
    './_base_/models/mlla_t.py',  # mlla_backbone: the MLLA-T backbone dict
]
custom_imports = dict(imports=['mlla_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(_base_.mlla_backbone, _delete_=True),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    # FCN auxiliary head on stage 3 (index 2), loss weight 0.4 (inherited).
    auxiliary_head=dict(in_channels=256),
)

# No weight decay on normalisation layers: 'norm' matches every LayerNorm/BatchNorm of MLLA
# (norm1/norm2 in blocks, the stem/merging BatchNorms, the output norms norm0..norm3), as in
# the official config; biases and the position terms (cpe1, cpe2, attn.lepe) decay, as there
# and in configs/mask_rcnn_mlla_t.py. The Swin-only keys of the base config (absolute_pos_embed,
# relative_position_bias_table) match nothing in MLLA and are dropped. To exempt cpe/lepe as
# well, see docs/recipes.md "Opting into our deviations".
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True, custom_keys={'norm': dict(decay_mult=0.0)}))
