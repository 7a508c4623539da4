"""Classifiers built on the MLLA backbone (they need mmpretrain)."""
