"""Testing and benchmarking aids: the plain reference transcription of the MLLA equations."""

from .reference import PlainMLLA, plain_rope

__all__ = ['PlainMLLA', 'plain_rope']
