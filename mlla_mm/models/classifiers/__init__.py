"""Classifiers built on the MLLA backbone (they need mmpretrain)."""

from .mesa import MESAImageClassifier, mesa_loss

__all__ = ['MESAImageClassifier', 'mesa_loss']
