"""Parameter schedulers of the official MLLA recipes."""

from .warmup_cosine import WarmupCosineLR

__all__ = ['WarmupCosineLR']
