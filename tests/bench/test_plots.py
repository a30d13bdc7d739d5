"""The benchmark's plots on the committed result: every view is written, and the planes stay readable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.plots import _pareto_front, write_plots

RESULT = Path(__file__).resolve().parents[2] / "bench" / "results" / "2026-12-02.json"


def test_pareto_front_keeps_only_points_no_other_beats_on_both_axes():
    pts = [(10.0, 0.86), (12.0, 0.85), (24.0, 1.0), (30.0, 1.0), (8.0, 0.5), (24.0, 0.9)]
    assert _pareto_front(pts) == [(8.0, 0.5), (10.0, 0.86), (24.0, 1.0)]
    assert _pareto_front([]) == []


def test_planes_of_the_committed_run_are_one_panel_per_profile_without_point_labels(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from PIL import Image

    from bench import plots

    result = json.loads(RESULT.read_text())
    written = {p.name for p in write_plots(result, tmp_path)}
    assert {"accuracy-latency.png", "accuracy-vs-uplink.png", "plan-mix.png", "p50-vs-bandwidth.png"} <= written
    with Image.open(tmp_path / "accuracy-latency.png") as im:
        assert im.format == "PNG" and im.width > 1000

    profiles = {k: v for k, v in result["profiles"].items() if "summary" in v}
    fig = plots._planes(plt, profiles, lambda m: m["latency_ms_p50"], "p50 latency (ms)", "t")
    try:
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
        assert sorted(ax.get_title() for ax in panels) == sorted(profiles)
        assert all(not ax.texts for ax in fig.axes), "no per-point annotations: they overlapped into a smear"
        legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)
        names = {n for p in profiles.values() for n in p["summary"]["metrics"]}
        assert {t.get_text() for t in legend.get_texts()} == names | {"oracle"}  # each policy named once
    finally:
        plt.close(fig)
