"""PNG encoding with the deflate work spread over the cores.

A stretched 26 MP preview is 26 MB of noisy bytes. zlib's Huffman-only coding (string matching
finds little in noise; docs/decisions.md) runs at about 30 MB/s here, so one PNG took 0.85-0.93 s
on one core through OpenCV, and a preview cycle writes two or three. The deflate format lets
independently compressed pieces follow each other when every piece but the last ends on a
byte boundary (a sync flush) and only the last is final, so the filtered rows are compressed in
bands on all cores and joined: the file is an ordinary PNG (one zlib stream, one IDAT chunk)
that any decoder reads.

Every row uses PNG's "sub" filter (each byte minus the byte one pixel to the left), which
suits a smooth sky with noise on it as well as the adaptive choice and costs one vector pass.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from subwatch.rowbands import for_row_bands

__all__ = ["encode_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG filter type of every row: "sub".
_SUB = 1
#: zlib header: deflate with a 32 kB window, "fastest" level flag (CMF * 256 + FLG is a
#: multiple of 31, as the format asks).
_ZLIB_HEADER = b"\x78\x01"
#: Uncompressed bytes per independently compressed piece.
_BAND_BYTES = 4 << 20


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) grey or (H, W, 3) RGB image of uint8 or uint16 samples."""
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG samples must be uint8 or uint16, not {pixels.dtype}")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"a PNG takes (H, W) or (H, W, 3) images, not shape {pixels.shape}")
    height, width = pixels.shape[:2]
    if height < 1 or width < 1:
        raise ValueError("a PNG needs at least one pixel")
    channels = 1 if pixels.ndim == 2 else 3
    samples = np.ascontiguousarray(pixels, pixels.dtype.newbyteorder(">"))
    rows = samples.view(np.uint8).reshape(height, -1)
    step = channels * pixels.dtype.itemsize  # bytes per pixel: the "sub" filter's distance
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = _SUB
    filtered[:, 1 : 1 + step] = rows[:, :step]
    np.subtract(rows[:, step:], rows[:, :-step], out=filtered[:, 1 + step :])

    pieces: dict[int, bytes] = {}

    def compress(band: slice) -> None:
        packer = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
        last = band.stop == height
        body = packer.compress(filtered[band].data)
        pieces[band.start] = body + packer.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    # Bands of a few MB: each piece starts its Huffman statistics afresh and ends with a
    # flush of a few bytes, so larger is better here than for cache-sized passes.
    for_row_bands(compress, height, filtered.shape[1], band_bytes=_BAND_BYTES)
    checksum = struct.pack(">I", zlib.adler32(filtered.data))
    stream = b"".join([_ZLIB_HEADER, *(pieces[k] for k in sorted(pieces)), checksum])
    colour_type = 0 if channels == 1 else 2
    header = struct.pack(">IIBBBBB", width, height, pixels.dtype.itemsize * 8, colour_type, 0, 0, 0)
    return b"".join(
        [_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", stream), _chunk(b"IEND", b"")]
    )
