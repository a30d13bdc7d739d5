"""A time-dilated edge (``RuntimeOptions.edge_dilation``): its compute is held k times as long, and it says so."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from msao.edge_runtime.requests import EdgeRequest
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions
from msao.edge_runtime.scheduler import SchedulerOptions
from msao.errors import ConfigError


def _ask(rt: EdgeRuntime, data, i: int):
    req = EdgeRequest(f"d{uuid.uuid4().hex[:10]}", data.questions[i], data.image_pngs[data.image_ids[i]], deadline_ms=30_000)
    t0 = time.perf_counter()
    r = rt.answer(req)
    return (time.perf_counter() - t0) * 1e3, r


def test_a_dilated_edge_holds_its_compute_and_its_own_clock_agrees_with_the_client(models, easyvqa_test):
    k = 50.0  # the built-in edge model computes ~2 ms a request: dilated 50x, a busy machine's few ms of thread hand-off stay under 10 %
    options = RuntimeOptions(workers=1, probe_interval_s=0, edge_dilation=k, scheduler=SchedulerOptions(policy="edge_only"))
    rt = EdgeRuntime(models[0], None, None, None, options).start()
    try:
        walls, totals, computes = [], [], []
        for i in range(12):
            wall, r = _ask(rt, easyvqa_test, i)
            assert r.status == "ok" and r.answered_by == "edge", r
            t = r.timings_ms
            walls.append(wall)
            totals.append(t["total"])
            computes.append(t["decode_image"] + t["vision"] + t["mas"] + t["local"])  # each already k x its measured time
    finally:
        rt.stop()
    wall, total, compute = (float(np.median(v)) for v in (walls, totals, computes))
    assert abs(wall - total) <= 0.1 * wall, (wall, total)  # the daemon's clock and the client's agree (p50)
    assert wall >= 0.9 * compute, (wall, compute)  # the k-times compute was really waited out, not only reported
    assert rt.estimator.edge_clock.scale >= 0.5 * k  # the scheduler plans with the slow edge it emulates


def test_dilation_below_one_is_refused():
    with pytest.raises(ConfigError, match="edge_dilation"):
        RuntimeOptions(edge_dilation=0.5)
