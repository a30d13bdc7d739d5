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


def test_speculative_plans_decode_ahead_as_far_as_pays_and_skip_the_edge_when_the_budget_is_covered(models, calibration):
    """Auto (-1) takes the faster of a round trip's worth and the whole budget, priced as that count given outright;
    a prompt's verdict that reaches the budget (16 tokens: 15 ahead) charges no edge prefill; a slow link saves round trips."""

    def plan(rtt_ms, ahead=-1, budget=16, load=1.0):
        x = replace(_inputs(rtt_ms=rtt_ms, mbps=20, load=load), token_budget=budget)
        return _scheduler(models, calibration, policy="speculative", decode_ahead=ahead).choose(x)

    for rtt in (0.5, 200):
        auto = plan(rtt)
        assert auto.kind == "speculative" and auto.est_latency_ms == pytest.approx(plan(rtt, auto.decode_ahead).est_latency_ms)
        assert auto.est_latency_ms <= plan(rtt, 15).est_latency_ms + 1e-9
    slow = 50.0  # an edge 50x slower: its prefill outlasts the cloud's whole answer
    assert plan(0.5, 15, load=slow).est_latency_ms < plan(0.5, 14, load=slow).est_latency_ms  # 14 leaves the edge's prefill on the path
    assert plan(0.5, 15, budget=32, load=slow).est_latency_ms > plan(0.5, 15, load=slow).est_latency_ms  # as does a budget not covered
    assert plan(0.5, load=slow).decode_ahead == 15  # so auto has the cloud decode the whole budget
    assert plan(200).est_latency_ms < plan(200, 0).est_latency_ms - 100  # at least one 200 ms round trip fewer than verdicts only
    assert plan(200, 5).decode_ahead == 5 and plan(200, 0).decode_ahead == 0
    with pytest.raises(ConfigError, match="decode_ahead"):
        SchedulerOptions(decode_ahead=-2)


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
        (lambda d: d["pairs"][0]["uploads"][0].update(form="jpeg@10"), "is not one of"),
        (lambda d: d["pairs"][0]["uploads"][0]["image_bytes"].pop(), "image_bytes and build_ms need"),
        (lambda d: d["pairs"][0]["uploads"][0]["accuracy"][0].pop(), "thresholds per row"),
        (lambda d: d["pairs"][0]["uploads"][0].update(keep_ratios=[0.3] * len(d["pairs"][0]["uploads"][0]["keep_ratios"])), "keep ratios of the pair"),
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


def _camera_inputs(image_bytes: int, rtt_ms: float = 60.0, mbps: float = 20.0) -> CostInputs:
    """An lte-like link (60 ms RTT, 20 Mbit/s) and a request carrying a file of ``image_bytes``."""
    return CostInputs(LinkSnapshot(rtt_ms, mbps * 1e6, True), True, 0.0, 1.0, 0.3, image_bytes, 5000.0)


def test_the_calibration_prices_every_upload_form_the_pair_allows(calibration, models):
    edge, large = models
    pair = calibration.pair(edge.manifest.model_hash, large.manifest.model_hash)
    forms = {u.form: u for u in pair.uploads}
    assert set(forms) == {"jpeg@90", "jpeg@70", "jpeg@50", "region@70"}  # no tokens forms: the two encoders differ
    assert forms["region@70"].keep_ratios == (0.5, 0.25) and forms["jpeg@70"].keep_ratios == pair.keep_ratios
    assert forms["jpeg@90"].image_bytes[0] > forms["jpeg@50"].image_bytes[0] > 0  # a lower quality is a smaller file
    for u in pair.uploads:
        assert len(u.accuracy) == len(u.keep_ratios) and all(len(row) == len(pair.thresholds) for row in u.accuracy)
        for b, r in enumerate(u.keep_ratios):
            file = pair.large_accuracy[pair.row(r)]
            assert u.accuracy_se[b] > 0 or u.accuracy_delta[b] == 0  # a paired difference with its standard error
            # charged one standard error below the measured change: a lucky sample does not make a form look free
            assert u.large_accuracy[b] == pytest.approx(min(1.0, max(0.0, file + u.accuracy_delta[b] - u.accuracy_se[b])), abs=2e-5)
            assert u.accuracy[b][-1] == pytest.approx(u.large_accuracy[b], abs=2e-5)  # always verifying: the large model's, with the form
            assert u.accuracy[b][0] == pair.accuracy[pair.row(r)][0]  # always committing: the edge's, whatever the form


def test_a_camera_sized_file_goes_up_re_encoded_and_a_small_file_goes_up_as_it_came(models, calibration):
    """The paper's regime (no large model on the edge, so the cloud is where the accuracy is)."""
    s = _scheduler(models, calibration, accuracy_slack=0.01, allow_local_large=False)
    cloud_only = s.choose(_camera_inputs(150_000), policy="cloud_only")
    assert cloud_only.upload == "file" and cloud_only.est_uplink_bytes > 150_000  # the baseline sends the file as it came
    big = s.choose(_camera_inputs(150_000))
    assert big.uses_cloud and big.upload != "file", big
    assert big.est_uplink_bytes <= 0.3 * cloud_only.est_uplink_bytes and big.est_latency_ms < cloud_only.est_latency_ms
    assert f"upload={big.upload}" in big.describe()
    small = [p for p in s.candidates(_camera_inputs(300)) if p.kind == "cloud" and p.keep_ratio == 1.0]
    thriftiest = min(small, key=lambda p: p.est_uplink_bytes)
    assert thriftiest.upload == "file"  # a 300-byte PNG is smaller than any re-encode of it


def test_an_upload_form_that_costs_more_accuracy_than_the_slack_is_never_taken(models, calibration):
    edge, large = models
    pair = calibration.pair(edge.manifest.model_hash, large.manifest.model_hash)
    worse = tuple(
        replace(u, accuracy_delta=tuple(d - 0.2 for d in u.accuracy_delta), accuracy=tuple(tuple(max(0.0, a - 0.2) for a in row) for row in u.accuracy))
        if u.form == "jpeg@50" else u
        for u in pair.uploads
    )  # fmt: skip
    damaged = replace(calibration, pairs=(replace(pair, uploads=worse),))
    s = _scheduler(models, damaged, accuracy_slack=0.01, allow_local_large=False)
    for mbps in (2.0, 20.0, 200.0):
        x = _camera_inputs(150_000, mbps=mbps)
        assert any(p.upload == "jpeg@50" for p in s.candidates(x))  # priced, the cheapest on the wire ...
        assert s.choose(x).upload != "jpeg@50"  # ... and refused for its accuracy
