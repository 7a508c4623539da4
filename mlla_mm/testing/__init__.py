"""Testing and benchmarking aids: the plain reference transcription of the MLLA equations."""

from .official import fake_official_state_dict
from .reference import PlainMLLA, plain_rope

__all__ = ['PlainMLLA', 'fake_official_state_dict', 'plain_rope']
