"""Image decoding and CLIP-style preprocessing in NumPy + Pillow (no torch, so it runs on the edge).

The same function feeds training, export checks and inference, so a model never sees pixels
prepared two different ways.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from msao.errors import ImageError

__all__ = ["IMAGE_FORMATS", "ImagePreprocess", "MAX_IMAGE_PIXELS", "decode_image", "fitted_image", "pixels_from_image"]

# Decoding refuses anything larger before touching pixel data (decompression-bomb guard).
MAX_IMAGE_PIXELS = 4096 * 4096
# Pillow formats tried on untrusted bytes; the others (EPS runs Ghostscript, DDS, SPIDER, FITS, ...) are refused unread.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


@dataclass(frozen=True)
class ImagePreprocess:
    """How a model wants its pixels: HF ``CLIPImageProcessor`` semantics.

    Attributes:
        shortest_edge: resize so the shorter side has this many pixels (aspect kept).
        crop_height / crop_width: centre crop after resizing; the encoder's input size.
        mean / std: per-channel normalisation applied to pixels scaled to [0, 1].
        resample: Pillow filter name used by the resize.
    """

    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if min(self.shortest_edge, self.crop_height, self.crop_width) <= 0:
            raise ValueError(f"image sizes must be positive, got {self}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need three values (std > 0), got {self.mean}, {self.std}")

    def to_dict(self) -> dict:
        return {
            "shortest_edge": self.shortest_edge,
            "crop_height": self.crop_height,
            "crop_width": self.crop_width,
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": self.resample,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ImagePreprocess:
        unknown = set(d) - {"shortest_edge", "crop_height", "crop_width", "mean", "std", "resample"}
        if unknown:
            raise ValueError(f"unknown image preprocessing keys {sorted(unknown)}")
        return cls(
            shortest_edge=int(d["shortest_edge"]),
            crop_height=int(d["crop_height"]),
            crop_width=int(d["crop_width"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            resample=str(d["resample"]),
        )


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode PNG, JPEG, WebP, GIF, BMP or TIFF bytes (``IMAGE_FORMATS``) into an RGB uint8 array of shape (H, W, 3).

    Raises:
        ImageError: the bytes are not an image Pillow can decode, or it has more than
            ``max_pixels`` pixels (checked from the header, before pixel data is read).
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"image is {w}x{h} = {w * h} pixels, more than the limit {max_pixels}; send a smaller image")
            rgb = np.asarray(im.convert("RGB"))
    except ImageError:
        raise
    except Exception as exc:  # untrusted bytes: Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, and its
        # rarer plugins anything (fuzzed, Pillow 13: DDS NotImplementedError, AVIF RuntimeError, SPIDER AttributeError, TIFF TypeError)
        raise ImageError(f"cannot decode image ({len(data)} bytes): {exc}; send a JPEG or PNG file") from exc
    return rgb


def fitted_image(rgb: np.ndarray, pre: ImagePreprocess) -> np.ndarray:
    """The pixels the model's encoder sees, before normalisation: resized and centre-cropped, uint8 (crop_height, crop_width, 3).

    An upload re-encoded from these is already at the cloud model's input size, so the cloud's
    own preprocessing of it resizes nothing (when ``shortest_edge`` is the crop's shorter side).
    """
    from PIL import Image

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"expected a uint8 RGB array (H, W, 3), got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    scale = pre.shortest_edge / min(h, w)
    new_h, new_w = max(pre.crop_height, round(h * scale)), max(pre.crop_width, round(w * scale))
    if (new_h, new_w) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((new_w, new_h), _RESAMPLE[pre.resample]))
    top, left = (new_h - pre.crop_height) // 2, (new_w - pre.crop_width) // 2
    return rgb[top : top + pre.crop_height, left : left + pre.crop_width]


def pixels_from_image(rgb: np.ndarray, pre: ImagePreprocess) -> np.ndarray:
    """Resize, centre-crop and normalise one RGB image.

    Args:
        rgb: uint8 array (H, W, 3).
        pre: the model's preprocessing settings.

    Returns:
        float32 array (3, crop_height, crop_width), ready to stack into ``pixel_values``.
    """
    rgb = fitted_image(rgb, pre)
    x = rgb.astype(np.float32) / 255.0  # (H, W, 3)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, H, W)
