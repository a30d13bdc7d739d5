"""Markdown tables from a benchmark results file (what `docs/benchmarks.md` quotes).

python -m bench.report bench/results/<run>.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["format_table"]


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(result: dict) -> str:
    """One table per profile (every policy and the oracle), then the goals."""
    out = []
    for profile, p in result["profiles"].items():
        if "summary" not in p:
            continue
        s, link = p["summary"], p["link"]
        out.append(f"\n### {profile}: measured RTT {link['rtt_ms']:.1f} ms, uplink {link['uplink_mbps']:.1f} Mbit/s\n")
        out.append(
            "| policy | p50 ms | p95 ms | p99 ms | accuracy | up B/req | down B/req | edge CPU ms/req | cloud CPU ms/req | edge GFLOP/req | cloud GFLOP/req | edge peak MB | by cloud | MAS share |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, m in s["metrics"].items():
            mark = " (best baseline)" if name == s.get("best_baseline") else ""
            out.append(
                f"| {name}{mark} | {_fmt(m['latency_ms_p50'])} | {_fmt(m['latency_ms_p95'])} | {_fmt(m['latency_ms_p99'])} | "
                f"{m['accuracy']:.4f} | {m['uplink_bytes_per_request']:.0f} | {m['downlink_bytes_per_request']:.0f} | "
                f"{1e3 * m['edge_cpu_s_per_request']:.2f} | {1e3 * m['cloud_cpu_s_per_request']:.2f} | "
                f"{m['edge_flops_per_request'] / 1e9:.4f} | {m['cloud_flops_per_request'] / 1e9:.4f} | {m['edge_peak_rss_mb']:.0f} | "
                f"{m['answered_by_cloud']:.2f} | {100 * m['mas_share_of_latency']:.2f} % |"
            )
        o = s["oracle"]
        out.append(
            f"| oracle (bound) | {_fmt(o['latency_ms_p50'])} | {_fmt(o['latency_ms_p95'])} | – | {o['accuracy']:.4f} | | | | | | | | | |"
        )
        if s.get("throughput_per_s"):
            out.append(
                "\nThroughput at saturation (p95 within the bound): "
                + ", ".join(f"{k} {v:.1f}/s" for k, v in s["throughput_per_s"].items())
            )
        if s.get("msao_ratios"):
            out.append("\nmsao ratios: " + ", ".join(f"{k} {v}" for k, v in s["msao_ratios"].items()))
        goals = s.get("goals", {})
        if goals:
            out.append("\n| goal | measured | met |\n|---|---|---|")
            out += [f"| {g} | {_fmt(v['value'], 3)} | {_fmt(v['met'])} |" for g, v in goals.items()]
    return "\n".join(out)


if __name__ == "__main__":
    print(format_table(json.loads(Path(sys.argv[1]).read_text())))
