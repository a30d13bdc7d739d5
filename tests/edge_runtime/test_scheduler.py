"""The scheduler's cost model on real bundles and a real (small) train calibration; no network here."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msao.edge_runtime.calibration import load_calibration
from msao.edge_runtime.estimates import LinkSnapshot, SegmentClock
from msao.edge_runtime.scheduler import ALWAYS_VERIFY, CostInputs, Scheduler, SchedulerOptions
from msao.errors import ConfigError


def _scheduler(models, calibration, **options) -> Scheduler:
    edge, large = models
    return Scheduler(
        SchedulerOptions(**options), edge.manifest, SegmentClock(edge.manifest), large.manifest, SegmentClock(large.manifest),
        SegmentClock(large.manifest), calibration,
    )  # fmt: skip


def _inputs(rtt_ms=2.0, mbps=1000.0, cloud_ok=True, queue_ms=0.0, load=1.0, deadline_ms=5000.0) -> CostInputs:
    return CostInputs(LinkSnapshot(rtt_ms, mbps * 1e6, True), cloud_ok, queue_ms, load, 0.3, 1200, deadline_ms)


def test_calibration_has_every_ratio_and_threshold_and_only_train_data(calibration, models):
    edge, large = models
    assert calibration.split == "train" and calibration.questions == 60
    pair = calibration.pair(edge.manifest.model_hash, large.manifest.model_hash)
    assert pair is not None and pair.thresholds[-1] == ALWAYS_VERIFY
    for row in pair.commit_share:
        assert row[0] == 1.0 and row[-1] == 0.0  # threshold 0 commits every draft, 1.01 none
        assert all(a >= b for a, b in zip(row, row[1:]))  # a higher threshold never commits more


@pytest.mark.parametrize(
    ("policy", "kind"),
    [
        ("edge_only", "edge"),
        ("prune_only", "edge"),
        ("cloud_only", "cloud"),
        ("static_split", "split"),
        ("draft_verify_static", "draft_verify"),
    ],
)
def test_each_fixed_policy_gives_its_plan_kind(models, calibration, policy, kind):
    plan = _scheduler(models, calibration, policy=policy).choose(_inputs())
    assert plan.kind == kind and plan.reason.startswith(f"policy {policy}")
    if policy == "prune_only":
        assert plan.keep_ratio == 0.25
    if policy == "cloud_only":
        assert plan.keep_ratio == 1.0 and not plan.send_keep
    if policy == "draft_verify_static":
        assert plan.commit_threshold > 1 and plan.speculate


def test_without_the_cloud_only_local_plans_are_candidates(models, calibration):
    s = _scheduler(models, calibration)
    kinds = {p.kind for p in s.candidates(_inputs(cloud_ok=False))}
    assert kinds == {"edge", "local_large"}
    assert "cloud unavailable" in s.choose(_inputs(cloud_ok=False)).reason


def test_cloud_plans_get_slower_as_the_link_gets_slower(models, calibration):
    s = _scheduler(models, calibration)
    fast = {p.describe(): p.est_latency_ms for p in s.candidates(_inputs(rtt_ms=2, mbps=1000))}
    slow = {p.describe(): p.est_latency_ms for p in s.candidates(_inputs(rtt_ms=200, mbps=5))}
    for name, ms in fast.items():
        if name.startswith(("cloud", "split")):
            assert slow[name] > ms + 190, name
        if name.startswith(("edge", "local_large")):
            assert slow[name] == pytest.approx(ms)


def test_with_accuracy_no_object_a_very_slow_link_leaves_the_request_on_the_edge(models, calibration):
    plan = _scheduler(models, calibration, accuracy_slack=1.0).choose(_inputs(rtt_ms=2000, mbps=1))
    assert plan.kind in ("edge", "local_large"), plan


def test_a_static_split_at_a_layer_the_model_cannot_split_is_refused(models, calibration):
    with pytest.raises(ConfigError, match="splits at"):
        _scheduler(models, calibration, policy="static_split", split_layer=99)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rtt=st.floats(0.1, 500), mbps=st.floats(0.5, 2000), queue=st.floats(0, 500), load=st.floats(1, 8),
    deadline=st.floats(1, 10_000), cloud_ok=st.booleans(), slack=st.floats(0, 0.2),
)  # fmt: skip
def test_msao_picks_the_thriftiest_of_the_fastest_plans_within_the_accuracy_slack(
    models, calibration, rtt, mbps, queue, load, deadline, cloud_ok, slack
):
    s = _scheduler(models, calibration, accuracy_slack=slack)
    x = _inputs(rtt, mbps, cloud_ok, queue, load, deadline)
    plans = s.candidates(x)
    plan = s.choose(x)
    floor = max(p.est_accuracy for p in plans) - slack
    assert plan.est_accuracy >= floor - 1e-9
    eligible = [p for p in plans if p.est_accuracy >= floor - 1e-9]
    in_time = [p for p in eligible if p.est_latency_ms <= deadline]
    fastest = min(p.est_latency_ms for p in (in_time or eligible))
    band = [p for p in (in_time or eligible) if p.est_latency_ms <= fastest * (1 + s.options.latency_tolerance) + 1e-9]
    assert plan.est_latency_ms <= fastest * (1 + s.options.latency_tolerance) + 1e-6  # never slower than the band allows
    assert round(plan.est_uplink_bytes) == min(round(p.est_uplink_bytes) for p in band)  # and the thriftiest in it
    assert (plan.est_latency_ms <= deadline) == bool(in_time)
    assert cloud_ok or not plan.uses_cloud


def test_a_calibration_of_other_models_is_ignored_with_a_warning(models, calibration, caplog):
    other = replace(calibration, models=tuple(replace(m, model_hash="0" * 64) for m in calibration.models), pairs=())
    s = _scheduler(models, other)
    assert "does not cover these bundles" in caplog.text
    dv = [p for p in s.candidates(_inputs()) if p.kind == "draft_verify"]
    assert [p.commit_threshold for p in dv] == [ALWAYS_VERIFY] * len(dv)  # nothing calibrated: never commit a draft


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.update(split="test"), "train data"),
        (lambda d: d["models"][0].update(accuracy=[0.5]), "needs"),
        (lambda d: d["pairs"][0]["commit_share"][0].__setitem__(0, 1.5), r"in \[0, 1\]"),
        (lambda d: d.update(format_version=99), "re-run `msao calibrate`"),
    ],
)
def test_a_damaged_calibration_file_is_refused_with_the_fix(calibration, tmp_path, edit, message):
    import json

    d = json.loads(json.dumps(calibration.to_dict()))
    edit(d)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=message):
        load_calibration(path)


def test_calibration_records_its_dataset_and_files_from_before_it_read_as_easy_vqa(calibration, models, tmp_path):
    import json

    from msao.edge_runtime.calibration import calibrate_models, save_calibration

    assert calibration.dataset == "easy-vqa"
    old = json.loads(json.dumps(calibration.to_dict()))
    del old["dataset"]  # a file written before calibrations named their dataset
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert load_calibration(tmp_path / "old.json").dataset == "easy-vqa"
    scenes = calibrate_models(*models, dataset="scenes", questions=3, keep_ratios=(1.0, 0.5))
    assert scenes.dataset == "scenes" and scenes.questions == 3 and scenes.split == "train"
    save_calibration(scenes, tmp_path / "scenes.json")
    assert load_calibration(tmp_path / "scenes.json") == scenes


def test_a_missing_calibration_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="msao calibrate"):
        load_calibration(tmp_path / "none.json")


def test_on_a_thin_link_sequential_verification_saves_most_of_the_uplink(models, calibration):
    s = _scheduler(models, calibration)
    x = _inputs(rtt_ms=100, mbps=5)
    dv = {(p.commit_threshold, p.speculate): p for p in s.candidates(x) if p.kind == "draft_verify" and p.keep_ratio == 1.0}
    for (th, spec), p in dv.items():
        if spec and 0 < th <= 1:
            seq = dv[(th, False)]
            assert seq.est_uplink_bytes <= p.est_uplink_bytes and seq.est_latency_ms >= p.est_latency_ms - 1e-9


def test_a_local_plan_that_runs_slower_than_estimated_is_corrected_until_the_estimate_meets_it(models, calibration):
    from msao.edge_runtime.estimator import Estimator

    edge, large = models
    est = Estimator(SchedulerOptions(), edge.manifest, large.manifest, calibration)
    s = est.scheduler

    def x():  # the estimator's snapshot carries what it learned into the stateless scheduler
        return replace(_inputs(cloud_ok=False), local_residuals=est.snapshot(cloud_ok=False, cloud_queue_depth=0, image_bytes=1200, deadline_ms=5000).local_residuals)

    plan = next(p for p in s.candidates(x()) if p.kind == "local_large" and p.keep_ratio == 0.25)
    other = next(p for p in s.candidates(x()) if p.kind == "local_large" and p.keep_ratio == 1.0)
    truth_ms = 3.0 * plan.est_latency_ms  # this device runs the pruned plan three times slower than its profile says
    for _ in range(60):
        now = next(p for p in s.candidates(x()) if p.kind == "local_large" and p.keep_ratio == 0.25)
        est.observe_local(now, truth_ms)
    corrected = next(p for p in s.candidates(x()) if p.kind == "local_large" and p.keep_ratio == 0.25)
    assert corrected.est_latency_ms == pytest.approx(truth_ms, rel=0.02)
    untouched = next(p for p in s.candidates(x()) if p.kind == "local_large" and p.keep_ratio == 1.0)
    assert untouched.est_latency_ms == pytest.approx(other.est_latency_ms)  # only the plan that was observed moves
    est.observe_local(replace(corrected, kind="cloud"), 1e6)  # remote plans are not local evidence
    assert est.residual("cloud", 0.25) == 1.0
