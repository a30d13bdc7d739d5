"""bench/fleet.py on the easy-VQA pair: two daemons dilated per kind of work (small model only) and one real worker, a short rate ladder."""

from __future__ import annotations

from pathlib import Path

from bench.fleet import FleetConfig, report, run_fleet

ORIN_NX = Path(__file__).resolve().parents[2] / "bench" / "profiles" / "dilation_orin-nx_vs_a100.toml"


def test_the_fleet_accounts_for_every_request_and_reports_which_side_works(tmp_path, edge_bundle_dir, cloud_bundle_dir, calibration):
    from msao.edge_runtime.calibration import save_calibration

    save_calibration(calibration, tmp_path / "cal.json")
    config = FleetConfig(
        edge_bundle_dir, cloud_bundle_dir, tmp_path / "cal.json", "easy-vqa", edges=2, dilation_profile=str(ORIN_NX), link="wifi",
        policies=("cloud_only", "edge_only"), rates=(1.0, 2.0), duration_s=3.0, bound_ms=30_000.0,
    )  # fmt: skip
    result = run_fleet(config, tmp_path / "work")
    assert (result["regime"], result["edges"], result["workers"], result["edge_dilation"]) == ("large_on_edge = false", 2, 1, None)
    assert result["dilation"]["prefill"] == 18.2 and result["edge_dilation_profile"] == str(ORIN_NX)  # per kind, from the device profile
    assert all(cell["setting"] == {"regime": "paper", "dilation": result["dilation"], "edge_share": None, "edges": 2, "workers": 1}
               for cell in result["cells"].values())  # fmt: skip
    for cell in result["cells"].values():  # 20 s deadlines and a 30 s bound: every step holds, whatever the load
        assert [s["rate_total"] for s in cell["steps"]] == [2.0, 4.0] and cell["lost"] == 0 and cell["throughput_per_s"] == 4.0
        assert not cell["saturated"]  # the ladder's top held: 4/s is a lower bound
        for s in cell["steps"]:
            assert s["sent"] > 0 and s["sent"] == s["answered_ok"] and not s["answered_error"] and s["lost"] == 0
    cloud, edge = result["cells"]["cloud_only"]["steps"], result["cells"]["edge_only"]["steps"]
    assert all(s["by_cloud"] == 1.0 and s["cloud_busy"] > 0 for s in cloud) and all(s["by_cloud"] == 0.0 for s in edge)
    assert sum(s["accuracy"] for s in cloud) > 0 and "| cloud_only | 2 |" in report(result)
