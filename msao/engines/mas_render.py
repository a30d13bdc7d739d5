"""Draws a MAS analysis over its image as a PNG, with Pillow only (no matplotlib), so it runs on the edge.

Pure presentation: takes the image as the model saw it, the scores and the keep-set; knows
nothing of bundles or segments. Layout:

    ┌───────────────────────────────────────────────────────────────┐
    │ Q: what color is the shape?                                   │
    │ MAS image 0.81  text 0.50  necessity 1.00  kept 16/64 (mas)   │
    ├──────────────────────────────┬────────────────────────────────┤
    │ image, kept patches outlined │ heat-map of the combined score │
    │ the rest dimmed              │ w, kept patches outlined       │
    │                              │ ▁▁▁▁ colour scale 0 … max w ▁▁ │
    └──────────────────────────────┴────────────────────────────────┘
"""

from __future__ import annotations

import io

import numpy as np

from msao.engines.images import ImagePreprocess
from msao.engines.mas import KeepSet, ModalityMas

__all__ = ["HEAT_STOPS", "heatmap_png", "model_view_from_pixels"]

# black -> dark red -> orange -> pale yellow: readable on screens and in greyscale print
HEAT_STOPS = np.array([[0, 0, 0], [150, 20, 30], [240, 120, 20], [255, 250, 190]], np.float64)
_KEPT_RGB = (60, 255, 120)


def _colormap(w: np.ndarray) -> np.ndarray:
    """float (…) in [0, 1] -> uint8 (…, 3) along HEAT_STOPS."""
    x = np.clip(w, 0.0, 1.0) * (len(HEAT_STOPS) - 1)
    lo = np.minimum(x.astype(int), len(HEAT_STOPS) - 2)
    f = (x - lo)[..., None]
    return np.rint(HEAT_STOPS[lo] * (1 - f) + HEAT_STOPS[lo + 1] * f).astype(np.uint8)


def model_view_from_pixels(pixels: np.ndarray, pre: ImagePreprocess) -> np.ndarray:
    """Preprocessed pixels (3, H, W) back to uint8 RGB (H, W, 3): the crop the encoder saw, patch-aligned."""
    x = pixels.transpose(1, 2, 0) * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType (>= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _colour_scale(canvas, draw, at: tuple[int, int, int], top: float, font) -> None:
    """A horizontal colour bar at (x, y) of ``width`` px mapping the heat-map's colours back to scores 0 … ``top``."""
    from PIL import Image

    x, y, width = at
    ramp = _colormap(np.linspace(0.0, 1.0, width))[None].repeat(12, axis=0)  # (12, width, 3)
    canvas.paste(Image.fromarray(ramp), (x, y))
    draw.rectangle((x, y, x + width - 1, y + 11), outline=(120, 120, 120))
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        tx = x + round(frac * (width - 1))
        draw.line((tx, y + 12, tx, y + 16), fill=(200, 200, 200))
        label = f"{frac * top:.2f}"
        lw = draw.textlength(label, font=font)
        draw.text((min(max(x, tx - lw / 2), x + width - lw), y + 17), label, fill=(200, 200, 200), font=font)
    draw.text((x - 4 - draw.textlength("w:", font=font), y - 2), "w:", fill=(200, 200, 200), font=font)


def heatmap_png(
    view: np.ndarray,
    combined: np.ndarray,
    keep: KeepSet,
    values: ModalityMas,
    grid: tuple[int, int, int],
    *,
    question: str,
    policy: str = "mas",
    panel_px: int = 384,
) -> bytes:
    """PNG bytes of the two-panel explanation.

    Args:
        view: uint8 (H, W, 3), the image as the encoder saw it (``model_view_from_pixels``).
        combined: float (N,) combined MAS score per token in [0, 1].
        keep: the keep-set drawn as outlines.
        values: per-modality MAS values for the title.
        grid: (rows, cols, patch) from ``mas.patch_grid``.
        panel_px: width of each panel; the image is scaled up with nearest-neighbour.
    """
    from PIL import Image, ImageDraw

    rows, cols, patch = grid
    h, w = view.shape[:2]
    scale = max(1, panel_px // max(h, w))
    ph, pw = h * scale, w * scale
    cell = patch * scale
    kept = keep.mask().reshape(rows, cols)

    left = view.astype(np.float64)
    dim = np.kron(np.where(kept, 1.0, 0.35), np.ones((patch, patch)))[..., None]  # (H, W, 1)
    left = np.rint(left * dim).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)

    shown = combined / combined.max() if combined.max() > 0 else combined  # display only: the brightest token is white
    heat = _colormap(np.kron(shown.reshape(rows, cols), np.ones((patch, patch))))  # (H, W, 3)
    grey = view.astype(np.float64).mean(axis=2, keepdims=True)
    right = np.rint(0.8 * heat + 0.2 * grey).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)

    font = _font(15)
    title_h = 64
    gap = 8
    legend_h = 46
    canvas = Image.new("RGB", (2 * pw + gap, ph + title_h + legend_h), (20, 20, 24))
    canvas.paste(Image.fromarray(left), (0, title_h))
    canvas.paste(Image.fromarray(right), (pw + gap, title_h))
    draw = ImageDraw.Draw(canvas)
    for r, c in zip(*np.nonzero(kept)):
        for x0 in (0, pw + gap):
            box = (x0 + c * cell, title_h + r * cell, x0 + (c + 1) * cell - 1, title_h + (r + 1) * cell - 1)
            draw.rectangle(box, outline=_KEPT_RGB, width=max(1, scale // 4))
    k, n = keep.indices.shape[0], keep.n_tokens
    draw.text((6, 4), f"Q: {question}", fill=(240, 240, 240), font=font)
    draw.text(
        (6, 24),
        f"MAS image {values.image:.2f}  text {values.text:.2f}  image necessity {values.image_necessity:.2f}  "
        f"kept {k}/{n} ({100 * k / n:.0f} %, {policy})",
        fill=(240, 240, 240),
        font=font,
    )
    draw.text(
        (6, 44), "left: kept tokens outlined, others dimmed   right: combined MAS score w per token (scale below)", fill=(170, 170, 170), font=font
    )
    _colour_scale(canvas, draw, (pw + gap, title_h + ph + 6, pw), float(combined.max()), _font(13))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
