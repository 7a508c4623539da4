# Sliding-window test of configs/upernet_mlla_s.py: the image is resized to 2048x512 as in the
# default whole-image test, then segmented in 512x512 windows with stride 341 (about 1/3 overlap),
# whose logits are averaged. Training is the same as configs/upernet_mlla_s.py.
_base_ = './upernet_mlla_s.py'

model = dict(test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
