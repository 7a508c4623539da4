"""Training hooks of the official MLLA recipes."""

from .mesa_hook import MESAHook

__all__ = ['MESAHook']
