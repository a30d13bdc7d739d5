"""The benchmark harness on a tiny configuration: every policy and every metric lands in the JSON.

Not a timed test: it checks the harness works end to end (real broker, worker, shaped link,
time-dilated daemon per policy, so it runs without cgroups or root), not how fast anything is.
"""

from __future__ import annotations

import json

from bench.run import POLICIES, BenchConfig, run_bench
from bench.summary import BASELINES

METRICS = (
    "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "accuracy", "uplink_bytes_per_request", "downlink_bytes_per_request",
    "edge_flops_per_request", "cloud_flops_per_request", "edge_cpu_s_per_request", "cloud_cpu_s_per_request", "edge_peak_rss_mb",
    "answered_by_edge", "answered_by_cloud", "mas_share_of_latency", "plan_mix",
)  # fmt: skip


def test_a_tiny_run_has_every_policy_metric_oracle_and_goal(bench_bundles, tmp_path):
    config = BenchConfig(
        edge_share=None, edge_dilation=4.0,
        profiles=("lte",), requests=3, warmup=1, load_profiles=("lte",), load_rates=(4.0,), load_seconds=2.0, stream_questions=3,
        bundles=str(bench_bundles),
    )  # fmt: skip
    out = tmp_path / "run.json"
    result = run_bench(config, out)
    assert json.loads(out.read_text())["finished_at"] == result["finished_at"]
    p = result["profiles"]["lte"]
    assert p["link"]["rtt_ms"] > 40  # lte: 2 x 25 ms one-way, measured through the emulation
    s = p["summary"]
    names = set(s["metrics"])
    for policy in POLICIES:
        assert any(n.split("@")[0] == policy for n in names), policy
    assert {f"static_split@{k}" for k in result["models"]["split_points"]} <= names
    for name, m in s["metrics"].items():
        assert set(METRICS) <= set(m), name
        assert m["n"] == 3 and m["errors"] == 0, (name, m)
    assert s["oracle"]["n"] == 3 and s["oracle"]["latency_ms_p50"] is not None
    assert s["best_baseline"] is None or s["best_baseline"].split("@")[0] in BASELINES
    assert set(s["throughput_per_s"]) == {"cloud_only", "msao"}
    assert "p50_vs_oracle" in s["msao_ratios"] and "p50 <= 1.15x oracle" in s["goals"]
    assert set(s["stream"]) == {"msao+stream", "edge_only+stream"}
    assert all(c["setting"] == {"regime": "resident", "dilation": dict.fromkeys(c["setting"]["dilation"], 4.0), "edge_share": None,
                                "edges": 1, "workers": 1} for c in p["cells"].values())  # fmt: skip
    assert s["metrics"]["cloud_only"]["uplink_bytes_per_request"] > 0 and s["metrics"]["edge_only"]["uplink_bytes_per_request"] == 0
