"""The banded PNG encoder writes ordinary PNGs: what a decoder reads back is what went in."""

from __future__ import annotations

import zlib

import cv2
import numpy as np
import pytest

from subwatch.enhance.png import encode_png


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (1300, 901), (650, 433, 3)])
def test_what_a_decoder_reads_is_what_went_in(dtype: type, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(5)
    top = np.iinfo(dtype).max
    # A smooth sky with noise on it, and the extremes of the range.
    ramp = np.linspace(0, top // 2, shape[1])[None, :]
    base = ramp if len(shape) == 2 else ramp[:, :, None]
    pixels = np.clip(base + rng.normal(0, top / 50, shape), 0, top).astype(dtype)
    pixels.reshape(-1)[0] = 0
    pixels.reshape(-1)[-1] = top
    encoded = encode_png(pixels)
    back = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == dtype
    if back.ndim == 3:
        back = back[:, :, ::-1]  # OpenCV decodes to BGR
    np.testing.assert_array_equal(back, pixels)


def test_large_images_are_one_stream_of_many_pieces() -> None:
    """Several independently compressed pieces, joined into one valid zlib stream."""
    rng = np.random.default_rng(6)
    pixels = rng.integers(0, 40, (3000, 2000), dtype=np.uint8)
    encoded = encode_png(pixels)
    start = encoded.index(b"IDAT") + 4
    length = int.from_bytes(encoded[start - 8 : start - 4], "big")
    filtered = zlib.decompress(encoded[start : start + length])
    assert len(filtered) == 3000 * (2000 + 1)
    # Noise of 40 levels compresses to well under the 8 bits a sample of raw storage takes.
    assert length < 0.85 * pixels.size


def test_refuses_what_png_cannot_hold() -> None:
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((4, 4, 2), np.uint8))
