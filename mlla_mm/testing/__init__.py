"""Testing and benchmarking aids: the plain reference transcription of the MLLA equations."""

from .helpers import TINY_ARCH, randomise_bn, rel_err
from .official import fake_official_state_dict
from .reference import PlainMLLA, plain_rope

__all__ = [
    'TINY_ARCH',
    'PlainMLLA',
    'fake_official_state_dict',
    'plain_rope',
    'randomise_bn',
    'rel_err',
]
