"""One real `msao cloud` worker process: split jobs equal local segments, cloud KV reuse, answers, busy, idempotency, status."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from msao.cloud_bridge.link import new_job_id
from msao.cloud_bridge.messages import JobHeader, WorkerStatus
from msao.cloud_bridge.remote_runner import RemoteOptions, RemoteRunner
from msao.engines.bundle import load_bundle
from msao.engines.generation import DecoderStack, Generator
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import CloudBusy, CloudJobFailed, FeedError
from testbed import free_port, open_link, poll_until, start_workers, stop_all, wait_online
from tests.cloud_bridge.split_reference import prompt_hidden, split_generate
from tests.test_prometheus import scraped

ATOL = 1e-5  # same ONNX files, same inputs, same ONNX Runtime: differences are float re-association only
QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def gen(cloud_bundle_dir):
    g = Generator(load_bundle(cloud_bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    yield g
    g.close()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def worker(broker, cloud_bundle_dir, tmp_path_factory, metrics_port):
    extra = ("--queue-size", "2", "--workers", "1", "--metrics", f"127.0.0.1:{metrics_port}")
    procs = start_workers(broker.url, cloud_bundle_dir, tmp_path_factory.mktemp("logs"), extra=extra)
    yield procs[0]
    stop_all(procs)


@pytest.fixture(scope="module")
def link(broker, worker):
    lk = open_link(broker.url)
    wait_online(lk, [worker])
    yield lk
    lk.close()


def _local_logits(gen, hidden, positions, mask, end_stack):
    h = end_stack.run(hidden, positions, mask)
    return gen.runners["lm_head"].infer({"hidden_states": h[:, -1:]})["logits"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_split_prefill_returns_logits_equal_to_local_segments(gen, link, easyvqa_test, k):
    hidden, positions, _ = prompt_hidden(gen, easyvqa_test.image_pngs[0], QUESTION)
    mask = np.ones((1, hidden.shape[1]), np.int64)
    edge = gen.stack(k)
    edge.reset()
    h_k = edge.run(hidden, positions, mask)
    full = gen.stack(gen.info.num_layers)
    full.reset()
    want = _local_logits(gen, hidden, positions, mask, full)
    remote = RemoteRunner(link, gen.bundle.manifest, k, options=RemoteOptions(transport_dtype="float32"))
    got = remote.infer({"hidden_states": h_k, "position_ids": positions, "attention_mask": mask})["logits"]
    assert got.shape == want.shape == (1, 1, gen.info.vocab_size)
    err = np.abs(got - want)
    assert err.max() <= ATOL, f"max {err.max():.2e} mean {err.mean():.2e}"
    s = remote.last_stats
    assert s.outcome == "ok" and s.attempts == 1 and s.bytes_up > h_k.nbytes * 0.5 and s.rtt_ms >= s.compute_ms > 0


def test_fp16_transport_halves_bytes_and_stays_close(gen, link, easyvqa_test):
    hidden, positions, _ = prompt_hidden(gen, easyvqa_test.image_pngs[1], QUESTION)
    mask = np.ones((1, hidden.shape[1]), np.int64)
    edge = gen.stack(2)
    edge.reset()
    h2 = edge.run(hidden, positions, mask)
    feeds = {"hidden_states": h2, "position_ids": positions, "attention_mask": mask}
    r32 = RemoteRunner(link, gen.bundle.manifest, 2, options=RemoteOptions(transport_dtype="float32", keep_session=False))
    r16 = RemoteRunner(link, gen.bundle.manifest, 2, options=RemoteOptions(transport_dtype="float16", keep_session=False))
    l32, l16 = r32.infer(feeds)["logits"], r16.infer(feeds)["logits"]
    assert r16.last_stats.body_bytes_up < 0.6 * r32.last_stats.body_bytes_up
    assert np.abs(l16 - l32).max() < 0.05 and l16.argmax() == l32.argmax()
    # and exactly what the local segments give for the same fp16-rounded input
    tail = DecoderStack([gen.runners["decoder[2:3]"], gen.runners["decoder[3:4]"]], gen.info.num_kv_heads, gen.info.head_dim)
    tail.reset()
    want = _local_logits(gen, h2.astype(np.float16).astype(np.float32), positions, mask, tail)
    assert np.abs(l16 - want).max() <= ATOL


def test_decode_steps_reuse_the_cloud_kv_and_match_local_segments(gen, link, easyvqa_test):
    k, steps = 2, 5
    hidden, positions, next_pos = prompt_hidden(gen, easyvqa_test.image_pngs[2], QUESTION)
    mask = np.ones((1, hidden.shape[1]), np.int64)
    edge, full = gen.stack(k), gen.stack(gen.info.num_layers)
    edge.reset()
    full.reset()
    remote = RemoteRunner(link, gen.bundle.manifest, k, options=RemoteOptions(transport_dtype="float32"))
    got = remote.infer({"hidden_states": edge.run(hidden, positions, mask), "position_ids": positions, "attention_mask": mask})["logits"]
    want = _local_logits(gen, hidden, positions, mask, full)
    assert np.abs(got - want).max() <= ATOL
    prefill_bytes = remote.last_stats.bytes_up
    for step, tok in enumerate([26, 5, 17, 3, 9][:steps]):  # teacher-forced tokens: any ids exercise the KV path
        e = gen.runners["text_embed"].infer({"input_ids": np.asarray([[tok]], np.int64)})["embeddings"]
        pos = np.asarray([[next_pos + step]], np.int64)
        mask = np.ones((1, full.past_length + 1), np.int64)
        got = remote.infer({"hidden_states": edge.run(e, pos, mask), "position_ids": pos, "attention_mask": mask})["logits"]
        want = _local_logits(gen, e, pos, mask, full)
        assert np.abs(got - want).max() <= ATOL, f"step {step}: max {np.abs(got - want).max():.2e}"
        assert remote.past_length == full.past_length  # the worker's KV grew by one token per step
        assert remote.last_stats.bytes_up < 2048 < prefill_bytes  # one hidden vector crosses, never the KV
        assert remote.last_stats.worker_id == remote.worker_id
    assert _status(link, remote.worker_id, lambda s: s.sessions >= 1)


def test_split_generation_gives_the_local_answer(gen, link, easyvqa_test):
    png = easyvqa_test.image_pngs[3]
    remote = RemoteRunner(link, gen.bundle.manifest, 1)  # fp16 transport, the default
    ids, probs, stats = split_generate(gen, remote, 1, png, QUESTION)
    local = gen.answer(png, QUESTION)
    assert tuple(ids) == local.token_ids
    assert np.allclose(probs, local.token_probs, atol=0.02)
    assert len(stats) == len(ids) and all(s.outcome == "ok" for s in stats)


def test_decode_step_out_of_sequence_is_refused_locally(gen, link):
    remote = RemoteRunner(link, gen.bundle.manifest, 2)
    h = np.zeros((1, 1, gen.info.hidden_size), np.float32)
    with pytest.raises(FeedError, match="call reset"):
        remote.infer({"hidden_states": h, "position_ids": np.zeros((1, 1), np.int64), "attention_mask": np.ones((1, 5), np.int64)})


def test_answer_job_equals_the_local_answer_for_image_bytes_and_pruned_tokens(gen, link, easyvqa_test):
    png = easyvqa_test.image_pngs[4]
    for q in ("what shape is in the image?", "is there a blue shape?"):
        got = link.answer(gen.bundle.manifest.model_hash, q, image=png)
        want = gen.answer(png, q)
        assert (got.text, got.token_ids) == (want.text, want.token_ids)
        assert abs(got.confidence - want.confidence) < 1e-4 and got.stats.compute_ms > 0
    keep = np.arange(0, gen.info.image_tokens, 2)
    enc = gen.encode_image(gen.pixels_from_bytes(png))
    got = link.answer(gen.bundle.manifest.model_hash, QUESTION, image_tokens=enc.tokens[keep], keep=keep)
    want = gen.generate(enc, QUESTION, keep=keep)
    assert (got.text, got.token_ids) == (want.text, want.token_ids)
    assert got.stats.bytes_up < enc.tokens.nbytes  # only the kept half crossed


@pytest.mark.parametrize("form", ["jpeg@90", "jpeg@70", "jpeg@50", "region@70", "tokens@fp16", "tokens@int8"])
def test_each_upload_form_is_answered_by_the_worker_as_its_calibration_measured_it(models, link, easyvqa_test, form):
    """The worker's answer from a form is the one `msao calibrate` tabulated for that form (tokens: the cloud's own, as with a shared encoder)."""
    from msao.edge_runtime.calibration import _upload_answer
    from msao.edge_runtime.uploads import upload_tensors

    edge, large = models
    m = large.manifest
    for i in (1, 7, 12):
        rgb, q = easyvqa_test.images[easyvqa_test.image_ids[i]], easyvqa_test.questions[i]
        keep = edge.prepare(rgb, q, 0.25, analyse=False).keep if form.startswith(("region", "tokens")) else None
        full = large.prepare(rgb, q, 1.0, analyse=False)
        prompt = upload_tensors(
            form, image_file=easyvqa_test.image_pngs[easyvqa_test.image_ids[i]], rgb=rgb, keep=keep, preprocess=m.preprocess,
            n_tokens=m.model.image_tokens, tokens=full.encoding.tokens,
        )  # fmt: skip
        got = link.answer(m.model_hash, q, prompt=prompt)
        claimed, nbytes, _ = _upload_answer(form, large, rgb, q, keep, full)
        assert got.text == claimed, (i, got.text, claimed)
        assert got.stats.bytes_up >= nbytes  # what calibration counted is what crossed (plus header and keep-set)


def test_resent_job_gets_the_stored_result_and_does_not_run_twice(gen, link):
    """paho may re-send a job after a reconnect: a decode step must not grow the KV twice."""
    d = gen.info.hidden_size
    header = JobHeader(new_job_id(), gen.bundle.manifest.model_hash, "split", time.time() + 10, segment="decoder[3:4]", session_id=new_job_id())
    feeds = {
        "hidden_states": np.ones((1, 3, d), np.float32),
        "position_ids": np.arange(3)[None],
        "attention_mask": np.ones((1, 3), np.int64),
    }
    first = link.submit(header, feeds)
    again = link.submit(header, feeds)
    assert again.header == first.header and np.array_equal(again.tensors["logits"], first.tensors["logits"])
    step = JobHeader(
        new_job_id(), header.model_hash, "split", time.time() + 10, segment="decoder[3:4]", session_id=header.session_id, past_length=3
    )
    feeds = {"hidden_states": np.ones((1, 1, d), np.float32), "position_ids": np.array([[3]]), "attention_mask": np.ones((1, 4), np.int64)}
    assert link.submit(step, feeds, worker_id=first.header.worker_id).header.past_length == 4  # KV grew once, not twice


def test_full_queue_answers_busy_at_once_so_the_edge_can_fall_back(gen, link):
    """Worker: 1 thread, queue 2. Eight 0.2-s jobs at once: some run, the rest get `busy` fast."""
    d = gen.info.hidden_size
    b, t = 8, 200
    feeds = {
        "hidden_states": np.ones((b, t, d), np.float16),
        "position_ids": np.tile(np.arange(t), (b, 1)),
        "attention_mask": np.ones((b, t), np.int64),
    }

    def one(_):
        header = JobHeader(new_job_id(), gen.bundle.manifest.model_hash, "split", time.time() + 20, segment="decoder[0:4]")
        t0 = time.perf_counter()
        try:
            link.submit(header, feeds)
            return "ok", time.perf_counter() - t0
        except CloudBusy:
            return "busy", time.perf_counter() - t0

    barrier = threading.Barrier(8)

    def synced(i):
        barrier.wait()
        return one(i)

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(synced, range(8)))
    kinds = [o for o, _ in outcomes]
    assert kinds.count("ok") >= 1 and kinds.count("busy") >= 1, outcomes
    fastest_busy = min(dt for o, dt in outcomes if o == "busy")
    slowest_ok = max(dt for o, dt in outcomes if o == "ok")
    assert fastest_busy < slowest_ok  # busy is answered without waiting for the queue
    assert any(s.outcome == "busy" and s.attempts == 2 for s in link.transfers.recent())  # re-dispatched once, then gave up
    assert _status(link, link.workers()[0].worker_id, lambda s: s.busy_total >= kinds.count("busy"))


def test_unknown_model_hash_gets_an_error_result(gen, link):
    h = JobHeader(new_job_id(), "0" * 64, "answer", time.time() + 5, question="what?")
    with pytest.raises(CloudJobFailed, match=r"unknown_model.*has no model 000000000000") as exc:
        link.submit(h, {"image": np.zeros(3, np.uint8)}, worker_id=link.workers()[0].worker_id)
    assert exc.value.code == "unknown_model"


def test_retained_status_lists_models_providers_queue_and_counters(gen, link, broker):
    late = open_link(broker.url)  # a newcomer learns the fleet from retained messages alone
    try:
        end = time.monotonic() + 5
        while not late.workers() and time.monotonic() < end:
            time.sleep(0.02)
        (status,) = late.workers()
    finally:
        late.close()
    assert status.state == "online" and status.queue_capacity == 2 and status.threads == 1 and status.jobs_total > 0
    (model,) = status.models
    assert model.model_hash == gen.bundle.manifest.model_hash and model.split_points == (1, 2, 3)
    assert model.providers == ("CPUExecutionProvider",)
    json.dumps(status.to_dict())


def _status(link, worker_id: str, holds: Callable[[WorkerStatus], bool], timeout_s: float = 10.0) -> WorkerStatus | None:
    """The worker's status once ``holds`` is true of it (statuses are rate-limited to one per 0.2 s), else None."""
    latest = lambda: next(w for w in link.workers() if w.worker_id == worker_id)  # noqa: E731
    return latest() if poll_until(lambda: holds(latest()), timeout_s) else None


def test_probe_measures_the_link_without_compute(gen, link):
    s = link.probe(gen.bundle.manifest.model_hash, 200_000, reply_bytes=50_000)
    assert s.kind == "probe" and s.outcome == "ok" and s.compute_ms == 0.0
    assert 200_000 < s.bytes_up < 201_000 and 50_000 < s.bytes_down < 51_000  # uncompressed, exact sizes
    assert 0 < s.network_ms <= s.rtt_ms


def test_metrics_count_jobs_by_kind_and_outcome(gen, link, metrics_port):
    wrong = frozenset({("kind", "answer"), ("outcome", "unknown_model")})
    split_ok = frozenset({("kind", "split"), ("outcome", "ok")})
    before = scraped(metrics_port)
    with pytest.raises(CloudJobFailed):
        h = JobHeader(new_job_id(), "0" * 64, "answer", time.time() + 5, question="what?")
        link.submit(h, {"image": np.zeros(3, np.uint8)}, worker_id=link.workers()[0].worker_id)
    d = gen.info.hidden_size
    header = JobHeader(new_job_id(), gen.bundle.manifest.model_hash, "split", time.time() + 10, segment="decoder[3:4]")
    link.submit(header, {"hidden_states": np.ones((1, 3, d), np.float32), "position_ids": np.arange(3)[None],
                         "attention_mask": np.ones((1, 3), np.int64)})  # fmt: skip
    after = scraped(metrics_port)  # counted before each result is sent, so both are in
    assert after[("msao_worker_jobs_total", wrong)] == before.get(("msao_worker_jobs_total", wrong), 0) + 1
    assert after[("msao_worker_jobs_total", split_ok)] == before[("msao_worker_jobs_total", split_ok)] + 1
    split_count = ("msao_worker_compute_seconds_count", frozenset({("kind", "split")}))
    assert after[split_count] == before[split_count] + 1
    assert after[("msao_worker_compute_seconds_sum", frozenset({("kind", "split")}))] > 0
    assert after[("msao_worker_queue_capacity", frozenset())] == 2 and after[("msao_worker_queue_depth", frozenset())] == 0
    served = [dict(labels) for name, labels in after if name == "msao_model_info"]
    assert served == [{"role": "served", "model": gen.bundle.manifest.name, "model_hash": gen.bundle.manifest.model_hash}]
    assert [dict(labels)["process"] for name, labels in after if name == "msao_build_info"] == ["cloud"]
    assert after[("msao_mqtt_client_events_total", frozenset({("client", "worker"), ("event", "connects")}))] >= 1
    assert ("process_cpu_seconds_total", frozenset()) in after


def test_retained_status_counts_are_the_metrics_counts(gen, link, metrics_port):
    """One count for both: the status the edges read and the scrape a dashboard reads agree once the worker is idle."""
    link.probe(gen.bundle.manifest.model_hash, 1000)  # at least one job, whichever tests ran before
    got = scraped(metrics_port)
    jobs = sum(v for (name, _), v in got.items() if name == "msao_worker_jobs_total")
    errors = sum(v for (name, labels), v in got.items() if name == "msao_worker_jobs_total" and ("outcome", "ok") not in labels)
    errors += got[("msao_worker_failures_total", frozenset())]
    busy = got[("msao_worker_busy_total", frozenset())]
    assert jobs > 0
    status = _status(link, link.workers()[0].worker_id, lambda s: s.jobs_total == jobs)
    assert status is not None, f"status never showed {jobs} jobs"
    assert (status.busy_total, status.errors_total, status.expired_total) == (busy, errors, got[("msao_worker_expired_total", frozenset())])


def _verify(link, gen, sid, drafts, committed, **kw):
    return link.verify(gen.bundle.manifest.model_hash, sid, np.asarray(drafts, np.int64), committed=committed, **kw)


def test_a_speculation_session_commits_the_local_greedy_answer_block_by_block(gen, link, easyvqa_test):
    png = easyvqa_test.image_pngs[0]
    want = gen.answer(png, QUESTION)
    sid = new_job_id()
    first = _verify(link, gen, sid, [], 0, question=QUESTION, prompt={"image": np.frombuffer(png, np.uint8)})
    assert first.token_ids == want.token_ids[:1] and first.committed == 1 and first.finish_reason == ""
    wrong = (want.token_ids[1] + 1) % gen.info.vocab_size  # a rejected draft: the worker answers its own token instead
    second = _verify(link, gen, sid, [wrong], 1, worker_id=first.worker_id)
    assert first.token_ids + second.token_ids == want.token_ids and second.finish_reason == want.finish_reason
    with pytest.raises(CloudJobFailed) as exc:  # the answer ended: the session was freed
        _verify(link, gen, sid, [want.token_ids[0]], 2, worker_id=first.worker_id)
    assert exc.value.code == "session_unknown"


def test_a_lost_or_reordered_block_is_refused_and_leaves_the_session_usable(gen, link, easyvqa_test):
    png = easyvqa_test.image_pngs[1]
    want = gen.answer(png, QUESTION)
    sid = new_job_id()
    first = _verify(link, gen, sid, [], 0, question=QUESTION, prompt={"image": np.frombuffer(png, np.uint8)})
    with pytest.raises(CloudJobFailed) as exc:  # claims two committed tokens: a block in between was lost
        _verify(link, gen, sid, [want.token_ids[1]], 2, worker_id=first.worker_id)
    assert exc.value.code == "session_mismatch" and "lost or re-ordered" in str(exc.value)
    with pytest.raises(CloudJobFailed) as exc:  # a later block re-sending the prompt
        link.submit(
            JobHeader(job_id=new_job_id(), model_hash=gen.bundle.manifest.model_hash, kind="verify", deadline_unix_s=time.time() + 5,
                      session_id=sid, past_length=1),
            {"draft": np.asarray([1], np.int64), "image": np.frombuffer(png, np.uint8)}, worker_id=first.worker_id,
        )  # fmt: skip
    assert exc.value.code == "bad_input"
    rest = _verify(link, gen, sid, list(want.token_ids[1:]), 1, worker_id=first.worker_id)
    assert first.token_ids + rest.token_ids == want.token_ids


def test_a_speculation_session_expires_with_its_request_deadline(gen, link, easyvqa_test):
    png = easyvqa_test.image_pngs[2]
    sid = new_job_id()
    deadline = time.time() + 4.0  # room for the first block on a loaded machine
    first = _verify(link, gen, sid, [], 0, question=QUESTION, prompt={"image": np.frombuffer(png, np.uint8)}, deadline_s=4.0)
    assert first.finish_reason == ""
    time.sleep(max(0.0, deadline - time.time()) + 0.3)  # past the request's deadline: the worker drops the session at its next table access
    with pytest.raises(CloudJobFailed) as exc:
        _verify(link, gen, sid, [0], 1, worker_id=first.worker_id)
    assert exc.value.code == "session_unknown" and "start again" in str(exc.value)


def test_speculation_sessions_are_bounded_in_memory_and_an_oversized_one_is_refused(broker, gen, cloud_bundle_dir, tmp_path, easyvqa_test):
    m = gen.bundle.manifest.model
    per_position = m.num_layers * 2 * m.num_kv_heads * m.head_dim * 4
    prefix, suffix = gen.prompt_ids(QUESTION)
    session_bytes = (len(prefix) + len(suffix) + m.image_tokens + 16) * per_position  # the default budget, 16 tokens
    mb = 1.5 * session_bytes / (1 << 20)  # room for one session, not two
    (small,) = start_workers(broker.url, cloud_bundle_dir, tmp_path, extra=("--max-session-mb", f"{mb:.6f}"), prefix="wmem-")
    lk = open_link(broker.url)
    try:
        wait_online(lk, [small])
        png = np.frombuffer(easyvqa_test.image_pngs[3], np.uint8)
        a, b = new_job_id(), new_job_id()
        first = _verify(lk, gen, a, [], 0, question=QUESTION, prompt={"image": png}, worker_id=small.worker_id)
        _verify(lk, gen, b, [], 0, question=QUESTION, prompt={"image": png}, worker_id=small.worker_id)  # evicts a
        with pytest.raises(CloudJobFailed) as exc:
            _verify(lk, gen, a, [first.token_ids[0]], 1, worker_id=small.worker_id)
        assert exc.value.code == "session_unknown"
        with pytest.raises(CloudJobFailed) as exc:  # a budget whose KV cache alone is over the bound
            _verify(lk, gen, new_job_id(), [], 0, question=QUESTION, prompt={"image": png}, max_new_tokens=200, worker_id=small.worker_id)
        assert exc.value.code == "too_large" and "--max-session-mb" in str(exc.value)
    finally:
        lk.close()
        stop_all([small])
