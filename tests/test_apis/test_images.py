"""Image inputs of the inferencer (mlla_mm.apis.images): arrays of another dtype get advice that
fits them."""

from __future__ import annotations

import numpy as np
import pytest

from mlla_mm.apis.images import read_images
from mlla_mm.utils.errors import InputError


@pytest.mark.parametrize(
    'dtype, advice',
    [
        (np.uint16, r'16-bit pixels scale down, e.g. \(img // 257\)'),
        (np.float32, r'values in 0-1 scale up'),
        (np.int64, r'np.clip\(img, 0, 255\)'),
    ],
)
def test_other_dtypes_get_advice_that_fits(dtype, advice):
    with pytest.raises(InputError, match=advice) as err:
        read_images(np.zeros((8, 9, 3), dtype))
    assert '\n' not in str(err.value)
    if dtype == np.uint16:
        assert 'np.clip(img, 0, 255)' not in str(err.value)  # wrong for 16-bit data


def test_grey_and_bgra_arrays_become_bgr():
    (_, grey), (_, bgra) = read_images([np.zeros((5, 7), np.uint8), np.zeros((5, 7, 4), np.uint8)])
    assert grey.shape == bgra.shape == (5, 7, 3)
