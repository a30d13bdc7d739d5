"""bench/suite.py on a tiny configuration: both regimes and the fleet land in one results file with issue 19's goal table.

The built-in easy-VQA pair stands in for the scenes pair (the paper regime is about what the
edge holds, not which models): real broker, real worker, shaped link, daemons dilated per kind
of work. It checks the harness end to end, not how fast anything is.
"""

from __future__ import annotations

import json

from bench.fleet import FleetConfig
from bench.run import ORIN_PROFILE, PAPER, ROOT, BenchConfig
from bench.suite import SuiteConfig, goals_table, run_suite


def test_both_regimes_and_the_fleet_say_per_cell_what_they_ran(bench_bundles, tmp_path):
    tiny = dict(profiles=("lte",), requests=2, warmup=1, stream_questions=0, bundles=str(bench_bundles), dataset="easy-vqa")
    paper = BenchConfig(**{**PAPER, **tiny, "edge_bundle": "msao-tiny-edge", "cloud_bundle": "msao-tiny-cloud",
                           "calibration": "calibration.json", "policies": ("cloud_only", "edge_only", "msao")})  # fmt: skip
    resident = BenchConfig(**tiny, policies=("cloud_only", "msao"), edge_share=None, edge_dilation=4.0, load_profiles=())
    fleet = FleetConfig(bench_bundles / "msao-tiny-edge", bench_bundles / "msao-tiny-cloud", bench_bundles / "calibration.json", "easy-vqa",
                        edges=2, dilation_profile=str(ROOT / ORIN_PROFILE), rates=(2.0,), duration_s=2.0, bound_ms=30_000.0)  # fmt: skip
    out = tmp_path / "suite.json"
    result = run_suite(SuiteConfig(paper, resident, fleet), out)
    assert json.loads(out.read_text())["finished_at"] == result["finished_at"]
    assert [f.name for f in tmp_path.glob("suite-*.json")] == ["suite-summary.json"]  # the per-regime partials are folded in
    slim = json.loads((tmp_path / "suite-summary.json").read_text())
    assert slim["goals"] == result["goals"] and "records" not in slim["regimes"]["paper"]["profiles"]["lte"]["cells"]["msao"]

    p, r = result["regimes"]["paper"]["profiles"]["lte"], result["regimes"]["resident"]["profiles"]["lte"]
    assert set(p["cells"]) == {"cloud_only", "edge_only", "msao"} and set(r["cells"]) == {"cloud_only", "msao"}
    for cell in p["cells"].values():
        assert cell["setting"]["regime"] == "paper" and cell["setting"]["dilation"]["prefill"] == 18.2  # the Orin NX profile
        assert (cell["setting"]["edges"], cell["setting"]["workers"]) == (1, 1)
    for cell in r["cells"].values():
        assert cell["setting"]["regime"] == "resident" and set(cell["setting"]["dilation"].values()) == {4.0}
    plans = set(p["summary"]["metrics"]["msao"]["plan_mix"])
    assert plans and not plans & {"local_large", "split"}  # the paper regime's edge holds only the small model
    for c in result["fleet"]["cells"].values():
        assert c["lost"] == 0 and (c["setting"]["regime"], c["setting"]["edges"], c["setting"]["workers"]) == ("paper", 2, 1)

    goals = {(g["goal"], g["link"]): g for g in result["goals"]}
    assert goals[("p50 / best baseline", "lte")]["bound"] == 0.6 and goals[("uplink / cloud-only", "lte")]["value"] is not None
    fleet_goal = next(g for g in result["goals"] if g["goal"].startswith("fleet throughput"))
    assert fleet_goal["bound"] == 2.5 and not fleet_goal["at_most"]
    assert fleet_goal["met"] is None and "lower bound" in fleet_goal["note"]  # a 30 s bound: both held the one step
    table = goals_table(result["goals"])
    assert "| uplink / cloud-only | lte |" in table and "≥ 2.5" in table
