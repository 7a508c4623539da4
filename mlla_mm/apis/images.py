"""The image inputs of the inferencer: files, folders, numpy arrays and lists of them."""

from __future__ import annotations

import os
import os.path as osp
from collections.abc import Iterable, Sequence
from typing import Any, Union

import numpy as np

from mlla_mm.utils import require
from mlla_mm.utils.errors import InputError

__all__ = ['IMAGE_SUFFIXES', 'ImageInput', 'InputError', 'read_images']


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')

ImageInput = Union[str, os.PathLike, np.ndarray, Sequence[Any]]


def _describe(value: Any) -> str:
    """A short description of an input, never its contents (an array may be megabytes)."""
    if isinstance(value, np.ndarray):
        return f'array of shape {value.shape} and dtype {value.dtype}'
    text = repr(value)
    return text if len(text) <= 80 else f'{type(value).__name__} {text[:60]}...'


def _to_uint8(img: np.ndarray) -> str:
    """How to turn an array of another dtype into uint8 pixels, for the message."""
    if img.dtype == np.uint16:
        return '16-bit pixels scale down, e.g. (img // 257).astype(np.uint8)'
    if np.issubdtype(img.dtype, np.floating):
        return (
            'values in 0-1 scale up, e.g. (np.clip(img, 0, 1) * 255).round().astype(np.uint8); '
            'values in 0-255: np.clip(img, 0, 255).round().astype(np.uint8)'
        )
    if img.dtype == np.bool_:
        return 'a mask is not an image; (img * 255).astype(np.uint8) draws it'
    return 'e.g. np.clip(img, 0, 255).astype(np.uint8) for values in 0-255'


def _check_array(img: np.ndarray, where: str) -> np.ndarray:
    """An HxWx3 uint8 BGR image from an HxW, HxWx1, HxWx3 or HxWx4 uint8 array."""
    if img.dtype != np.uint8:
        raise InputError(f'{where}: {_describe(img)}; give uint8 pixels (0-255): {_to_uint8(img)}')
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise InputError(
            f'{where}: {_describe(img)}; give an image array of shape HxWx3 (BGR, as cv2.imread '
            'returns), HxW (grey) or NxHxWx3 (a batch)'
        )
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    return np.ascontiguousarray(img)


def _read_file(path: str) -> np.ndarray:
    cv2 = require('cv2', 'reading images')
    with open(path, 'rb') as f:
        data = f.read()
    img = None
    if data:
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            img = None
    if img is None:
        what = 'is empty' if not data else 'is not an image OpenCV can decode'
        raise InputError(
            f'{path!r} {what}; give an image file ({", ".join(IMAGE_SUFFIXES)}) or a folder of them'
        )
    return img


def _expand(inputs: ImageInput, where: str) -> Iterable[tuple[str | None, Any]]:
    """Yield ``(path or None, path or array)`` for every image of ``inputs``."""
    if isinstance(inputs, (str, os.PathLike)):
        path = os.fspath(inputs)
        if osp.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
            if not names:
                raise InputError(
                    f'folder {path!r} holds no image files ({", ".join(IMAGE_SUFFIXES)})'
                )
            for name in names:
                yield osp.join(path, name), osp.join(path, name)
        elif osp.isfile(path):
            yield path, path
        else:
            shown = '' if osp.isabs(path) else f' (looked for {osp.abspath(path)})'
            raise InputError(f'image {path!r} does not exist{shown}')
    elif isinstance(inputs, np.ndarray):
        if inputs.ndim == 4:
            for i, img in enumerate(inputs):
                yield None, _check_array(img, f'{where}[{i}]')
        else:
            yield None, _check_array(inputs, where)
    elif isinstance(inputs, (list, tuple)):
        if not inputs:
            raise InputError(f'{where}: the list of images is empty')
        for i, item in enumerate(inputs):
            if isinstance(item, (list, tuple)):
                raise InputError(f'{where}[{i}]: nested lists are not images; flatten the list')
            yield from _expand(item, f'{where}[{i}]')
    else:
        raise InputError(
            f'{where}: {_describe(inputs)} is not an image; give a file path, a folder, an HxWx3 '
            'uint8 BGR numpy array, or a list of these'
        )


def read_images(inputs: ImageInput) -> list[tuple[str | None, np.ndarray]]:
    """Read every image of ``inputs`` as ``(path or None, HxWx3 uint8 BGR array)``.

    Args:
        inputs: An image file, a folder (its image files, sorted by name), an HxWx3 uint8 BGR
            array (HxW grey and HxWx4 are converted), an NxHxWx3 batch, or a list of these.

    Raises:
        InputError: For a missing file, a file that is not an image, an empty folder or an
            array that is not an image; the message names the input, never prints an array.
    """
    return [
        (path, _read_file(src) if isinstance(src, str) else src)
        for path, src in _expand(inputs, 'input')
    ]


def _is_batch(inputs: ImageInput) -> bool:
    if isinstance(inputs, (list, tuple)):
        return True
    if isinstance(inputs, np.ndarray):
        return inputs.ndim == 4
    return isinstance(inputs, (str, os.PathLike)) and osp.isdir(inputs)
