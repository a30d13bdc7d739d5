"""The edge runtime with a real cloud: Mosquitto, `msao cloud` worker processes, a shaped link between them.

The runtime runs in this process (so the test can compare with local models); the cloud
worker is a separate process; the edge's link to the broker goes through a shaping proxy.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from msao.cloud_bridge.link import CloudLink, LinkOptions
from msao.cloud_bridge.mqtt_options import ClientOptions
from msao.edge_runtime.requests import EdgeRequest
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions
from msao.edge_runtime.scheduler import SchedulerOptions
from msao.engines.flops import request_flops
from testbed import LinkShape, ShapingProxy, start_broker, start_workers, stop_all, wait_online


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, cloud_bundle_dir: Path):
    root = tmp_path_factory.mktemp("collab")
    broker = start_broker(root / "broker")
    workers = start_workers(broker.url, cloud_bundle_dir, root, count=1)
    proxy = ShapingProxy("127.0.0.1", broker.port).start()
    yield broker, workers, proxy, root
    stop_all(workers)
    proxy.stop()
    broker.stop()


@pytest.fixture(scope="module")
def link(cloud):
    broker, workers, proxy, _ = cloud
    edge_id = "edge-" + uuid.uuid4().hex[:8]
    lk = CloudLink(LinkOptions(edge_id, ClientOptions(f"mqtt://127.0.0.1:{proxy.port}", f"msao-{edge_id}", keepalive_s=5))).start()
    wait_online(lk, workers)
    yield lk
    lk.close()


@pytest.fixture(scope="module")
def runtime(models, link, calibration):
    rt = EdgeRuntime(*models, link, calibration, RuntimeOptions(workers=2, probe_interval_s=0)).start()
    yield rt
    rt.stop()


def _request(data, i: int, **kw) -> EdgeRequest:
    return EdgeRequest(f"t{uuid.uuid4().hex[:10]}", data.questions[i], data.image_pngs[data.image_ids[i]], **kw)


def test_cloud_only_answers_in_the_cloud_exactly_as_the_large_model_does_here(runtime, models, easyvqa_test):
    _, large = models
    for i in range(6):
        r = runtime.answer(_request(easyvqa_test, i, policy="cloud_only", deadline_ms=10_000))
        assert r.status == "ok" and r.answered_by == "cloud" and not r.fallback, r
        assert r.plan == "cloud keep=1" and r.model == large.name
        here = large.answer(
            large.prepare(
                large.decode(easyvqa_test.image_pngs[easyvqa_test.image_ids[i]], 10**6)[0], easyvqa_test.questions[i], analyse=False
            ),
            easyvqa_test.questions[i],
        )
        assert r.answer == here.text
        assert r.bytes_up >= len(easyvqa_test.image_pngs[easyvqa_test.image_ids[i]]) and r.bytes_down > 0
        assert r.timings_ms["cloud"] > 0
        total = request_flops(large.manifest, image_tokens=64, text_tokens=here.text_tokens, new_tokens=len(here.token_ids))
        assert (r.flops_edge, r.flops_cloud) == (0, total)  # cloud_only: the raw image goes up, nothing runs here


@pytest.mark.parametrize("k", [1, 2, 3])
def test_static_split_ships_layer_k_hidden_states_and_agrees_with_the_large_model(runtime, models, easyvqa_test, k):
    _, large = models
    agree = 0
    for i in range(5):
        r = runtime.answer(_request(easyvqa_test, i, policy="static_split", split_layer=k, deadline_ms=10_000))
        assert r.status == "ok" and r.answered_by == "cloud" and r.plan == f"split@{k} keep=1", r
        rgb = large.decode(easyvqa_test.image_pngs[easyvqa_test.image_ids[i]], 10**6)[0]
        agree += r.answer == large.answer(large.prepare(rgb, easyvqa_test.questions[i], analyse=False), easyvqa_test.questions[i]).text
        d, tokens = large.manifest.model.hidden_size, large.n_tokens
        assert r.bytes_up >= tokens * d * 2  # fp16 hidden states of every prompt token crossed the link
        whole = large.answer(large.prepare(rgb, easyvqa_test.questions[i], analyse=False), easyvqa_test.questions[i])
        total = request_flops(
            large.manifest, image_tokens=64, text_tokens=whole.text_tokens, new_tokens=len(whole.token_ids), include_vision=not r.image_cached
        )  # easy-VQA asks several questions per image: a repeated image's tokens come from the image cache
        assert r.flops_edge + r.flops_cloud == total and r.flops_edge > 0 and r.flops_cloud > 0  # the split shares the work
    assert agree == 5  # fp16 transport of hidden states does not change these answers


def test_draft_verify_static_starts_the_cloud_speculatively_and_commits_its_answer(runtime, easyvqa_test):
    r = runtime.answer(_request(easyvqa_test, 0, policy="draft_verify_static", deadline_ms=10_000))
    assert r.status == "ok" and r.answered_by == "cloud" and "verify=always speculative" in r.plan
    assert "cloud committed" in r.reason and r.timings_ms["local"] > 0  # the edge drafted meanwhile


def test_msao_with_a_calibration_reports_its_plan_and_reason(runtime, easyvqa_test):
    r = runtime.answer(_request(easyvqa_test, 1, deadline_ms=10_000))
    assert r.status == "ok" and r.plan and "among" in r.reason and "accuracy" in r.reason
    assert r.mas.get("kept_tokens", 64) <= 64


def test_real_transfers_teach_the_link_estimate(runtime):
    snap = runtime.estimator.link.snapshot()
    assert snap.measured and snap.rtt_ms < 50  # loopback through an unshaped proxy


def test_a_worker_killed_mid_request_is_answered_on_the_edge_within_the_deadline(
    models, calibration, tmp_path, cloud_bundle_dir, easyvqa_test
):
    broker = start_broker(tmp_path / "broker")  # its only worker is the one this test kills
    (worker,) = start_workers(broker.url, cloud_bundle_dir, tmp_path, count=1)
    edge_id = "edge-" + uuid.uuid4().hex[:8]
    slow = ShapingProxy("127.0.0.1", broker.port, LinkShape(delay_ms=0)).start()
    lk = CloudLink(LinkOptions(edge_id, ClientOptions(f"mqtt://127.0.0.1:{slow.port}", f"msao-{edge_id}", keepalive_s=5))).start()
    rt = EdgeRuntime(*models, lk, calibration, RuntimeOptions(workers=1, probe_interval_s=0, profile_at_start=False))
    try:
        wait_online(lk, [worker])
        rt.start()
        slow.set_shape(LinkShape(delay_ms=300))  # the job needs 300 ms to reach the broker: time to kill the worker
        results = []
        rt.submit(_request(easyvqa_test, 2, policy="cloud_only", deadline_ms=4000), results.append)
        time.sleep(0.1)
        worker.kill()
        t0 = time.monotonic()
        while not results and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        (r,) = results
        assert r.status == "ok" and r.answered_by == "edge" and r.fallback, r
        assert r.timings_ms["total"] < 4000
    finally:
        rt.stop()
        lk.close()
        slow.stop()
        worker.stop()
        broker.stop()


def test_with_no_worker_on_the_broker_a_cloud_plan_falls_back_within_the_deadline(models, calibration, tmp_path, easyvqa_test):
    empty = start_broker(tmp_path / "empty")
    edge_id = "edge-" + uuid.uuid4().hex[:8]
    lk = CloudLink(LinkOptions(edge_id, ClientOptions(empty.url, f"msao-{edge_id}"))).start()
    rt = EdgeRuntime(*models, lk, calibration, RuntimeOptions(workers=1, probe_interval_s=0, profile_at_start=False)).start()
    try:
        assert rt.health()["mode"] == "edge-only" and rt.ready
        r = rt.answer(_request(easyvqa_test, 3, policy="cloud_only", deadline_ms=1500))
        assert r.status == "ok" and r.answered_by == "edge" and "CloudUnavailable" in r.fallback, r
        assert r.timings_ms["total"] < 1500
        r = rt.answer(_request(easyvqa_test, 4, deadline_ms=1500))  # msao: no cloud, so no cloud plan at all
        assert r.status == "ok" and not r.fallback and "cloud unavailable" in r.reason
    finally:
        rt.stop()
        lk.close()
        empty.stop()


def test_a_slow_link_is_measured_and_with_accuracy_no_object_work_stays_local(models, calibration, cloud, easyvqa_test):
    """Slack 1 makes every plan eligible, so latency alone decides; a measured 400 ms RTT keeps every request local."""
    broker, workers, _, _ = cloud
    edge_id = "edge-" + uuid.uuid4().hex[:8]
    proxy = ShapingProxy("127.0.0.1", broker.port, LinkShape(delay_ms=200)).start()
    lk = CloudLink(LinkOptions(edge_id, ClientOptions(f"mqtt://127.0.0.1:{proxy.port}", f"msao-{edge_id}", keepalive_s=5))).start()
    options = RuntimeOptions(workers=1, probe_interval_s=0, scheduler=SchedulerOptions(accuracy_slack=1.0))
    rt = EdgeRuntime(*models, lk, calibration, options).start()
    try:
        wait_online(lk, workers)
        lk.probe(models[1].manifest.model_hash, 1024, deadline_s=5)  # the estimate learns the 400 ms RTT
        assert rt.estimator.link.snapshot().rtt_ms > 300
        for i in range(3):
            r = rt.answer(_request(easyvqa_test, i, deadline_ms=10_000))
            assert r.status == "ok" and r.plan.split(" ")[0] in ("edge", "local_large") and r.bytes_up == 0, r
            assert "rtt" in r.reason
    finally:
        rt.stop()
        lk.close()
        proxy.stop()


def test_a_speculative_job_lost_to_a_committed_draft_is_cancelled_and_its_bytes_still_counted(runtime, models, easyvqa_test):
    import time as _time

    from msao.edge_runtime.scheduler import Plan

    edge, _ = models
    req = _request(easyvqa_test, 0, deadline_ms=10_000)
    rgb, decode_ms = edge.decode(req.image, 10**6)
    plan = Plan("draft_verify", 1.0, commit_threshold=0.0, speculate=True)  # threshold 0: every draft is committed
    out = runtime.executor.run(plan, req, rgb, decode_ms, _time.monotonic() + 10)
    assert out.answered_by == "edge" and ("cancelled" in out.speculation or "unused" in out.speculation)
    assert out.bytes_up >= len(req.image)  # the image went up before the draft won: that cost is reported


def test_an_edge_holding_only_the_small_model_answers_through_the_cloud_and_opens_no_large_segment(
    cloud_bundle_dir, models, calibration, link, easyvqa_test
):
    """The paper's regime (edge.large_on_edge = false): no local-large or split plan, the large bundle read for its manifest only."""
    from msao.edge_runtime.local_model import LocalModel
    from msao.engines.bundle import load_bundle
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    edge, large_here = models
    remote = LocalModel(load_bundle(cloud_bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)), resident=False)
    rt = EdgeRuntime(edge, remote, link, calibration, RuntimeOptions(workers=1, probe_interval_s=0)).start()
    try:
        for i in range(4):
            r = rt.answer(_request(easyvqa_test, i, deadline_ms=10_000))
            assert r.status == "ok" and not r.fallback, r
            assert r.plan.split()[0] in ("edge", "cloud", "draft_verify", "speculative"), r.plan
        r = rt.answer(_request(easyvqa_test, 5, policy="cloud_only", deadline_ms=10_000))
        here = large_here.answer(
            large_here.prepare(large_here.decode(easyvqa_test.image_pngs[easyvqa_test.image_ids[5]], 10**6)[0], easyvqa_test.questions[5],
                               analyse=False),
            easyvqa_test.questions[5],
        )  # fmt: skip
        assert r.answered_by == "cloud" and r.answer == here.text and r.prompt_tokens == here.prompt_tokens
        refused = rt.answer(_request(easyvqa_test, 6, policy="static_split", split_layer=1, deadline_ms=10_000))
        assert refused.status == "error" and "large_on_edge" in refused.error, refused
        assert remote.runners == {}  # none of the large model's segments was opened on this edge
        with pytest.raises(Exception, match="large_on_edge = false"):
            remote.generator()
    finally:
        rt.stop()
        remote.close()


def test_a_camera_frame_goes_up_re_encoded_at_the_cloud_models_size_and_is_answered_as_calibrated(runtime, models, easyvqa_test):
    """A 1280x960 camera JPEG: a jpeg or region form sends a small fraction of it, and the cloud answers as `msao calibrate` measured."""
    import time as _time

    from msao.edge_runtime.calibration import _upload_answer
    from msao.edge_runtime.scheduler import Plan
    from tests.edge_runtime.test_uploads import _camera_jpeg

    edge, large = models
    for i in (2, 9):
        camera = _camera_jpeg(easyvqa_test.images[easyvqa_test.image_ids[i]])
        req = EdgeRequest(f"t{uuid.uuid4().hex[:10]}", easyvqa_test.questions[i], camera, deadline_ms=10_000)
        rgb, decode_ms = edge.decode(camera, 10**7)
        file = runtime.executor.run(Plan("cloud", 1.0, send_keep=False), req, rgb, decode_ms, _time.monotonic() + 10)
        assert file.bytes_up > len(camera)
        for plan in (Plan("cloud", 1.0, send_keep=False, upload="jpeg@70"), Plan("cloud", 0.25, upload="region@70")):
            out = runtime.executor.run(plan, req, rgb, decode_ms, _time.monotonic() + 10)
            assert out.answered_by == "cloud" and not out.fallback, out
            assert out.bytes_up < file.bytes_up / 10, (plan.upload, out.bytes_up, file.bytes_up)
            keep = edge.prepare(rgb, req.question, plan.keep_ratio, analyse=False).keep if plan.send_keep else None
            claimed, _, _ = _upload_answer(plan.upload, large, rgb, req.question, keep, large.prepare(rgb, req.question, analyse=False))
            assert out.answer == claimed
    sent = runtime.answer(_request(easyvqa_test, 3, policy="cloud_only", deadline_ms=10_000))
    assert sent.upload == "file" and sent.bytes_up > 0  # the response names what went up ...
    local = runtime.answer(_request(easyvqa_test, 3, policy="edge_only", deadline_ms=10_000))
    assert local.upload == "" and local.bytes_up == 0  # ... and nothing when nothing did
