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


def _profile(tmp_path, body: str):
    path = tmp_path / "device.toml"
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize("kind, other", [("image_decode", "local"), ("prefill", "decode_image")])
def test_a_profile_dilates_each_kind_of_edge_work_by_its_own_factor(models, easyvqa_test, tmp_path, kind, other):
    """Only the named kind is held 100x: the stage it times outgrows the undilated one, and the hold is really waited out.
    (Image decode and the answer run on every request; the vision encoder may be skipped for a cached image.)"""
    body = f'[dilation.{kind}]\nvalue = 100.0\nkind = "assumed"\nsource = "test: one kind slowed down"\n'
    options = RuntimeOptions(workers=1, probe_interval_s=0, edge_dilation_profile=_profile(tmp_path, body),
                             scheduler=SchedulerOptions(policy="edge_only"))  # fmt: skip
    rt = EdgeRuntime(models[0], None, None, None, options).start()
    try:
        assert rt.executor.dilation.factor(kind) == 100.0 and rt.executor.dilation.factor("decode") == 1.0
        rows = [_ask(rt, easyvqa_test, i) for i in range(8)]
    finally:
        rt.stop()
    assert all(r.status == "ok" for _, r in rows)
    stage = {"image_decode": "decode_image", "prefill": "local"}[kind]
    slowed, plain = (float(np.median([r.timings_ms[s] for _, r in rows])) for s in (stage, other))
    assert slowed > 3 * plain, (slowed, plain)  # undilated, an image decode takes about a tenth of the answer
    assert float(np.median([w for w, _ in rows])) >= 0.9 * slowed  # the hold was waited out, not only reported


def test_the_orin_nx_profile_loads_with_a_source_for_every_factor():
    from pathlib import Path

    from msao.edge_runtime.dilation import DILATION_KINDS, Dilation

    d = Dilation.load(Path(__file__).resolve().parents[2] / "bench" / "profiles" / "dilation_orin-nx_vs_a100.toml")
    assert d.prefill > d.vision > d.decode > 1.0 and all(d.factor(k) >= 1.0 for k in DILATION_KINDS)


@pytest.mark.parametrize(
    "body, match",
    [
        ("[dilation.vision]\nvalue = 3.0\nkind = \"derived\"\n", "needs value, kind and source"),
        ("[dilation.vision]\nvalue = 3.0\nkind = \"derived\"\nsource = \" \"\n", "empty source"),
        ("[dilation.gpu]\nvalue = 3.0\nkind = \"derived\"\nsource = \"x\"\n", "unknown kinds"),
        ("[dilation.decode]\nvalue = 0.5\nkind = \"derived\"\nsource = \"x\"\n", "decode must be a number in"),
        ("[other]\nx = 1\n", "no \\[dilation\\] table"),
        ("[dilation\n", "cannot be read as TOML"),
    ],
)
def test_a_bad_dilation_profile_is_refused_with_what_to_fix(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        RuntimeOptions(edge_dilation_profile=_profile(tmp_path, body))


def test_one_factor_and_a_profile_together_are_refused(tmp_path):
    good = _profile(tmp_path, '[dilation.decode]\nvalue = 2.0\nkind = "assumed"\nsource = "test"\n')
    with pytest.raises(ConfigError, match="not both"):
        RuntimeOptions(edge_dilation=2.0, edge_dilation_profile=good)
    with pytest.raises(ConfigError, match="no dilation profile"):
        RuntimeOptions(edge_dilation_profile=str(tmp_path / "missing.toml"))
