# MLLA-B on ImageNet-1k: the MLLA-T recipe with drop path 0.5 and 768 head channels.
_base_ = './mlla_t_in1k.py'

model = dict(backbone=dict(arch='base', drop_path_rate=0.5), head=dict(in_channels=768))
