"""High-level APIs: inference with a config and checkpoint, and checkpoint conversion.

* :class:`MLLAInferencer` / :func:`inference_image` (:mod:`mlla_mm.apis.inference`), with the
  image inputs of :mod:`mlla_mm.apis.images`;
* :func:`convert_checkpoint` / :func:`convert_state_dict` (:mod:`mlla_mm.apis.conversion`):
  official MLLA checkpoints to this package's keys.
"""

from .conversion import convert_checkpoint, convert_state_dict, load_official
from .images import IMAGE_SUFFIXES, InputError, read_images
from .inference import MLLAInferencer, inference_image, summarise

__all__ = [
    'IMAGE_SUFFIXES',
    'InputError',
    'MLLAInferencer',
    'convert_checkpoint',
    'convert_state_dict',
    'inference_image',
    'load_official',
    'read_images',
    'summarise',
]
