# MLLA-S on ImageNet-1k: the MLLA-T recipe with drop path 0.3.
_base_ = './mlla_t_in1k.py'

model = dict(backbone=dict(arch='small', drop_path_rate=0.3))
