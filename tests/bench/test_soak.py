"""bench/soak.py: the growth judgement on known series, and a half-minute soak on the built-in pair with both faults."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.soak import SoakConfig, plot, run_soak, trend
from testbed import poll_until, process_resources


def test_a_flat_noisy_series_passes_and_a_climbing_one_is_caught():
    flat = [(t, 100.0 + (3.0 if t % 7 == 0 else 0.0)) for t in range(30)]  # spikes, no growth
    climbing = [(t, 100.0 + 2.0 * t) for t in range(30)]  # +60 % over the run
    assert trend(flat, slack=0.0)["ok"] and abs(trend(flat, slack=0.0)["slope_per_hour"]) < 60
    judged = trend(climbing, slack=8.0)
    assert not judged["ok"] and judged["late"] > judged["bound"] and judged["slope_per_hour"] == 120.0
    assert trend(flat[:2], slack=0.0) == {"judged": False, "why": "2 samples after warm-up (3 needed)"}


def test_a_short_soak_loses_nothing_through_a_broker_restart_and_a_worker_crash(tmp_path, bench_bundles):
    config = SoakConfig(
        minutes=0.5, sample_s=3.0, edges=2, rate_per_edge=2.0, edge_bundle=bench_bundles / "msao-tiny-edge",
        cloud_bundle=bench_bundles / "msao-tiny-cloud", calibration=bench_bundles / "calibration.json", dataset="easy-vqa",
        worker_down_s=2.0, warmup_minutes=0.05,
    )  # fmt: skip
    result = run_soak(config, tmp_path / "work")
    assert result["sent"] > 20 and result["lost"] == 0
    assert result["answered_ok"] + sum(result["answered_error"].values()) == result["sent"]
    assert [e["what"] for e in result["events"]] == ["broker restart", "worker kill"]
    worker_pids = {s["processes"]["worker"]["pid"] for s in result["samples"] if "worker" in s["processes"]}
    assert len(worker_pids) == 2  # the crashed worker and its replacement
    for s in result["samples"]:
        for role in ("edge-0", "edge-1", "broker", "client"):
            p = s["processes"][role]
            assert p["rss_mb"] > 1 and p["fds"] > 0 and p["threads"] >= 1, (role, p)
    assert set(result["trend"]) == {"edge-0", "edge-1", "worker", "broker"}  # the client is sampled, not judged
    assert result["passed"] == (not result["growth"])
    plot(result, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000


def test_a_process_that_exited_unreaped_reads_as_gone_not_as_a_crash():
    child = subprocess.Popen(["sleep", "0.01"])
    try:
        assert poll_until(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 30)
        with pytest.raises(OSError):  # the soak's sampler skips it, as it skips a process between a kill and its replacement
            process_resources(child.pid)
    finally:
        child.wait()
