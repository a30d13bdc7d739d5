"""The paper's pairing through msao's runtime and a real cloud worker: a Qwen2-VL edge model, a Qwen2.5-VL cloud model.

Both are random-initialised at reduced depth (tests/export/tiny_qwen.py) and share a patch-4,
merge-2 grid of 16 image tokens, as Qwen2-VL-2B and Qwen2.5-VL-7B share patch 14, merge 2. Their
answers are arbitrary words, so the checks are identities: what the cloud answers through
MQTT equals what the same bundle answers here, for the whole image, for the edge's keep-set
(the kept tokens at their original 3-D positions) and for a split whose cloud half receives
M-RoPE position ids of shape (3, B, T).
"""

from __future__ import annotations

import io
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from msao.cloud_bridge.link import CloudLink, LinkOptions
from msao.cloud_bridge.mqtt_options import ClientOptions
from msao.edge_runtime.local_model import LocalModel
from msao.edge_runtime.plans import Plan
from msao.edge_runtime.requests import EdgeRequest
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions
from msao.edge_runtime.scheduler import SchedulerOptions
from msao.engines.bundle import load_bundle
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.export.exporter import ExportOptions, export_bundle
from testbed import LinkShape, ShapingProxy, start_broker, start_workers, stop_all, wait_online

from ..export.tiny_qwen import make_tiny_qwen

QUESTIONS = ("what color is the shape?", "what shape is in the image?", "is there a red shape?", "does the image contain a circle?")
# Verdicts only: every block a round trip, whatever the link and the worker's speed (the tests below count blocks
# and stream verdict by verdict); decoding ahead has its own test at the end.
VERDICTS_ONLY = RuntimeOptions(workers=1, probe_interval_s=0, scheduler=SchedulerOptions(decode_ahead=0))


@pytest.fixture(scope="module")
def qwen_bundles(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qwen-pair")
    opts = ExportOptions(check_questions=8, profile_repeats=1, max_new_tokens=4)
    edge = export_bundle(make_tiny_qwen(root / "edge-model", "qwen2_vl", seed=0), root / "edge", opts, progress=lambda _m: None)
    cloud = export_bundle(make_tiny_qwen(root / "cloud-model", "qwen2_5_vl", seed=1), root / "cloud", opts, progress=lambda _m: None)
    assert edge.model.image_tokens == cloud.model.image_tokens == 16 and edge.model.family != cloud.model.family
    return root / "edge", root / "cloud"


@pytest.fixture(scope="module")
def pair(qwen_bundles):
    be = OnnxRuntimeBackend(OrtOptions(threads=1))
    edge, large = (LocalModel(load_bundle(d), be, image_cache_bytes=0) for d in qwen_bundles)
    yield edge, large
    edge.close()
    large.close()


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, qwen_bundles, pair):
    root = tmp_path_factory.mktemp("qwen-cloud")
    broker = start_broker(root / "broker")
    workers = start_workers(broker.url, qwen_bundles[1], root, count=1)
    edge_id = "edge-" + uuid.uuid4().hex[:8]
    link = CloudLink(LinkOptions(edge_id, ClientOptions(broker.url, f"msao-{edge_id}", keepalive_s=5))).start()
    rt = None
    try:
        wait_online(link, workers)
        rt = EdgeRuntime(*pair, link, None, VERDICTS_ONLY).start()
        yield rt
    finally:
        if rt is not None:
            rt.stop()
        link.close()
        stop_all(workers)
        broker.stop()


def _images(n: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(7)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(buf, format="PNG")  # not square: resized and cropped
        out.append(buf.getvalue())
    return out


def _ask(rt: EdgeRuntime, image: bytes, question: str, **kw):
    r = rt.answer(EdgeRequest("q" + uuid.uuid4().hex[:10], question, image, deadline_ms=30_000, **kw))
    assert r.status == "ok" and not r.fallback, r
    return r


def test_cloud_only_answers_in_the_cloud_as_the_qwen2_5_bundle_does_here(runtime, pair):
    _, large = pair
    for image, q in zip(_images(4), QUESTIONS):
        r = _ask(runtime, image, q, policy="cloud_only")
        assert r.answered_by == "cloud" and r.model == large.name
        here = large.answer(large.prepare(large.decode(image, 10**6)[0], q, analyse=False), q)
        assert r.answer == here.text and r.prompt_tokens == here.prompt_tokens


def test_the_edge_keep_set_reaches_the_cloud_model_at_its_original_positions(runtime, pair):
    edge, large = pair
    plan = Plan("cloud", 0.5, send_keep=True, reason="test: the edge's MAS picks the 8 tokens the cloud prefills")
    for image, q in zip(_images(4), QUESTIONS):
        request = EdgeRequest("k" + uuid.uuid4().hex[:10], q, image, deadline_ms=30_000)
        r = runtime.executor.run(plan, request, edge.decode(image, 10**6)[0], 0.0, time.monotonic() + 30)
        keep = edge.prepare(edge.decode(image, 10**6)[0], q, 0.5).keep
        assert r.answered_by == "cloud" and not r.fallback, r
        assert keep is not None and len(keep) == 8 and r.mas["kept_tokens"] == 8
        pl = large.prepare(large.decode(image, 10**6)[0], q, analyse=False)
        here = large.answer(pl, q, keep=keep)  # the same kept tokens at the same (t, h, w) positions
        assert r.answer == here.text and r.prompt_tokens == here.prompt_tokens


def test_a_split_sends_m_rope_positions_and_answers_as_the_whole_model(runtime, pair):
    _, large = pair
    (k,) = large.manifest.split_points  # the exporter's default for a 3-layer decoder: its middle
    for image, q in zip(_images(3), QUESTIONS):
        r = _ask(runtime, image, q, policy="static_split", split_layer=k)
        assert r.answered_by == "cloud" and r.plan == f"split@{k} keep=1"
        here = large.answer(large.prepare(large.decode(image, 10**6)[0], q, analyse=False), q)
        assert r.answer == here.text  # fp16 hidden states across the link, (3, 1, T) position ids for the cloud's layers


def test_draft_verify_drafts_with_qwen2_vl_and_commits_the_qwen2_5_answer(runtime, pair):
    edge, large = pair
    image, q = _images(1)[0], QUESTIONS[0]
    r = _ask(runtime, image, q, policy="draft_verify_static")
    assert r.answered_by == "cloud" and "cloud committed" in r.reason
    assert r.answer == large.answer(large.prepare(large.decode(image, 10**6)[0], q, analyse=False), q).text
    draft = edge.answer(edge.prepare(edge.decode(image, 10**6)[0], q, analyse=False), q)
    assert draft.text and r.flops_edge > 0  # the edge drafted meanwhile


def test_token_level_speculation_commits_the_qwen2_5_greedy_answer_token_for_token(runtime, pair):
    """Blocks of Qwen2-VL drafts verified by the worker's Qwen2.5-VL session: the answer is the cloud model's, whatever was drafted."""
    edge, large = pair
    for image, q in zip(_images(4), QUESTIONS):
        r = _ask(runtime, image, q, policy="speculative", max_new_tokens=12)
        here = large.answer(large.prepare(large.decode(image, 10**6)[0], q, analyse=False), q, max_new_tokens=12)
        assert r.answered_by == "cloud" and r.model == large.name and r.plan.startswith("speculative")
        assert r.answer == here.text and r.finish_reason == here.finish_reason
        assert r.completion_tokens == len(here.token_ids) - (here.finish_reason == "stop")
        assert "token-level:" in r.reason and r.flops_edge > 0 and r.flops_cloud > 0


@pytest.fixture(scope="module")
def same_model_runtime(runtime, qwen_bundles):
    """The cloud bundle on both sides: every draft is right, so whole blocks are accepted."""
    be = OnnxRuntimeBackend(OrtOptions(threads=1))
    edge, large = (LocalModel(load_bundle(qwen_bundles[1]), be, image_cache_bytes=0) for _ in range(2))
    link = runtime.executor.link
    rt = EdgeRuntime(edge, large, link, None, VERDICTS_ONLY).start()
    yield rt
    rt.stop()
    edge.close()
    large.close()


def test_right_drafts_are_accepted_in_blocks_so_the_cloud_runs_fewer_passes_than_tokens(same_model_runtime, pair):
    _, large = pair
    image, q = _images(1)[0], QUESTIONS[1]
    r = _ask(same_model_runtime, image, q, policy="speculative", max_new_tokens=12)
    here = large.answer(large.prepare(large.decode(image, 10**6)[0], q, analyse=False), q, max_new_tokens=12)
    assert r.answer == here.text
    blocks, accepted, drafted = _speculation_counts(r.reason)
    assert accepted == drafted > 0  # the drafts are the cloud model's own tokens
    assert blocks < len(here.token_ids)  # fewer verification passes than answer tokens


def _speculation_counts(reason: str) -> tuple[int, int, int]:
    import re

    m = re.search(r"token-level: (\d+) blocks \(k=[\d,]*\), (\d+)/(\d+) drafts accepted", reason)
    assert m, reason
    return int(m[1]), int(m[2]), int(m[3])


def test_a_worker_killed_mid_answer_leaves_the_edge_to_finish_it_alone_within_the_deadline(tmp_path, qwen_bundles, pair):
    """Fault case: the worker holding the session dies while blocks are in flight; the edge's drafts finish the answer."""
    import threading

    broker = start_broker(tmp_path / "broker")
    workers = start_workers(broker.url, qwen_bundles[1], tmp_path, count=1)
    proxy = ShapingProxy("127.0.0.1", broker.port, LinkShape(delay_ms=100)).start()  # each block's round trip >= 200 ms
    edge_id = "edge-" + uuid.uuid4().hex[:8]
    link = CloudLink(LinkOptions(edge_id, ClientOptions(f"mqtt://127.0.0.1:{proxy.port}", f"msao-{edge_id}", keepalive_s=5))).start()
    rt = None
    try:
        wait_online(link, workers)
        rt = EdgeRuntime(*pair, link, None, VERDICTS_ONLY).start()
        image, q = _images(1)[0], QUESTIONS[0]  # 12 one-token blocks (tests above): >= 2.4 s of round trips
        got = []
        asker = threading.Thread(
            target=lambda: got.append(rt.answer(EdgeRequest("f" + uuid.uuid4().hex[:10], q, image, deadline_ms=8_000, policy="speculative",
                                                            max_new_tokens=12)))
        )  # fmt: skip
        asker.start()
        time.sleep(0.8)
        workers[0].kill()
        asker.join(30)
        (r,) = got
        assert r.status == "ok" and r.answered_by == "edge" and r.fallback, r
        assert "the edge finished the answer alone" in r.reason and r.finish_reason in ("stop", "length") and 0 < r.completion_tokens <= 12
        assert r.timings_ms["total"] < 8_000 + 3_000  # the deadline bounds the wait for a verdict; the rest is local drafting
    finally:
        if rt is not None:
            rt.stop()
        link.close()
        stop_all(workers)
        proxy.stop()
        broker.stop()


def test_a_streamed_speculative_answer_arrives_verdict_by_verdict_and_adds_up_to_the_cloud_answer(runtime, pair):
    """POST stream: true over real HTTP: the verified tokens come as several deltas before the end, summing to the answer."""
    from msao.edge_runtime.http_api import HttpIntake

    from .test_http_api import streamed_chunks
    from .test_openai_chat import chat_body, data_uri

    _, large = pair
    image, q = _images(1)[0], QUESTIONS[2]
    here = large.answer(large.prepare(large.decode(image, 10**6)[0], q, analyse=False), q, max_new_tokens=12)
    body = chat_body(q, {"url": data_uri(image)}, stream=True, max_tokens=12, msao={"policy": "speculative", "deadline_ms": 30_000})
    with HttpIntake(runtime, "127.0.0.1", 0) as intake:
        chunks = streamed_chunks(intake.port, body, timeout_s=60)
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    final = chunks[-1]["msao"]
    assert final["status"] == "ok" and final["plan"].startswith("speculative") and not final["fallback"]
    assert len(here.token_ids) >= 3 and len(deltas) >= 2  # more than one delta: only a live stream splits the answer
    assert "".join(deltas) == here.text == final["answer"] and chunks[-1]["choices"][0]["finish_reason"] == here.finish_reason


def test_partials_asked_for_over_mqtt_come_verdict_by_verdict_before_the_final_response(runtime, pair):
    """A JSON request with ``partials`` through a real MqttIntake and broker: partial responses (schema-valid), each a
    growing prefix of the final answer, then the final response, equal to the cloud model's answer."""
    import json

    from msao.edge_runtime.edge_client import EdgeClient
    from msao.edge_runtime.mqtt_intake import MqttIntake

    from .test_mqtt_intake import SCHEMAS, schema_errors

    _, large = pair
    image, q = _images(2)[1], QUESTIONS[3]
    here = large.answer(large.prepare(large.decode(image, 10**6)[0], q, analyse=False), q, max_new_tokens=12)
    schema = json.loads((SCHEMAS / "edge-response.schema.json").read_text())
    url, edge_id = str(runtime.link.client.url), "partials-" + uuid.uuid4().hex[:6]
    partials = []
    with MqttIntake(runtime, ClientOptions(url, f"msao-{edge_id}"), edge_id) as intake:
        assert intake.wait_ready(10)
        with EdgeClient(ClientOptions(url, EdgeClient.new_client_id()), edge_id) as client:
            reply = client.ask(image, q, deadline_ms=30_000, policy="speculative", max_new_tokens=12, on_partial=partials.append)
    final = reply.response
    assert final.status == "ok" and final.plan.startswith("speculative") and not final.fallback and final.answer == here.text
    assert len(here.token_ids) >= 3 and len(partials) >= 2 and all(p.status == "partial" and p.model == large.name for p in partials)
    texts = [p.answer for p in partials]
    assert all(len(a) < len(b) for a, b in zip(texts, texts[1:])) and all(final.answer.startswith(t) for t in texts)
    assert not schema_errors(schema, json.loads(partials[0].to_json_bytes()))


def test_decoding_ahead_commits_the_whole_cloud_answer_in_the_prompts_verdict(runtime, pair):
    """With the cloud asked to decode 11 tokens after its first verdict, a 12-token answer takes one round trip, not 12,
    and is still the Qwen2.5 model's greedy answer token for token."""
    edge, large = pair
    link = runtime.executor.link
    rt = EdgeRuntime(edge, large, link, None, RuntimeOptions(workers=1, probe_interval_s=0, scheduler=SchedulerOptions(decode_ahead=11))).start()
    try:
        for image, q in zip(_images(2), QUESTIONS[2:]):
            r = _ask(rt, image, q, policy="speculative", max_new_tokens=12)
            here = large.answer(large.prepare(large.decode(image, 10**6)[0], q, analyse=False), q, max_new_tokens=12)
            assert r.answer == here.text and r.finish_reason == here.finish_reason and r.plan.startswith("speculative")
            blocks, _, drafted = _speculation_counts(r.reason)
            assert blocks == 1 and drafted == 0 and f"{len(here.token_ids) - 1} decoded ahead" in r.reason, r.reason
            assert "the edge did not need to prefill" in r.reason and r.flops_edge == 0 and r.flops_cloud > 0  # its drafts could not help
    finally:
        rt.stop()
