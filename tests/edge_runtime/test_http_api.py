"""The HTTP intake against a real edge-only runtime (real ONNX bundles, real easy-VQA images, real sockets).

How each chat body is read and refused is ``test_openai_chat.py``'s; here, that a refusal reaches
the client with its status and OpenAI error object and is counted.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from msao.edge_runtime.http_api import HttpIntake, HttpOptions
from msao.edge_runtime.requests import EdgeRequest
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions
from msao.errors import ConfigError
from msao.prometheus import MetricsListener
from testbed import poll_until
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


def test_an_http_image_url_is_refused_because_msao_never_fetches(intake, runtime):
    before = runtime.metrics.rejected.value(code="bad_image")
    status, _, body = http_call(intake, "POST", CHAT, chat_body("what color is the shape?", "http://example.com/x.png"))
    assert_error(status, body, 400, "bad_image", "never fetches")
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


def test_a_chunked_body_is_read_whole_and_answered(intake, easyvqa_test):
    body = json.dumps(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]))).encode()
    conn = http.client.HTTPConnection("127.0.0.1", intake.port, timeout=15)
    try:
        conn.request("POST", CHAT, body=iter([body[:100], body[100:]]), encode_chunked=True)
        resp = conn.getresponse()
        out = json.loads(resp.read())
        assert resp.status == 200, out
        assert out["choices"][0]["message"]["content"] == easyvqa_test.answers[0] or out["msao"]["status"] == "ok"
    finally:
        conn.close()


def test_a_chunked_body_over_the_limit_gets_413_while_it_arrives(intake):
    conn = http.client.HTTPConnection("127.0.0.1", intake.port, timeout=15)
    try:
        conn.request("POST", CHAT, body=iter([b"x" * 40_000] * 3), encode_chunked=True)  # 120 KB > 64 KiB
        resp = conn.getresponse()
        assert_error(resp.status, json.loads(resp.read()), 413, "too_large", "over the limit")
    finally:
        conn.close()


def test_expect_100_continue_gets_its_100_and_a_2_mib_body_is_not_stalled(runtime, easyvqa_test, tmp_path):
    """curl waits up to 1 s for a 100 Continue before sending a body over 1 MiB; the server sends it."""
    body = json.dumps(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0])))
    path = tmp_path / "body.json"
    path.write_text(body + " " * (2 * 1024 * 1024 - len(body)))  # JSON padded with whitespace to 2 MiB
    with HttpIntake(runtime, "127.0.0.1", 0) as h:
        out = subprocess.run(
            ["curl", "-sv", "-T", str(path), "-X", "POST", "-H", "Content-Type: application/json", "-w", "\n%{time_total}",
             h.url + CHAT], capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    answer, seconds = out.stdout.rsplit("\n", 1)
    assert "HTTP/1.1 100 Continue" in out.stderr  # sent, so curl did not wait out its 1 s timer
    assert json.loads(answer)["msao"]["status"] == "ok"
    assert float(seconds) < 0.9  # generous for a loaded machine; measured well under 100 ms (docs/http.md)


def test_keep_alive_serves_several_requests_on_one_connection(intake, easyvqa_test):
    conn = http.client.HTTPConnection("127.0.0.1", intake.port, timeout=15)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        assert first.status == 200 and json.loads(first.read())["live"] is True
        sock = conn.sock
        conn.request("POST", CHAT, body=json.dumps(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]))))
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read())["msao"]["status"] == "ok"
        assert conn.sock is sock  # the same TCP connection
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
    assert (status, body) == (200, {"live": True, "ready": True})


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
            answers = [("msao_http_responses_total", labels) for labels in (
                chat, frozenset({("route", "/healthz"), ("code", "200")}), frozenset({("route", "other"), ("code", "404")}),
                frozenset({("route", CHAT), ("code", "400")}))]  # fmt: skip
            scrapes: list[dict] = []

            def counted() -> bool:  # each answer is counted just after it is sent, on its connection's thread
                scrapes.append(samples(scrape("127.0.0.1", listener.port)[2]))
                return all(scrapes[-1].get(k, 0.0) > before.get(k, 0.0) for k in answers)

            assert poll_until(counted, 10, poll_s=0.05)
            after = scrapes[-1]
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
    status, _, body = http_call(intake, "GET", "/v2/models")
    assert_error(status, body, 404, "not_found", "no such endpoint")
    status, resp, body = http_call(intake, "GET", CHAT)
    assert_error(status, body, 405, "method_not_allowed", "takes POST")
    assert resp.getheader("Allow") == "POST"
    assert http_call(intake, "DELETE", "/healthz")[0] == 405


def test_server_header_does_not_reveal_python(intake):
    _, resp, _ = http_call(intake, "GET", "/healthz")
    assert resp.getheader("Server") == "msao-edge"


# -- the OpenAI surface and access -------------------------------------------------------------------


def test_models_lists_the_edge_and_large_models_with_their_hashes(intake, runtime):
    status, _, body = http_call(intake, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    listed = {m["id"]: m for m in body["data"]}
    assert set(listed) == {runtime.edge.name, runtime.large.name}
    assert listed[runtime.edge.name]["msao"] == {"role": "edge", "model_hash": runtime.edge.manifest.model_hash, "served_on": "edge"}
    assert listed[runtime.large.name]["msao"]["model_hash"] == runtime.large.manifest.model_hash
    assert all(m["object"] == "model" and m["owned_by"] == "msao" for m in body["data"])


def streamed_chunks(port: int, body: dict, timeout_s: float = 15) -> list[dict]:
    """POST a ``stream: true`` chat body: its chunks, once the stream ended with ``[DONE]``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", CHAT, body=json.dumps(body))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        events = [e for e in resp.read().decode().split("\n\n") if e]
    finally:
        conn.close()
    assert events[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def test_stream_true_sends_the_answer_as_server_sent_chunks_then_done(intake, easyvqa_test):
    i = colour_questions(easyvqa_test, 1)[0]
    body = chat_body(easyvqa_test.questions[i], data_uri(easyvqa_test.image_pngs[easyvqa_test.image_ids[i]]), stream=True,
                     stream_options={"include_usage": True})  # fmt: skip
    chunks = streamed_chunks(intake.port, body)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == easyvqa_test.answers[i]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["msao"]["status"] == "ok"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1


def test_n_over_1_is_refused_clearly(intake, easyvqa_test):
    status, _, body = http_call(intake, "POST", CHAT, chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]), n=2))
    assert_error(status, body, 400, "bad_request", "one (greedy) answer")


def test_an_api_key_guards_the_v1_routes_but_not_the_probes(runtime, easyvqa_test):
    key = "s3cret-key-123"
    with HttpIntake(runtime, "127.0.0.1", 0, HttpOptions(api_key=key)) as h:
        for headers in ({}, {"Authorization": "Bearer wrong-key-000"}, {"Authorization": key}):
            status, resp, body = http_call(h, "GET", "/v1/models", headers=headers)
            assert_error(status, body, 401, "unauthorized", "API key")
            assert resp.getheader("WWW-Authenticate") == "Bearer"
        assert http_call(h, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})[0] == 200
        good = chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]))
        assert http_call(h, "POST", CHAT, good, {"Authorization": f"Bearer {key}"})[0] == 200
        assert http_call(h, "POST", CHAT, good)[0] == 401
        assert http_call(h, "GET", "/healthz")[0] == 200 and http_call(h, "GET", "/readyz")[0] == 200


def test_cors_preflights_and_answers_name_only_the_allowed_origins(runtime):
    with HttpIntake(runtime, "127.0.0.1", 0, HttpOptions(cors_origins=("http://ui.local:3000",))) as h:
        status, resp, _ = http_call(h, "OPTIONS", CHAT, headers={"Origin": "http://ui.local:3000", "Access-Control-Request-Method": "POST"})
        assert status == 204
        assert resp.getheader("Access-Control-Allow-Origin") == "http://ui.local:3000"
        assert "POST" in resp.getheader("Access-Control-Allow-Methods")
        assert "Authorization" in resp.getheader("Access-Control-Allow-Headers")
        _, resp, _ = http_call(h, "GET", "/v1/models", headers={"Origin": "http://ui.local:3000"})
        assert resp.getheader("Access-Control-Allow-Origin") == "http://ui.local:3000"
        _, resp, _ = http_call(h, "GET", "/v1/models", headers={"Origin": "http://evil.example"})
        assert resp.getheader("Access-Control-Allow-Origin") is None
    with pytest.raises(ConfigError, match="without a path"):
        HttpOptions(cors_origins=("http://ui.local/app",))


def test_bound_before_the_models_load_it_says_503_loading_until_served(runtime, easyvqa_test):
    with HttpIntake(None, "127.0.0.1", 0) as h:
        status, resp, body = http_call(h, "GET", "/readyz")
        assert (status, body) == (503, {"ready": False, "reason": "loading models"}) and resp.getheader("Retry-After") == "5"
        assert http_call(h, "GET", "/healthz") [0] == 200
        good = chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]))
        status, _, body = http_call(h, "POST", CHAT, good)
        assert_error(status, body, 503, "unavailable", "loading its models")
        h.serve(runtime)
        assert http_call(h, "GET", "/readyz")[0] == 200 and http_call(h, "POST", CHAT, good)[0] == 200
