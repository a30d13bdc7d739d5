"""The HTTP intake against a real edge-only runtime (real ONNX bundles, real easy-VQA images, real sockets).

How each chat body is read and refused is ``test_openai_chat.py``'s; here, that a refusal reaches
the client with its status and OpenAI error object and is counted.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time

import pytest

from msao.edge_runtime.http_api import HttpIntake, HttpOptions
from msao.edge_runtime.requests import EdgeRequest
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions
from msao.prometheus import MetricsListener
from tests.edge_runtime.test_openai_chat import chat_body, data_uri
from tests.test_prometheus import samples, scrape

CHAT = "/v1/chat/completions"
MAX_BODY_BYTES = 64 * 1024  # easy-VQA PNGs are ~1 KB; a small limit makes the 413 test cheap
COLOUR_QUESTIONS = ("what color is the shape?", "what is the color of the shape?")  # the models answer these ~100% right


@pytest.fixture(scope="module")
def runtime(models):
    rt = EdgeRuntime(*models, link=None, calibration=None, options=RuntimeOptions(workers=2, probe_interval_s=0, drain_s=1)).start()
    yield rt
    rt.stop()


@pytest.fixture(scope="module")
def intake(runtime):
    with HttpIntake(runtime, "127.0.0.1", 0, HttpOptions(max_body_bytes=MAX_BODY_BYTES, socket_timeout_s=10)) as h:
        yield h


def http_call(h: HttpIntake, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON or text) from one real HTTP exchange."""
    conn = http.client.HTTPConnection("127.0.0.1", h.port, timeout=15)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        kind = resp.getheader("Content-Type", "")
        return resp.status, resp, json.loads(raw) if kind == "application/json" else raw.decode()
    finally:
        conn.close()


def raw_exchange(h: HttpIntake, head: bytes, timeout_s: float = 5.0) -> tuple[int, dict, float]:
    """Send ``head`` on a bare socket (no body follows) and read the answer: (status, JSON, seconds)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", h.port), timeout=timeout_s) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_text, _, payload = data.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(payload), time.monotonic() - t0


def colour_questions(ds, n: int) -> list[int]:
    return [i for i, q in enumerate(ds.questions) if q in COLOUR_QUESTIONS][:n]


def assert_error(status: int, body: dict, want_status: int, want_code: str, match: str = "") -> None:
    assert status == want_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["code"] == want_code and err["param"] is None
    assert match.lower() in err["message"].lower()
    assert "Traceback" not in err["message"]


# -- answers -----------------------------------------------------------------------------------------


def test_answers_easyvqa_colour_questions_with_the_dataset_answer(intake, easyvqa_test):
    ds = easyvqa_test
    for i in colour_questions(ds, 4):
        status, _, body = http_call(intake, "POST", CHAT, chat_body(ds.questions[i], {"url": data_uri(ds.image_pngs[ds.image_ids[i]])}))
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == ds.answers[i], (ds.questions[i], body["msao"])


def test_http_answer_equals_the_runtime_answer_for_the_same_request(intake, runtime, easyvqa_test):
    ds = easyvqa_test
    for i in range(8):
        png, q = ds.image_pngs[ds.image_ids[i]], ds.questions[i]
        reference = runtime.answer(EdgeRequest(f"ref{i}", q, png, policy="edge_only"))
        status, _, body = http_call(intake, "POST", CHAT, chat_body(q, data_uri(png), msao={"policy": "edge_only"}))  # image_url as a plain string
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == reference.answer
        assert body["msao"]["confidence"] == pytest.approx(reference.confidence, abs=1e-4)


def test_response_has_the_openai_shape_and_the_msao_extension(intake, easyvqa_test):
    ds = easyvqa_test
    i = colour_questions(ds, 1)[0]
    body = chat_body(ds.questions[i], {"url": data_uri(ds.image_pngs[ds.image_ids[i]]), "detail": "low"}, max_tokens=8, temperature=0)
    body["msao"] = {"request_id": "cam7-frame-42", "deadline_ms": 20000, "stream": "cam7"}
    t0 = int(time.time())
    status, resp, out = http_call(intake, "POST", CHAT, body)
    assert status == 200, out
    assert resp.getheader("Content-Type") == "application/json"
    assert resp.getheader("X-Request-Id") == "cam7-frame-42"
    assert out["id"] == "chatcmpl-cam7-frame-42" and out["object"] == "chat.completion"
    assert isinstance(out["created"], int) and abs(out["created"] - t0) <= 5
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": ds.answers[i]}, "finish_reason": "stop"}]
    assert set(out["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    ext = out["msao"]
    assert ext["request_id"] == "cam7-frame-42" and ext["status"] == "ok" and ext["answer"] == ds.answers[i]
    assert out["model"] == ext["model"] and ext["model"] in ("msao-tiny-edge", "msao-tiny-cloud")
    assert ext["answered_by"] == "edge" and ext["plan"] and ext["reason"] and 0 < ext["confidence"] <= 1
    assert ext["timings_ms"]["total"] > 0 and "image_tokens" in ext["mas"]
    assert ext["bytes_up"] == 0 and ext["bytes_down"] == 0  # no cloud


# -- refused at intake (which bodies and why: test_openai_chat.py) -------------------------------------


def test_string_content_without_an_image_is_refused_with_400(intake, runtime):
    before = runtime.metrics.rejected.value(code="bad_image")
    status, _, body = http_call(intake, "POST", CHAT, {"messages": [{"role": "user", "content": "what color is the shape?"}]})
    assert_error(status, body, 400, "bad_image", "image_url content part")
    assert runtime.metrics.rejected.value(code="bad_image") == before + 1


def test_corrupt_image_gets_bad_image_with_the_runtime_response(intake):
    status, _, body = http_call(intake, "POST", CHAT, chat_body("what color is the shape?", data_uri(os.urandom(600))))
    assert_error(status, body, 400, "bad_image")
    assert body["msao"]["status"] == "error" and body["msao"]["error_code"] == "bad_image"


def test_body_over_the_limit_gets_413_before_any_byte_of_it_is_read(intake, runtime):
    before = runtime.metrics.rejected.value(code="too_large")
    # No body follows the headers: a server that tried to read it would wait for the 10 s socket timeout.
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n"
    status, body, seconds = raw_exchange(intake, head.encode())
    assert_error(status, body, 413, "too_large", "over the limit")
    assert seconds < 2.0
    assert runtime.metrics.rejected.value(code="too_large") == before + 1


def test_body_over_the_limit_sent_in_full_still_gets_413(intake):
    status, _, body = http_call(intake, "POST", CHAT, b"x" * (MAX_BODY_BYTES + 1000))
    assert_error(status, body, 413, "too_large")


def test_missing_content_length_gets_411(intake):
    status, body, _ = raw_exchange(intake, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert_error(status, body, 411, "length_required", "Content-Length")


def test_chunked_body_gets_411(intake):
    conn = http.client.HTTPConnection("127.0.0.1", intake.port, timeout=15)
    try:
        conn.request("POST", CHAT, body=iter([b'{"messages": []}']), encode_chunked=True)
        resp = conn.getresponse()
        assert_error(resp.status, json.loads(resp.read()), 411, "length_required", "chunked")
    finally:
        conn.close()


# -- admission ---------------------------------------------------------------------------------------


def test_full_admission_queue_gets_429_and_every_other_request_is_answered(models, easyvqa_test):
    ds = easyvqa_test
    i = colour_questions(ds, 1)[0]
    payload = json.dumps(chat_body(ds.questions[i], data_uri(ds.image_pngs[ds.image_ids[i]]))).encode()
    small = EdgeRuntime(*models, options=RuntimeOptions(workers=1, queue_size=1, probe_interval_s=0, drain_s=1)).start()
    results: list[tuple[int, str | None, dict]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    try:
        with HttpIntake(small, "127.0.0.1", 0) as h:

            def client(barrier: threading.Barrier) -> None:
                barrier.wait()
                try:
                    status, resp, body = http_call(h, "POST", CHAT, payload)
                except Exception as exc:  # a reset connection would be a bug too
                    with lock:
                        failures.append(exc)
                    return
                with lock:
                    results.append((status, resp.getheader("Retry-After"), body))

            sent = 0
            for _ in range(5):  # a round is 16 requests at once; one worker and one queue slot cannot take them all
                barrier = threading.Barrier(16)
                threads = [threading.Thread(target=client, args=(barrier,)) for _ in range(16)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                sent += len(threads)
                if any(r[0] == 429 for r in results):
                    break
        assert not failures and len(results) == sent, failures[:3]
        busy = [r for r in results if r[0] == 429]
        assert busy, f"no 429 in {len(results)} requests"
        for status, retry_after, body in busy:
            assert_error(status, body, 429, "busy", "busy")
            assert retry_after == "1"
        others = [r for r in results if r[0] != 429]
        assert others and all(s == 200 and b["choices"][0]["message"]["content"] == ds.answers[i] for s, _, b in others)
        assert small.metrics.rejected.value(code="busy") == len(busy)
    finally:
        small.stop()


def test_connections_over_max_concurrent_get_503_but_probes_are_answered(runtime, easyvqa_test):
    with HttpIntake(runtime, "127.0.0.1", 0, HttpOptions(max_concurrent=1, socket_timeout_s=10)) as h:
        with socket.create_connection(("127.0.0.1", h.port)):  # silent: holds the only slot
            time.sleep(0.1)
            status, resp, body = http_call(h, "POST", CHAT, chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0])))
            assert_error(status, body, 503, "unavailable", "retry")
            assert resp.getheader("Retry-After") == "1"
            assert http_call(h, "GET", "/healthz")[0] == 200
        # the slot comes back once the silent connection closes (a handler frees it just after its
        # client has read the answer, so a call right behind another may still see 503 for a moment)
        deadline = time.monotonic() + 5
        good = chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]))
        while (status := http_call(h, "POST", CHAT, good)[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200


# -- probes, routing ---------------------------------------------------------------------------------


def test_healthz_says_live(intake):
    status, _, body = http_call(intake, "GET", "/healthz")
    assert (status, body) == (200, {"live": True})


def test_readyz_is_200_and_degraded_without_a_cloud(intake):
    status, _, body = http_call(intake, "GET", "/readyz")
    assert status == 200
    assert body["ready"] is True and body["degraded"] is True and body["mode"] == "edge-only"


def test_readyz_is_503_once_the_runtime_stops(models):
    rt = EdgeRuntime(*models, options=RuntimeOptions(workers=1, probe_interval_s=0, drain_s=0)).start()
    with HttpIntake(rt, "127.0.0.1", 0) as h:
        assert http_call(h, "GET", "/readyz")[0] == 200
        rt.stop()
        status, _, body = http_call(h, "GET", "/readyz")
        assert status == 503 and body["ready"] is False
        assert http_call(h, "GET", "/healthz")[0] == 200


def test_metrics_are_not_served_on_the_unauthenticated_chat_listener(intake):
    status, _, body = http_call(intake, "GET", "/metrics")
    assert_error(status, body, 404, "not_found", "own listener: start msao edge with --metrics HOST:PORT")


def test_metrics_listener_counts_http_answers_by_route_and_status(models, easyvqa_test):
    # a runtime of its own: no connection left over from another test can answer while this one counts
    chat = frozenset({("route", CHAT), ("code", "200")})
    rt = EdgeRuntime(*models, options=RuntimeOptions(workers=1, probe_interval_s=0, drain_s=0)).start()
    try:
        with HttpIntake(rt, "127.0.0.1", 0) as h, MetricsListener("127.0.0.1", 0) as listener:
            listener.serve(rt.metrics.registry)
            before = samples(scrape("127.0.0.1", listener.port)[2])
            status, _, body = http_call(h, "POST", CHAT, chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0])))
            assert status == 200, body
            http_call(h, "GET", "/healthz")
            http_call(h, "GET", "/no/such/path")
            http_call(h, "POST", CHAT, b"{", {"Content-Type": "application/json"})
            after = samples(scrape("127.0.0.1", listener.port)[2])
    finally:
        rt.stop()

    def delta(name: str, labels: frozenset) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert delta("msao_http_responses_total", chat) == 1
    assert delta("msao_http_responses_total", frozenset({("route", "/healthz"), ("code", "200")})) == 1
    assert delta("msao_http_responses_total", frozenset({("route", "other"), ("code", "404")})) == 1  # not the path: a fixed label
    assert delta("msao_http_responses_total", frozenset({("route", CHAT), ("code", "400")})) == 1
    assert delta("msao_intake_requests_total", frozenset({("source", "http")})) == 2  # both chat POSTs, answered or not
    assert delta("msao_rejected_total", frozenset({("code", "bad_request")})) == 1
    served = [labels for name, labels in after if name == "msao_requests_total" and ("outcome", "ok") in labels]
    assert sum(delta("msao_requests_total", labels) for labels in served) == 1


def test_unknown_path_gets_404_and_wrong_method_gets_405(intake):
    status, _, body = http_call(intake, "GET", "/v1/models")
    assert_error(status, body, 404, "not_found", "no such endpoint")
    status, resp, body = http_call(intake, "GET", CHAT)
    assert_error(status, body, 405, "method_not_allowed", "takes POST")
    assert resp.getheader("Allow") == "POST"
    assert http_call(intake, "DELETE", "/healthz")[0] == 405


def test_server_header_does_not_reveal_python(intake):
    _, resp, _ = http_call(intake, "GET", "/healthz")
    assert resp.getheader("Server") == "msao-edge"
