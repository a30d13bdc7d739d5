"""Plots of a benchmark run (matplotlib, from the `bench` extra): one PNG per view.

Latency CDF per policy (per profile), p50 latency against bandwidth, accuracy against uplink
bytes, throughput against offered load, and the plan mix per profile.
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

    fig, ax = plt.subplots(figsize=(6, 4))
    for profile, p in profiles.items():
        for name, m in p["summary"]["metrics"].items():
            ax.scatter(max(1.0, m["uplink_bytes_per_request"]), m["accuracy"], s=14)
            ax.annotate(f"{name}/{profile}", (max(1.0, m["uplink_bytes_per_request"]), m["accuracy"]), fontsize=5)
    ax.set(xscale="log", xlabel="uplink bytes per request", ylabel="accuracy", title="accuracy vs uplink bytes")
    written.append(_save(fig, folder / "accuracy-vs-uplink.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for profile, p in profiles.items():
        for policy, points in p.get("load", {}).items():
            ax.plot([q["rate_per_s"] for q in points], [q["throughput_per_s"] for q in points], marker="o", label=f"{policy} / {profile}")
    ax.set(xlabel="offered load (requests/s)", ylabel="completed (requests/s)", title="throughput vs offered load")
    if ax.lines:
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

    fig, ax = plt.subplots(figsize=(6, 4))
    for profile, p in profiles.items():
        for name, m in p["summary"]["metrics"].items():
            ax.scatter(m["latency_ms_p50"] or np.nan, m["accuracy"], s=14)
            ax.annotate(f"{name}/{profile}", (m["latency_ms_p50"] or np.nan, m["accuracy"]), fontsize=5)
        o = p["summary"]["oracle"]
        ax.scatter(o["latency_ms_p50"] or np.nan, o["accuracy"], marker="*", s=40)
    ax.set(xscale="log", xlabel="p50 latency (ms)", ylabel="accuracy", title="accuracy-latency plane (stars: oracle)")
    written.append(_save(fig, folder / "accuracy-latency.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
