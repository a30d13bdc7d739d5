"""A fleet in the paper's regime: N dilated edge daemons that hold only the small model share one cloud worker.

    make bench-fleet        # 4 edges x 1 worker on lte, scenes, the edges dilated x15; cloud_only vs msao
    python -m bench.fleet --edge-dilation-profile bench/profiles/dilation_orin-nx_vs_a100.toml   # per kind of work

Per policy, every edge daemon (``--large-on-edge false``, ``--edge-dilation k``) gets Poisson
arrivals at the same rate over its HTTP API, each question asked once; the rate per edge steps
up a ladder until the p95 latency passes the bound (or a request is lost). **Throughput** is the
highest total rate whose p95 stays under the bound with nothing lost and nothing refused (a
lower bound where the ladder's top step held: ``saturated`` is false); every
request is accounted for (sent = answered ok + answered with an error + lost, and lost must be
0). The cloud's **busy share** is the worker's CPU seconds per second at each step (one worker
thread: 1.0 is saturated), beside the daemons' and the broker's, so the table shows which side
saturates. On this 2-core machine the edges, the worker, the broker and the proxy share the
cores: where everything saturates at once, the machine, not the cloud, is the ceiling, and the
report says so. A benchmark, not a test: the numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.cells import Item, dilation_factors, dilation_label, fire_at, poisson_times
from bench.run import PAPER_POLICIES, workload
from msao.edge_runtime.runtime import RuntimeOptions
from msao.errors import ConfigError
from testbed import PROFILES, EdgeDaemon, Stack, cpu_seconds

__all__ = ["FleetConfig", "fleet_step", "plot", "report", "run_fleet"]

ROOT = Path(__file__).resolve().parents[1]
EDGE_ARGS = ("--large-on-edge", "false", "--workers", "4")
"""Each fleet edge daemon (and the soak's): only the small model, four requests at a time."""


@dataclass(frozen=True)
class FleetConfig:
    """What one fleet run measures (the results JSON records it whole).

    Attributes:
        edge_bundle / cloud_bundle / calibration: what the daemons and the worker serve.
        edges: edge daemons, each dilated, each with ``--large-on-edge false``; one cloud worker.
        dilation: every kind of edge work this many times slower (ignored with ``dilation_profile``).
        dilation_profile: one factor per kind of edge work (a device profile file).
        rates: requests per second to each edge, ascending; each step lasts ``duration_s``.
        bound_ms: the p95 a step must stay under to count as held.
    """

    edge_bundle: Path = ROOT / "bundles" / "msao-scenes-edge"
    cloud_bundle: Path = ROOT / "bundles" / "msao-scenes-cloud"
    calibration: Path | None = ROOT / "bundles" / "calibration-scenes.json"
    dataset: str = "scenes"
    edges: int = 4
    dilation: float = 15.0
    dilation_profile: str = ""
    link: str = "lte"
    policies: tuple[str, ...] = ("cloud_only", "msao")
    rates: tuple[float, ...] = (2.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0, 28.0, 32.0)  # to 128/s in all: both held 112/s here (2026-12-07)
    duration_s: float = 15.0
    bound_ms: float = 2000.0
    seed: int = 0

    def __post_init__(self) -> None:
        if set(self.policies) - set(PAPER_POLICIES) or not self.policies:
            raise ValueError(f"policies: one or more of {list(PAPER_POLICIES)} (the edges hold only the small model)")
        if self.edges < 1 or self.dilation < 1 or not self.rates or list(self.rates) != sorted(self.rates) or min(self.rates) <= 0:
            raise ValueError("edges >= 1, dilation >= 1, rates positive and ascending")
        if self.link not in PROFILES:
            raise ValueError(f"link {self.link!r}: one of {sorted(PROFILES)}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fleet_step(stack: Stack, edges: list[EdgeDaemon], items: list[Item], policy: str, rate_per_edge: float, duration_s: float,
               seed: int, offset: int) -> dict:  # fmt: skip
    """Poisson arrivals at every edge for ``duration_s``: latency, accuracy, every request accounted for, CPU per side."""
    schedule = [
        (t, edge, items[(offset + n * len(edges) + e) % len(items)])
        for e, edge in enumerate(edges)
        for n, t in enumerate(poisson_times(rate_per_edge, duration_s, seed + e))
    ]
    cpu0 = (stack.cloud_cpu_seconds(), stack.broker_cpu_seconds(), sum(cpu_seconds(e.pid) for e in edges))
    asked: list[Item] = []
    results, elapsed = fire_at(schedule, {"policy": policy, "deadline_ms": 20_000}, timeout_s=60.0, items=asked)
    cpu1 = (stack.cloud_cpu_seconds(), stack.broker_cpu_seconds(), sum(cpu_seconds(e.pid) for e in edges))
    ok = [(ms, m) for ms, status, m in results if status == 200 and m.get("status") == "ok"]
    answered = [m for _, _, m in results if m.get("error_code") != "connection"]
    errors: dict[str, int] = {}
    for m in answered:
        if m.get("status") != "ok":
            errors[m.get("error_code", "?")] = errors.get(m.get("error_code", "?"), 0) + 1
    right = sum(m.get("answer") == item.truth for item, (_, status, m) in zip(asked, results) if status == 200 and m.get("status") == "ok")
    ms = [x for x, _ in ok]
    return {
        "rate_per_edge": rate_per_edge, "rate_total": round(rate_per_edge * len(edges), 3), "duration_s": round(elapsed, 2),
        "sent": len(schedule), "answered_ok": len(ok), "answered_error": errors, "lost": len(schedule) - len(answered),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if ms else None, "p95_ms": round(float(np.percentile(ms, 95)), 1) if ms else None,
        "accuracy": round(right / len(schedule), 4) if schedule else None,
        "by_cloud": round(sum(m.get("answered_by") == "cloud" for _, m in ok) / max(1, len(ok)), 3),
        "cloud_busy": round((cpu1[0] - cpu0[0]) / elapsed, 3), "broker_cpu_s_per_s": round((cpu1[1] - cpu0[1]) / elapsed, 3),
        "edges_cpu_s_per_s": round((cpu1[2] - cpu0[2]) / elapsed, 3),
    }  # fmt: skip


def run_fleet(config: FleetConfig, work: Path) -> dict:
    """Every policy up the rate ladder on one stack (a fresh set of daemons per policy)."""
    c = config
    items = workload(2000, c.seed, c.dataset)
    cells: dict[str, dict] = {}
    dilation = dilation_factors(c.dilation, c.dilation_profile)
    setting = {"regime": "paper", "dilation": dilation, "edge_share": None, "edges": c.edges, "workers": 1}
    with Stack(work, c.edge_bundle, c.cloud_bundle, c.calibration, workers=1, edge_share=None,
               edge_dilation=None if c.dilation_profile else c.dilation, edge_dilation_profile=c.dilation_profile) as stack:  # fmt: skip
        stack.shape(PROFILES[c.link])
        offset = 0
        for policy in c.policies:
            daemons = [stack.start_edge(f"{policy}-{i}", policy, EDGE_ARGS) for i in range(c.edges)]
            try:
                fleet_step(stack, daemons, items, policy, min(c.rates), 2.0, c.seed + 99, offset)  # warm-up, not reported
                steps = []
                for rate in c.rates:
                    step = fleet_step(stack, daemons, items, policy, rate, c.duration_s, c.seed, offset)
                    offset += step["sent"]
                    steps.append(step)
                    _log(f"{policy}: {rate * c.edges:g}/s total -> p95 {step['p95_ms']} ms, lost {step['lost']}, cloud busy {step['cloud_busy']}")
                    if step["lost"] or step["p95_ms"] is None or step["p95_ms"] > c.bound_ms:
                        break
            finally:
                for d in daemons:
                    stack.stop_edge(d)
            held = [s for s in steps if not s["lost"] and not s["answered_error"] and s["p95_ms"] is not None and s["p95_ms"] <= c.bound_ms]
            cells[policy] = {"throughput_per_s": max((s["rate_total"] for s in held), default=0.0), "steps": steps,
                             "saturated": len(held) < len(steps), "lost": sum(s["lost"] for s in steps), "setting": setting}  # fmt: skip
    base = cells[c.policies[0]]["throughput_per_s"]
    return {
        "benchmark": "fleet", "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items()},
        "regime": "large_on_edge = false", "dataset": c.dataset, "edges": c.edges, "workers": 1,
        "edge_dilation": None if c.dilation_profile else c.dilation, "edge_dilation_profile": c.dilation_profile, "dilation": dilation,
        "link": c.link, "bound_ms": c.bound_ms, "duration_s": c.duration_s, "rates_per_edge": list(c.rates),
        "cells": cells, "throughput_vs_first": {p: (c["throughput_per_s"] / base if base else None) for p, c in cells.items()},
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip


def report(result: dict) -> str:
    lines = [f"fleet: {result['edges']} edges ({dilation_label(result)}, {result['regime']}) x {result['workers']} worker, "
             f"{result['link']}, {result['dataset']}, p95 bound {result['bound_ms']:g} ms", "",
             "| policy | total rate /s | p50 ms | p95 ms | lost | errors | accuracy | by cloud | cloud busy | edges CPU s/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for policy, cell in result["cells"].items():
        for s in cell["steps"]:
            lines.append(f"| {policy} | {s['rate_total']:g} | {s['p50_ms']} | {s['p95_ms']} | {s['lost']} | {sum(s['answered_error'].values())} | "
                         f"{s['accuracy']} | {s['by_cloud']} | {s['cloud_busy']} | {s['edges_cpu_s_per_s']} |")  # fmt: skip
    lines.append("")
    for policy, cell in result["cells"].items():
        ratio = result["throughput_vs_first"][policy]
        lines.append(f"- {policy}: throughput {cell['throughput_per_s']:g}/s" + (f" ({ratio:.2f}x the first)" if ratio is not None else "")
                     + ("" if cell.get("saturated", True) else ": the ladder's top step held, so this is a lower bound"))  # fmt: skip
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """p95 latency and the worker's busy share against the total offered rate, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for j, (policy, cell) in enumerate(result["cells"].items()):
        rates, color = [s["rate_total"] for s in cell["steps"]], f"C{j}"
        axes[0].plot(rates, [s["p95_ms"] for s in cell["steps"]], marker="o", color=color, label=policy)
        axes[1].plot(rates, [s["cloud_busy"] for s in cell["steps"]], marker="o", color=color, label=f"{policy}: worker")
        axes[1].plot(rates, [s["edges_cpu_s_per_s"] for s in cell["steps"]], marker=".", linestyle=":", color=color, label=f"{policy}: edges")
    axes[0].set_yscale("log")
    axes[0].axhline(result["bound_ms"], color="grey", linestyle="--", linewidth=1, label=f"bound {result['bound_ms']:g} ms")
    axes[0].set(xlabel="offered requests/s (all edges)", ylabel="p95 latency (ms)", title="p95 under load")
    axes[1].set(xlabel="offered requests/s (all edges)", ylabel="CPU seconds per second", title="who is busy (1.0 = one core)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"fleet: {result['edges']} edges x {result['workers']} worker, {result['link']} ({dilation_label(result)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edge", type=Path, default=ROOT / "bundles" / "msao-scenes-edge")
    ap.add_argument("--cloud", type=Path, default=ROOT / "bundles" / "msao-scenes-cloud")
    ap.add_argument("--calibration", type=Path, default=ROOT / "bundles" / "calibration-scenes.json")
    ap.add_argument("--dataset", default="scenes")
    ap.add_argument("--edges", type=int, default=4)
    ap.add_argument("--edge-dilation", type=float, default=15.0)
    ap.add_argument("--edge-dilation-profile", default="", metavar="FILE", help="instead, one factor per kind of edge work (a device profile)")
    ap.add_argument("--link", default="lte", choices=sorted(PROFILES))
    ap.add_argument("--policies", default="cloud_only,msao", help="comma-separated; ratios are against the first")
    ap.add_argument("--rates", default=",".join(f"{r:g}" for r in FleetConfig.rates), help="requests per second to each edge, ascending")
    ap.add_argument("--duration-s", type=float, default=FleetConfig.duration_s)
    ap.add_argument("--bound-ms", type=float, default=2000.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fleet.json")
    a = ap.parse_args(argv)
    try:
        rates = tuple(float(r) for r in a.rates.split(","))
    except ValueError:
        ap.error(f"--rates must be numbers separated by commas, got {a.rates!r}")
    try:
        config = FleetConfig(a.edge, a.cloud, a.calibration, a.dataset, a.edges, a.edge_dilation, a.edge_dilation_profile, a.link,
                             tuple(p for p in a.policies.split(",") if p), rates, a.duration_s, a.bound_ms)  # fmt: skip
    except ValueError as exc:
        ap.error(str(exc))
    if a.edge_dilation_profile:
        try:
            RuntimeOptions(edge_dilation_profile=a.edge_dilation_profile)
        except ConfigError as exc:
            ap.error(str(exc))
    if not a.calibration.exists():
        ap.error(f"no calibration at {a.calibration}: run `make bundles/calibration-scenes.json` (or pass --calibration)")
    result = run_fleet(config, a.out.parent / (a.out.stem + "-work"))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    plot(result, a.out.with_suffix(".png"))
    print(report(result))
    print(f"wrote {a.out}")
    return 0 if all(c["lost"] == 0 for c in result["cells"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
