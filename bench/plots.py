"""Plots of a benchmark run (matplotlib, from the `bench` extra): one PNG per view.

Latency CDF per policy (per profile), p50 latency against bandwidth, accuracy against uplink
bytes, throughput against offered load, the plan mix per profile, and the accuracy-latency plane.

The two planes (accuracy against latency, against uplink bytes) hold every policy of every
profile: ~50 points. Labelled point by point they overlap into an unreadable smear, so they are
drawn as one small panel per profile, each policy with its own colour and marker named once
in a shared legend, and the Pareto front (no other policy both faster/cheaper and more
accurate) joined by a line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_plots"]


def write_plots(result: dict, folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'msao[bench]'): no plots")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    profiles = {k: v for k, v in result["profiles"].items() if "summary" in v}

    for profile, p in profiles.items():
        if not all("records" in cell for cell in p["cells"].values()):
            continue  # a summary-only result (the committed one): per-request records were not kept
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, cell in p["cells"].items():
            lat = np.sort([r["latency_ms"] for r in cell["records"] if r["http_status"] == 200])
            if len(lat):
                ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=name)
        ax.set(xscale="log", xlabel="end-to-end latency (ms)", ylabel="share of requests", title=f"latency CDF, {profile}")
        ax.legend(fontsize=7)
        written.append(_save(fig, folder / f"latency-cdf-{profile}.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    names = sorted({n for p in profiles.values() for n in p["summary"]["metrics"]})
    bw = {k: p["shape"]["bandwidth_bps"] or 0 for k, p in profiles.items()}
    for name in names:
        pts = sorted(
            (bw[k] / 1e6, p["summary"]["metrics"][name]["latency_ms_p50"]) for k, p in profiles.items() if name in p["summary"]["metrics"]
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="link bandwidth (Mbit/s)", ylabel="p50 latency (ms)", title="p50 latency vs bandwidth")
    ax.legend(fontsize=7)
    written.append(_save(fig, folder / "p50-vs-bandwidth.png"))

    fig = _planes(plt, profiles, lambda m: max(1.0, m["uplink_bytes_per_request"]), "uplink bytes per request (0 drawn at 1)",
                  "accuracy vs uplink bytes, per link profile", oracle=False)  # fmt: skip
    written.append(_save(fig, folder / "accuracy-vs-uplink.png", layout=False))

    if any(p.get("load") for p in profiles.values()):  # the paper regime's throughput is the fleet's (bench.fleet), not a load test here
        fig, ax = plt.subplots(figsize=(6, 4))
        for profile, p in profiles.items():
            for policy, points in p.get("load", {}).items():
                ax.plot([q["rate_per_s"] for q in points], [q["throughput_per_s"] for q in points], marker="o", label=f"{policy} / {profile}")
        ax.set(xlabel="offered load (requests/s)", ylabel="completed (requests/s)", title="throughput vs offered load")
        ax.legend(fontsize=7)
        written.append(_save(fig, folder / "throughput-vs-load.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = sorted({k for p in profiles.values() for k in p["summary"]["metrics"].get("msao", {}).get("plan_mix", {})})
    bottom = np.zeros(len(profiles))
    for kind in kinds:
        vals = np.array([p["summary"]["metrics"].get("msao", {}).get("plan_mix", {}).get(kind, 0) for p in profiles.values()], float)
        ax.bar(list(profiles), vals, bottom=bottom, label=kind)
        bottom += vals
    ax.set(ylabel="requests", title="msao plan mix per profile")
    if kinds:
        ax.legend(fontsize=7)
    written.append(_save(fig, folder / "plan-mix.png"))

    fig = _planes(plt, profiles, lambda m: m["latency_ms_p50"] or np.nan, "p50 latency (ms)", "accuracy-latency plane, per link profile")
    written.append(_save(fig, folder / "accuracy-latency.png", layout=False))
    return written


_MARKERS = "osD^vP<>Xph"


def _planes(plt, profiles: dict, x_of, xlabel: str, title: str, oracle: bool = True):
    """One panel per profile: accuracy (y) against ``x_of(metrics)`` (log x), one colour and
    marker per policy named once in a shared legend, the Pareto front (lower x, higher
    accuracy) joined by a grey line; with ``oracle``, the per-request oracle as a black star."""
    names = sorted({n for p in profiles.values() for n in p["summary"]["metrics"]})
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    style = {n: (colours(i % colours.N), _MARKERS[i % len(_MARKERS)]) for i, n in enumerate(names)}
    cols = min(3, len(profiles)) or 1
    rows = -(-len(profiles) // cols) or 1
    from matplotlib import ticker

    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.9), sharey=True, squeeze=False)
    for ax, (profile, p) in zip(axes.flat, profiles.items()):
        pts = [(x_of(m), m["accuracy"], n) for n, m in p["summary"]["metrics"].items()]
        for x, y, n in pts:
            colour, marker = style[n]
            ax.scatter(x, 100 * y, s=28, color=colour, marker=marker, edgecolor="black", linewidth=0.4, zorder=3, label=n)
        front = _pareto_front([(x, y) for x, y, _ in pts if np.isfinite(x)])
        if len(front) > 1:
            ax.plot([x for x, _ in front], [100 * y for _, y in front], color="grey", linewidth=0.8, zorder=2, drawstyle="steps-post")
        if oracle:
            o = p["summary"]["oracle"]
            ax.scatter(o["latency_ms_p50"] or np.nan, 100 * o["accuracy"], marker="*", s=90, color="black", zorder=4, label="oracle")
        ax.set(xscale="log", title=profile, xlabel=xlabel)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # 2x10^1, 3x10^1, ... overlapped
        ax.grid(True, which="major", linewidth=0.3, alpha=0.6)
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)")
    handles: dict = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    spare = list(axes.flat[len(profiles):])
    for ax in spare:
        ax.set_visible(False)
    fig.suptitle(title + "; grey line: Pareto front")
    if spare:  # the legend fills the empty panel
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(list(handles.values()), list(handles), loc="center", fontsize=9, frameon=False, ncol=2)
        fig.tight_layout()
    else:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.9 / (3.2 * rows + 0.9) + 0.02, 1, 1))
    return fig


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower x and higher y), sorted by x."""
    front, best = [], -np.inf
    for x, y in sorted(points, key=lambda q: (q[0], -q[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def _save(fig, path: Path, layout: bool = True) -> Path:
    """Write ``fig`` as PNG and free it; ``layout=False``: the figure laid itself out (around its legend)."""
    if layout:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
