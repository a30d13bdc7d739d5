"""Image decoding refuses non-images and bombs; preprocessing follows CLIPImageProcessor."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from msao.engines.images import ImagePreprocess, decode_image, pixels_from_image
from msao.errors import ImageError


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_decodes_png_and_jpeg_to_rgb():
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(_png(rgb)), rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("L").save(buf, format="JPEG")
    assert decode_image(buf.getvalue()).shape == (10, 12, 3)


@pytest.mark.parametrize("data", [b"", b"GIF89a", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"%PDF-1.4 not an image"])
def test_rejects_non_images(data):
    with pytest.raises(ImageError, match="cannot decode image"):
        decode_image(data)


def test_rejects_truncated_png():
    data = _png(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ImageError, match="cannot decode image"):
        decode_image(data[: len(data) // 2])


def test_rejects_decompression_bomb_from_its_header():
    # a PNG header claiming 100,000 x 100,000 pixels with almost no data
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    with pytest.raises(ImageError, match="pixels"):
        decode_image(bomb)


def test_preprocess_resizes_shortest_edge_crops_centre_and_normalises():
    pre = ImagePreprocess(shortest_edge=4, crop_height=4, crop_width=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resample="nearest")
    rgb = np.zeros((8, 16, 3), np.uint8)
    rgb[:, 4:12] = 255  # the centre half is white
    x = pixels_from_image(rgb, pre)
    assert x.shape == (3, 4, 4) and x.dtype == np.float32
    assert np.allclose(x, 1.0)  # white maps to (1 - 0.5) / 0.5


def test_preprocess_rejects_non_rgb_arrays():
    with pytest.raises(ImageError, match=r"uint8 RGB array"):
        pixels_from_image(np.zeros((4, 4), np.uint8), ImagePreprocess(4, 4, 4))
