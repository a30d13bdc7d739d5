"""The edge runtime in this process, without a cloud: admission, streams, errors, and the Python API."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from msao.edge_runtime.app import EdgeApp
from msao.edge_runtime.config import load_edge_config
from msao.edge_runtime.requests import EdgeRequest
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions
from msao.edge_runtime.scheduler import SchedulerOptions
from msao.errors import RequestError


def _req(data, i: int, **kw) -> EdgeRequest:
    return EdgeRequest("r" + uuid.uuid4().hex[:12], data.questions[i], data.image_pngs[data.image_ids[i]], **kw)


@pytest.fixture(scope="module")
def runtime(models, calibration):
    rt = EdgeRuntime(*models, None, calibration, RuntimeOptions(workers=1, probe_interval_s=0, mas_always=True)).start()
    yield rt
    rt.stop()


def test_a_repeated_stream_frame_skips_the_encoder_and_gives_the_same_answer(runtime, easyvqa_test):
    first = runtime.answer(_req(easyvqa_test, 0, stream_id="cam-1", policy="edge_only"))
    second = runtime.answer(_req(easyvqa_test, 0, stream_id="cam-1", policy="edge_only"))
    assert first.status == second.status == "ok" and first.answer == second.answer
    assert "encoder_skipped" not in first.mas and second.mas["encoder_skipped"] == 1.0
    j = next(i for i in range(100) if easyvqa_test.image_ids[i] != easyvqa_test.image_ids[0])
    other = runtime.answer(_req(easyvqa_test, j, stream_id="cam-1", policy="edge_only"))  # a new scene: encoded again
    assert "encoder_skipped" not in other.mas


def test_a_stream_whose_camera_changes_resolution_starts_again(runtime, easyvqa_test):
    import io

    from PIL import Image

    png = easyvqa_test.image_pngs[easyvqa_test.image_ids[0]]
    bigger = io.BytesIO()
    Image.open(io.BytesIO(png)).resize((96, 96)).save(bigger, format="PNG")
    a = runtime.answer(EdgeRequest("res-1", easyvqa_test.questions[0], png, stream_id="cam-2", policy="edge_only"))
    b = runtime.answer(EdgeRequest("res-2", easyvqa_test.questions[0], bigger.getvalue(), stream_id="cam-2", policy="edge_only"))
    assert a.status == b.status == "ok" and "encoder_skipped" not in b.mas


def test_mas_values_are_in_the_response_and_in_range(runtime, easyvqa_test):
    r = runtime.answer(_req(easyvqa_test, 1, policy="prune_only", keep_ratio=0.25))
    assert r.status == "ok" and r.plan == "edge keep=0.25"
    assert r.mas["kept_tokens"] == 16 and r.mas["image_tokens"] == 64
    assert 0 <= r.mas["image"] <= 1 and 0 <= r.mas["text"] <= 1 and r.timings_ms["mas"] > 0


def test_an_undecodable_image_gets_bad_image_and_the_next_request_is_served(runtime, easyvqa_test):
    bad = runtime.answer(EdgeRequest("bad-img", "what color is the shape?", b"\x89PNG\r\n\x1a\n truncated"))
    assert bad.status == "error" and bad.error_code == "bad_image"
    assert runtime.answer(_req(easyvqa_test, 2)).status == "ok"


def test_a_request_whose_deadline_passes_in_the_queue_gets_a_deadline_error(models, easyvqa_test):
    rt = EdgeRuntime(*models, options=RuntimeOptions(workers=1, queue_size=8, probe_interval_s=0, profile_at_start=False)).start()
    try:
        done: list = []
        for i in range(6):
            rt.submit(_req(easyvqa_test, i, deadline_ms=1.0 if i == 5 else 5000.0, policy="edge_only"), done.append)
        end = time.monotonic() + 30
        while len(done) < 6 and time.monotonic() < end:
            time.sleep(0.01)
        assert len(done) == 6
        last = [r for r in done if r.error_code == "deadline"]
        assert last and "deadline" in last[0].error
    finally:
        rt.stop()


def test_a_full_queue_refuses_at_once_and_everything_accepted_is_answered(models, easyvqa_test):
    rt = EdgeRuntime(*models, options=RuntimeOptions(workers=1, queue_size=2, probe_interval_s=0, profile_at_start=False)).start()
    accepted, refused, answers = [], [], []
    lock = threading.Lock()
    try:
        for i in range(20):
            req = _req(easyvqa_test, i, policy="edge_only")
            t0 = time.perf_counter()
            try:
                rt.submit(req, lambda r: (lock.acquire(), answers.append(r), lock.release()))
                accepted.append(req.request_id)
            except RequestError as exc:
                assert exc.code == "busy" and time.perf_counter() - t0 < 0.05  # refused at once, not after a wait
                refused.append(req.request_id)
        end = time.monotonic() + 30
        while len(answers) < len(accepted) and time.monotonic() < end:
            time.sleep(0.01)
        assert refused and sorted(r.request_id for r in answers) == sorted(accepted)  # each accepted one answered once
    finally:
        rt.stop()


def test_stop_hands_back_what_it_could_not_serve_with_none(models, easyvqa_test):
    rt = EdgeRuntime(
        *models, options=RuntimeOptions(workers=1, queue_size=50, probe_interval_s=0, drain_s=0, profile_at_start=False)
    ).start()
    results: list = []
    for i in range(30):
        rt.submit(_req(easyvqa_test, i, policy="edge_only"), results.append)
    rt.stop()
    assert len(results) == 30 and None in results  # nothing lost: unserved ones come back as None (MQTT redelivers them)
    with pytest.raises(RequestError, match="shutting down"):
        rt.submit(_req(easyvqa_test, 0), results.append)


def test_the_python_api_answers_with_the_built_in_bundles(edge_bundle_dir, cloud_bundle_dir, easyvqa_test):
    flags = {"edge.bundle": str(edge_bundle_dir), "edge.large_bundle": str(cloud_bundle_dir), "edge.calibration": "", "runtime.workers": 1}
    with EdgeApp(load_edge_config(None, env={}, flags=flags)) as app:
        colour = next(i for i in range(100) if easyvqa_test.questions[i] == "what color is the shape?")
        r = app.ask(easyvqa_test.image_pngs[easyvqa_test.image_ids[colour]], easyvqa_test.questions[colour])
        assert r.status == "ok" and r.answer == easyvqa_test.answers[colour]
        assert r.plan and r.answered_by == "edge" and "cloud unavailable" in r.reason  # no broker configured
        assert app.runtime.health()["mode"] == "edge-only"


def test_every_policy_is_served_without_a_cloud_by_falling_back(models, easyvqa_test):
    rt = EdgeRuntime(*models, options=RuntimeOptions(workers=1, probe_interval_s=0, profile_at_start=False,
                                                     scheduler=SchedulerOptions(split_layer=1))).start()  # fmt: skip
    try:
        for policy in ("msao", "edge_only", "cloud_only", "static_split", "prune_only", "draft_verify_static"):
            r = rt.answer(_req(easyvqa_test, 3, policy=policy, deadline_ms=3000))
            assert r.status == "ok" and r.answered_by == "edge", (policy, r)
            assert bool(r.fallback) == (policy in ("cloud_only", "static_split", "draft_verify_static")), (policy, r.fallback)
    finally:
        rt.stop()


def test_keep_sets_follow_the_keep_ratio(runtime, easyvqa_test):
    sizes = [runtime.answer(_req(easyvqa_test, 4, policy="prune_only", keep_ratio=r)).mas["kept_tokens"] for r in (1.0, 0.5, 0.125)]
    assert sizes == [64, 32, 8]
    assert np.all(np.diff(sizes) < 0)


def _retagged(png: bytes, tag: str) -> bytes:
    """The same pixels in other file bytes (a text chunk added): a new key for the image cache."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("msao-test", tag)
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).save(out, format="PNG", pnginfo=info)
    assert out.getvalue() != png
    return out.getvalue()


def test_a_follow_up_about_the_same_image_takes_its_tokens_from_the_image_cache(runtime, easyvqa_test):
    from msao.engines.flops import request_flops

    data = easyvqa_test
    rows = [i for i in range(len(data.questions)) if data.image_ids[i] == data.image_ids[7]][:2]
    assert len(rows) == 2, "easy-VQA asks several questions about each image"
    image = _retagged(data.image_pngs[data.image_ids[7]], "first")
    first = runtime.answer(EdgeRequest("cache-1", data.questions[rows[0]], image, policy="edge_only"))
    again = runtime.answer(EdgeRequest("cache-2", data.questions[rows[1]], image, policy="edge_only"))
    assert first.status == again.status == "ok"
    assert not first.image_cached and again.image_cached and again.mas["encoder_skipped"] == 1.0
    # the cached tokens are the encoder's own: the answer is what a fresh encoding gives
    fresh = runtime.answer(EdgeRequest("cache-3", data.questions[rows[1]], _retagged(data.image_pngs[data.image_ids[7]], "fresh"), policy="edge_only"))
    assert not fresh.image_cached and fresh.answer == again.answer and fresh.confidence == again.confidence
    vision = request_flops(runtime.edge.manifest, image_tokens=0, text_tokens=0, new_tokens=0, layers=(0, 0), include_head=False)
    assert vision > 0 and fresh.flops_edge - again.flops_edge == vision


def test_a_text_only_turn_runs_no_vision_and_counts_only_text_tokens(runtime):
    r = runtime.answer(EdgeRequest("text-1", "what color is the shape?", b"", policy="edge_only"))
    assert r.status == "ok" and r.answer and not r.image_cached
    assert r.mas["image_tokens"] == 0 and r.mas["kept_tokens"] == 0 and "image" not in r.mas
    assert r.timings_ms["vision"] == 0 and r.timings_ms["decode_image"] == 0
    prefix, suffix = runtime.edge.generator().prompt_ids("what color is the shape?")
    assert r.prompt_tokens == len(prefix) + len(suffix)


def test_the_token_budget_cuts_the_answer_with_finish_reason_length(runtime, easyvqa_test):
    whole = runtime.answer(_req(easyvqa_test, 3, policy="edge_only"))
    cut = runtime.answer(_req(easyvqa_test, 3, policy="edge_only", max_new_tokens=1))
    assert whole.finish_reason == "stop" and whole.completion_tokens == len(whole.answer.split()) >= 1
    assert cut.finish_reason == "length" and cut.completion_tokens == 1 and cut.answer == whole.answer.split()[0]
    with pytest.raises(RequestError, match="max_new_tokens"):
        _req(easyvqa_test, 3, max_new_tokens=0)
