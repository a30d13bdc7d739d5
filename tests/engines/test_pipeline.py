"""The one request pipeline: the edge, the cloud worker's answer jobs and ``msao eval`` get the same answers from it.

Real exported bundles, real ONNX Runtime sessions, real easy-VQA questions; nothing mocked.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from msao.cloud_bridge.messages import JobHeader
from msao.cloud_bridge.model_server import ModelServer
from msao.cloud_bridge.sessions import SessionTable
from msao.edge_runtime.local_model import LocalModel
from msao.engines.bundle import load_bundle
from msao.engines.generation import Answer, Generator
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.engines.pipeline import RequestPipeline
from msao.errors import ConfigError, MsaoError
from msao.evaluation import evaluate_bundle

# Every path runs the same ONNX files in ONNX Runtime with one thread per session: the same
# inputs give the same floats, so probabilities agree to rounding of the float32 softmax.
PROB_ATOL = 1e-6
ROWS = range(8)


@pytest.fixture(scope="module")
def backend():
    return OnnxRuntimeBackend(OrtOptions(threads=1))


@pytest.fixture(scope="module")
def pipeline(edge_bundle_dir, backend):
    p = RequestPipeline(load_bundle(edge_bundle_dir), backend)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(edge_bundle_dir, backend):
    s = ModelServer(load_bundle(edge_bundle_dir), backend, SessionTable())
    yield s
    s.close()


def _ask(p: RequestPipeline, png: bytes, question: str, keep_ratio: float = 1.0) -> tuple[np.ndarray | None, Answer]:
    rgb, decode_ms = p.decode(png)
    prepared = p.prepare(rgb, question, keep_ratio, analyse=False, decode_ms=decode_ms)
    return prepared.keep, p.answer(prepared, question)


def _same(a: Answer, text: str, token_ids, token_probs) -> None:
    assert (a.text, a.token_ids) == (text, tuple(int(t) for t in token_ids))
    diff = np.abs(np.asarray(a.token_probs) - np.asarray(token_probs, np.float64))
    assert diff.max() <= PROB_ATOL, f"token probabilities differ: max {diff.max():.3g}, mean {diff.mean():.3g}"


def _answer_job(server: ModelServer, question: str, **tensors: np.ndarray):
    header = JobHeader(job_id="job-1", model_hash=server.model_hash, kind="answer", deadline_unix_s=time.time() + 60, question=question)
    return server.run(header, tensors)


@pytest.mark.parametrize("keep_ratio", [1.0, 0.25])
def test_pipeline_local_model_and_answer_job_give_the_same_answer(pipeline, models, server, easyvqa_test, keep_ratio):
    edge = models[0]
    for i in ROWS:
        png, question = easyvqa_test.image_pngs[easyvqa_test.image_ids[i]], easyvqa_test.questions[i]
        keep, ans = _ask(pipeline, png, question, keep_ratio)
        assert ans.kept_tokens == (pipeline.n_tokens if keep_ratio == 1.0 else round(keep_ratio * pipeline.n_tokens))
        local_keep, local = _ask(edge, png, question, keep_ratio)
        _same(local, ans.text, ans.token_ids, ans.token_probs)
        image = {"image": np.frombuffer(png, np.uint8)}
        if keep is not None:
            assert local_keep is not None and np.array_equal(local_keep, keep)
            image["keep"] = keep
        out = _answer_job(server, question, **image)
        _same(ans, out.text, out.tensors["token_ids"], out.tensors["token_probs"])


def test_an_answer_job_from_kept_tokens_equals_the_pipeline_with_that_keep_set(pipeline, server, easyvqa_test):
    png, question = easyvqa_test.image_pngs[easyvqa_test.image_ids[3]], easyvqa_test.questions[3]
    rgb, _ = pipeline.decode(png)
    prepared = pipeline.prepare(rgb, question, 0.5)
    ans = pipeline.answer(prepared, question)
    assert prepared.keep is not None and ans.kept_tokens == len(prepared.keep) < pipeline.n_tokens
    out = _answer_job(server, question, image_tokens=prepared.encoding.tokens[prepared.keep], keep=prepared.keep)
    _same(ans, out.text, out.tensors["token_ids"], out.tensors["token_probs"])


@pytest.mark.parametrize("keep_policy, keep_ratio", [(None, 1.0), ("mas", 0.25), ("random", 0.5)])
def test_evaluate_bundle_answers_as_pipeline_calls_do(edge_bundle_dir, backend, easyvqa_test, keep_policy, keep_ratio):
    n = 12
    bundle = load_bundle(edge_bundle_dir)
    report = evaluate_bundle(bundle, backend, limit=n, keep_policy=keep_policy, keep_ratio=keep_ratio)
    p = RequestPipeline(bundle, backend, keep_policy=keep_policy or "mas")
    correct, confidence, kept = [], [], []
    for i in range(n):
        png, question = easyvqa_test.image_pngs[easyvqa_test.image_ids[i]], easyvqa_test.questions[i]
        rgb, _ = p.decode(png)
        prepared = p.prepare(rgb, question, keep_ratio if keep_policy else 1.0, analyse=keep_policy is not None, request_id=i)
        ans = p.answer(prepared, question)
        correct.append(ans.text == easyvqa_test.answers[i])
        confidence.append(ans.confidence)
        kept.append(ans.kept_tokens)
    p.close()
    assert report.n == n and report.keep_policy == keep_policy
    assert report.accuracy == round(float(np.mean(correct)), 4)
    assert report.mean_confidence == round(float(np.mean(confidence)), 4)
    assert report.kept_tokens_mean == round(float(np.mean(kept)), 3)
    assert (report.mas_ms_mean > 0) == (keep_policy is not None)


def test_an_unknown_keep_policy_is_refused_with_the_choices(edge_bundle_dir, backend):
    with pytest.raises(ConfigError, match="unknown keep policy 'top'; choose one of"):
        RequestPipeline(load_bundle(edge_bundle_dir), backend, keep_policy="top")


def test_two_threads_sharing_one_pipeline_each_get_the_answer_they_get_alone(pipeline, easyvqa_test):
    jobs = {  # thread -> its questions (different images, different keep ratios)
        0: [(i, 1.0) for i in range(0, 12, 2)],
        1: [(i, 0.25) for i in range(1, 12, 2)],
    }

    def run(rows) -> list[tuple[str, tuple[int, ...], tuple[float, ...]]]:
        out = []
        for i, ratio in rows:
            _, a = _ask(pipeline, easyvqa_test.image_pngs[easyvqa_test.image_ids[i]], easyvqa_test.questions[i], ratio)
            out.append((a.text, a.token_ids, a.token_probs))
        return out

    alone = {t: run(rows) for t, rows in jobs.items()}
    start = threading.Barrier(len(jobs), timeout=60)

    def worker(t: int) -> tuple[Generator, list]:
        start.wait()  # both threads are inside the pipeline together
        return pipeline.generator(), run(jobs[t] * 3)

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {t: pool.submit(worker, t) for t in jobs}
        together = {t: f.result() for t, f in futures.items()}  # re-raises what a thread raised
    assert together[0][0] is not together[1][0]  # a generator (KV cache) each
    for t in jobs:
        assert together[t][1] == alone[t] * 3


def test_profiling_borrows_the_runners_and_close_refuses_later_requests(edge_bundle_dir, easyvqa_test):
    p = RequestPipeline(load_bundle(edge_bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    png, question = easyvqa_test.image_pngs[0], easyvqa_test.questions[0]
    _, before = _ask(p, png, question)
    profile = p.profile(repeats=1, warmup=0)
    assert {pt.segment for pt in profile.points} == set(p.runners)
    _, after = _ask(p, png, question)  # the profiler closed what it borrowed, not the shared runners
    assert after.token_ids == before.token_ids
    p.close()
    p.close()  # idempotent
    rgb, _ = p.decode(png)  # decoding runs no segment
    with pytest.raises(MsaoError, match="is closed .*open a new one"):
        p.prepare(rgb, question)
    with pytest.raises(MsaoError, match="is closed"):
        p.profile()


def test_a_local_model_is_a_pipeline_and_closing_it_leaves_others_serving(edge_bundle_dir, pipeline, easyvqa_test):
    png, question = easyvqa_test.image_pngs[0], easyvqa_test.questions[0]
    model = LocalModel(load_bundle(edge_bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    assert isinstance(model, RequestPipeline)
    _, ans = _ask(model, png, question)
    model.close()
    with pytest.raises(MsaoError, match="is closed"):
        _ask(model, png, question)
    _, other = _ask(pipeline, png, question)
    assert other.token_ids == ans.token_ids
