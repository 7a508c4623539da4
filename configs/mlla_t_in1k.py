# MLLA-T on ImageNet-1k with the official recipe (LeapLabTHU/MLLA cfgs/mlla_t.yaml, config.py and
# main.py, run on 8 GPUs with --amp). docs/recipes.md compares every value with the official one.
#
# mmpretrain's Swin-T recipe already holds most of it, so we inherit it: 300 epochs at 224x224;
# AdamW (lr 5e-4 x total batch / 512, weight decay 0.05, none on norms and biases, betas
# (0.9, 0.999), eps 1e-8), gradient clipping 5.0; label smoothing 0.1; Mixup 0.8 / CutMix 1.0
# (one of the two per batch); RandAugment rand-m9-mstd0.5-inc1; random erasing 0.25; bicubic
# RandomResizedCrop, test resize 256 + centre crop 224. What this file adds or changes:
# the model, 128 images per GPU, drop_last, the official lr schedule, AMP, the EMA and MESA.
_base_ = 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py'

# mlla_mm.engine holds MESA and the official schedule (it needs mmpretrain).
custom_imports = dict(imports=['mlla_mm', 'mlla_mm.engine'], allow_failed_imports=False)

# ImageClassifier + the MESA term (on when MESAHook attaches the EMA teacher; the same weights and
# state dict as a plain ImageClassifier). Official ImageNet weights load unchanged
# (tools/model_converters/mlla2mm.py --task cls converts them to this model's keys).
model = dict(
    type='mlla_mm.MESAImageClassifier',
    backbone=dict(
        _delete_=True,
        type='mlla_mm.MLLA',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(3,),
    ),
    head=dict(in_channels=512),
)

# Official batch: 128 per GPU x 8 GPUs = 1024, lr 5e-4 * 1024 / 512 = 1e-3 (the inherited lr);
# the official loader drops the last incomplete batch.
train_dataloader = dict(batch_size=128, drop_last=True)

# Mixed precision (the official README trains with --amp: autocast + a dynamic GradScaler; the
# gradient is unscaled before clipping): AmpOptimWrapper, whose loss scale is dynamic by default.
# It needs a GPU: on a CPU add --cfg-options optim_wrapper.type=OptimWrapper.
optim_wrapper = dict(type='AmpOptimWrapper')

# The official schedule, stepped every iteration: linear warm-up over 20 epochs from WARMUP_LR,
# then a cosine to MIN_LR whose phase counts from iteration 0 over all 300 epochs (timm's
# CosineLRScheduler). config.py: BASE_LR 5e-4, WARMUP_LR 5e-7, MIN_LR 5e-6, all three scaled by
# total batch / 512 in main.py, hence ratios: 1e-6 / 1e-5 here at lr 1e-3 (auto_scale_lr keeps
# scaling all three together). `end`/`T_max` default to max_epochs.
param_scheduler = [
    dict(
        type='mlla_mm.WarmupCosineLR',
        warmup=20,
        warmup_start_ratio=5e-7 / 5e-4,
        eta_min_ratio=5e-6 / 5e-4,
        by_epoch=True,
        convert_to_iter_based=True,
    )
]

# The official run always keeps an EMA of the weights (timm ModelEma, every iteration, buffers
# too) with decay 0.9996 ** (total batch / 4096): 0.9996 ** 0.25 = 0.99990 at 1024. EMAHook
# validates and saves the EMA weights (checkpoint 'state_dict'; the raw ones in 'ema_state_dict').
# MESA from epoch int(0.25 * 300) = 75 with ratio 1.0 (cfgs/mlla_t.yaml AUG.MESA); its teacher is
# that EMA model. Without MESA: custom_hooks = [the EMAHook alone] (see docs/recipes.md).
custom_hooks = [
    dict(
        type='EMAHook',
        momentum=1 - 0.9996 ** (1024 / 4096),
        update_buffers=True,
        priority='ABOVE_NORMAL',
    ),
    dict(type='mlla_mm.MESAHook', ratio=1.0),
]

# Official: seed 0 + rank, cudnn.benchmark on.
randomness = dict(seed=0, diff_rank_seed=True)
env_cfg = dict(cudnn_benchmark=True)
