"""The MAS heat-map PNG carries a colour scale that maps its colours back to scores."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from msao.engines.mas import KeepSet, ModalityMas
from msao.engines.mas_render import HEAT_STOPS, heatmap_png


def test_heat_map_has_a_colour_bar_from_zero_to_the_highest_score_under_the_map():
    view = np.full((64, 64, 3), 128, np.uint8)
    combined = np.linspace(0.0, 0.5, 64)
    keep = KeepSet(np.arange(16, dtype=np.int64), 64, "topk")
    png = heatmap_png(view, combined, keep, ModalityMas(0.8, 0.5, 1.0, False), (8, 8, 8), question="what shape?", panel_px=384)
    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    panel, gap, title_h = 384, 8, 64
    bar = px[title_h + panel + 6 + 6, panel + gap + 2 : 2 * panel + gap - 2]  # a row through the bar, inside its outline
    assert np.abs(bar[0] - HEAT_STOPS[0]).max() <= 3, f"the bar starts at the scale's lowest colour, got {bar[0]}"
    assert np.abs(bar[-1] - HEAT_STOPS[-1]).max() <= 3, f"the bar ends at the scale's highest colour, got {bar[-1]}"
    assert (np.diff(bar.sum(axis=1)) >= -2).all(), "the bar brightens steadily from low to high"
    assert px.shape[0] > title_h + panel + 30, "room under the map for the scale's numbers"
