"""The corpus against real processes: Mosquitto, an `msao cloud` worker and an `msao edge` daemon (unthrottled).

Every wire-level case is sent over MQTT (and the HTTP ones over HTTP); each gets the error answer
its manifest names (or, where the protocol has no one to answer, is dropped with a log line).
Afterwards both processes are alive, answer a good request, logged no traceback, and their
memory stayed bounded: peak RSS (VmHWM) over the whole corpus at most ``RSS_PEAK_GROWTH_MB`` above
the RSS before it, RSS after at most ``RSS_KEPT_GROWTH_MB`` above it, and ``REPEATS`` more rounds of
the heaviest cases (bombs, oversize, deep JSON) grow RSS by at most ``RSS_REPEAT_GROWTH_MB`` (no
leak per message). Both run with small payload limits (``tests/corpus/corpus.py``), which is what
keeps the memory one message may take small. All of it takes about 8 s.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from msao.cloud_bridge.chunking import CHUNK_PROPERTY
from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.codec import payload_from_tensors, tensors_from_payload
from msao.cloud_bridge.messages import ResultHeader
from msao.cloud_bridge.mqtt_options import ClientOptions
from msao.cloud_bridge.topics import edge_request_topic, edge_response_topic, worker_job_topic
from msao.engines.bundle import load_bundle
from msao.errors import MsaoError
from testbed import CloudWorker, EdgeDaemon, free_port, open_link, start_broker, start_workers, wait_online
from tests.corpus.corpus import FAR_DEADLINE_UNIX_S, JOB_MAX_PAYLOAD_BYTES, PLACEHOLDER_HASH, REQUEST_MAX_PAYLOAD_BYTES, Case
from tests.corpus.corpus import load_cases as _load_all
from tests.corpus.make_corpus import GOOD_B64, Q

ROOT = Path(__file__).resolve().parents[2]
RSS_PEAK_GROWTH_MB = 96  # peak RSS during the corpus, above the RSS before it
RSS_KEPT_GROWTH_MB = 64  # RSS after the corpus, above the RSS before it
RSS_REPEAT_GROWTH_MB = 16  # RSS growth from the 2nd to the last of REPEATS rounds of the heaviest cases (a leak grows per round)
REPEATS = 5
WINDOW = 16  # messages in flight at once (the daemon's and worker's queues hold 64)
ANSWER_S = 30.0  # every answer of a batch within this


def load_cases(target: str) -> list[Case]:
    return [c for c in _load_all(target) if c.runs_here]


def _bundles(request) -> tuple[Path, Path]:
    """The built bundles (`make export`) if they load, else the session fixtures' fresh exports."""
    edge, cloud = ROOT / "bundles" / "msao-tiny-edge", ROOT / "bundles" / "msao-tiny-cloud"
    try:
        load_bundle(edge), load_bundle(cloud)
        return edge, cloud
    except MsaoError:  # missing or stale (BundleError): export them (slower)
        return request.getfixturevalue("edge_bundle_dir"), request.getfixturevalue("cloud_bundle_dir")


def _rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Wire:
    """One MQTT client that sends cases and collects answers by CorrelationData."""

    def __init__(self, broker_url: str, *topics: str):
        self.got: queue.Queue = queue.Queue()
        self.answers: dict[bytes, object] = {}
        self.client = BridgeClient(ClientOptions(broker_url, "corpus-" + uuid.uuid4().hex[:8]), self.got.put)
        for t in topics:
            self.client.subscribe(t)
        self.client.start()
        assert self.client.wait_subscribed(10), f"corpus client could not subscribe at {broker_url}"

    def send_all(self, sends: list[tuple[bytes, Callable[[], None]]], expect: set[bytes]) -> dict[bytes, object]:
        """Run each send (at most WINDOW answers outstanding); return the answers to ``expect`` by correlation."""
        out: dict[bytes, object] = {}
        waiting: set[bytes] = set()
        end = time.monotonic() + ANSWER_S + len(sends) * 0.05
        for corr, send in sends:
            while len(waiting) >= WINDOW and time.monotonic() < end:
                self._take(out, waiting, 0.5)
            send()
            if corr in expect:
                waiting.add(corr)
        while waiting and time.monotonic() < end:
            self._take(out, waiting, 0.5)
        return out

    def _take(self, out: dict, waiting: set, timeout_s: float) -> None:
        try:
            msg = self.got.get(timeout=timeout_s)
        except queue.Empty:
            return
        corr = msg.correlation_data or b""
        out[corr] = msg
        waiting.discard(corr)

    def close(self) -> None:
        self.client.stop()


@dataclass
class Parts:
    broker: object
    worker: CloudWorker
    daemon: EdgeDaemon
    edge_id: str
    model_hash: str
    edge_wire: Wire
    job_wire: Wire
    edge_reply: str
    job_reply: str
    rss_before: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def parts(request, tmp_path_factory):
    edge_bundle, cloud_bundle = _bundles(request)
    root = tmp_path_factory.mktemp("corpus-live")
    broker = start_broker(root / "broker")
    mb = JOB_MAX_PAYLOAD_BYTES / (1 << 20)
    (worker,) = start_workers(broker.url, cloud_bundle, root, extra=("--max-payload-mb", repr(mb), "--queue-size", "64"))
    edge_id = "corpus-" + uuid.uuid4().hex[:6]
    port = free_port()
    env = {**os.environ, "MSAO_RUNTIME_LIMITS_MAX_PAYLOAD_BYTES": str(REQUEST_MAX_PAYLOAD_BYTES), "MSAO_RUNTIME_PROBE_INTERVAL_S": "1"}
    args = ["--broker", broker.url, "--edge-id", edge_id, "--http", f"127.0.0.1:{port}", "--bundle", str(edge_bundle),
            "--large-bundle", str(cloud_bundle), "--calibration", "", "--queue-size", "64"]  # fmt: skip
    daemon = EdgeDaemon(args, root / "edge.log", port, env)  # unthrottled: these tests are about input, not speed
    edge_reply = f"msao/v1/edge/{edge_id}/response/corpus"
    job_reply = f"msao/v1/edge/corpus-{uuid.uuid4().hex[:6]}/cloud/results"
    edge_wire = job_wire = None
    try:
        daemon.wait_ready()
        model_hash = load_bundle(cloud_bundle).manifest.model_hash
        link = open_link(broker.url)
        wait_online(link, [worker])
        link.close()
        edge_wire = Wire(broker.url, edge_reply, edge_response_topic(edge_id))
        job_wire = Wire(broker.url, job_reply)
        p = Parts(broker, worker, daemon, edge_id, model_hash, edge_wire, job_wire, edge_reply, job_reply)
        _assert_serving(p)  # warm: first requests load sessions and caches
        _assert_serving(p)
        for name, pid in (("worker", worker.pid), ("daemon", daemon.pid)):
            p.rss_before[name] = _rss(pid)[0]
        yield p
    finally:
        for w in (edge_wire, job_wire):
            if w is not None:
                w.close()
        daemon.stop()
        worker.stop()
        broker.stop()


# -- good requests ------------------------------------------------------------------------------


def _good_job(model_hash: str, job_id: str) -> bytes:
    md = {"job_id": job_id, "model_hash": model_hash, "kind": "split", "deadline_unix_s": repr(FAR_DEADLINE_UNIX_S),
          "segment": "decoder[3:4]", "layout": "1"}  # fmt: skip
    feeds = {
        "hidden_states": np.ones((1, 2, 128), np.float32),
        "position_ids": np.arange(2)[None],
        "attention_mask": np.ones((1, 2), np.int64),
    }
    return payload_from_tensors(feeds, md)


def _assert_serving(p: Parts) -> None:
    """A good request over MQTT, one over HTTP and a good job each get an ok answer."""
    cid = ("good-" + uuid.uuid4().hex[:8]).encode()
    doc = json.dumps({"question": Q, "image": GOOD_B64, "deadline_ms": 30000}).encode()
    got = p.edge_wire.send_all([(cid, lambda: _publish_edge(p, doc, cid))], {cid})
    assert cid in got, f"no answer to a good MQTT request; daemon log:\n{p.daemon.log()[-3000:]}"
    body = json.loads(bytes(got[cid].payload))
    assert body["status"] == "ok" and body["answer"], body
    status, body = _post_chat(p, json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": Q}, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + GOOD_B64}}]}],
        "msao": {"deadline_ms": 30000}}).encode())  # fmt: skip
    assert status == 200 and body["choices"][0]["message"]["content"], body
    jid = "good-" + uuid.uuid4().hex[:8]
    got = p.job_wire.send_all([(jid.encode(), lambda: _publish_job(p, _good_job(p.model_hash, jid), jid.encode()))], {jid.encode()})
    res = _result(got.get(jid.encode()))
    assert res is not None and res.status == "ok", f"{res}; worker log:\n{p.worker.log()[-3000:]}"


# -- sending ------------------------------------------------------------------------------------


def _publish_edge(p: Parts, payload: bytes, corr: bytes, props=(), response_topic: str | None = None) -> None:
    p.edge_wire.client.publish(edge_request_topic(p.edge_id), payload, response_topic=response_topic or p.edge_reply,
                               correlation_data=corr, user_properties=tuple(props), timeout_s=30)  # fmt: skip


def _publish_job(p: Parts, payload: bytes, corr: bytes | None, response_topic: str | None = "", props=()) -> None:
    topic = p.job_reply if response_topic == "" else response_topic
    p.job_wire.client.publish(worker_job_topic(p.worker.worker_id, p.model_hash), payload, response_topic=topic, correlation_data=corr,
                              expiry_s=30, user_properties=tuple(props), timeout_s=30)  # fmt: skip


def _post_chat(p: Parts, body: bytes) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", p.daemon.http_port, timeout=30)
    try:
        c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:  # not JSON: reported by the caller as a wrong answer
            return r.status, {"error": {"message": raw[:300].decode("utf-8", "replace"), "code": None}}
    finally:
        c.close()


def _result(msg) -> ResultHeader | None:
    return None if msg is None else ResultHeader.from_metadata(tensors_from_payload(msg.payload).metadata)


def _corr(case: Case, prefix: str = "") -> bytes:
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{prefix}{case.target}-{case.name}")[:64].encode()


def _check_edge_answers(got: dict, expected: list[tuple[bytes, Case, str, str]]) -> list[str]:
    problems = []
    for corr, case, code, match in expected:
        msg = got.get(corr)
        if msg is None:
            problems.append(f"{case.id}: no answer")
            continue
        body = json.loads(bytes(msg.payload))
        if (body["status"], body["error_code"]) != ("error", code) or not re.search(match, body["error"], re.IGNORECASE):
            problems.append(f"{case.id}: expected {code} /{match}/, got {body['status']} {body['error_code']}: {body['error'][:200]}")
    return problems


def _check_job_answers(got: dict, expected: list[tuple[bytes, Case, str, str]]) -> list[str]:
    problems = []
    for corr, case, code, match in expected:
        res = _result(got.get(corr))
        if res is None:
            problems.append(f"{case.id}: no result")
        elif (res.status, res.error_code) != ("error", code) or not re.search(match, res.error, re.IGNORECASE):
            problems.append(f"{case.id}: expected {code} /{match}/, got {res.status} {res.error_code}: {res.error[:200]}")
    return problems


# -- the corpus over the wire ----------------------------------------------------------------------


def test_edge_requests_over_mqtt_each_get_their_error(parts: Parts):
    sends, expected = [], []
    for case in load_cases("edge_request"):
        corr = _corr(case)
        sends.append((corr, lambda c=case, k=corr: _publish_edge(parts, c.data, k, c["properties"])))
        expected.append((corr, case, case["code"], case["match"]))
    for case in load_cases("image"):
        corr = _corr(case)
        sends.append((corr, lambda c=case, k=corr: _publish_edge(parts, c.data, k, (("question", Q),))))
        expected.append((corr, case, case["codes"]["edge"], case["match"]))
    t0 = time.monotonic()
    got = parts.edge_wire.send_all(sends, {corr for corr, *_ in expected})
    problems = _check_edge_answers(got, expected)
    assert not problems, f"{len(problems)} of {len(expected)} wrong ({time.monotonic() - t0:.1f} s):\n" + "\n".join(problems[:40])


def test_ids_and_response_topics_over_mqtt_are_refused(parts: Parts):
    sends, expected = [], []
    for case in load_cases("topic"):
        if not case["wire"] or case["kind"] == "hash":
            continue
        corr = _corr(case)
        if case["kind"] == "id":
            doc = json.dumps({"question": Q, "image": GOOD_B64, "request_id": case["value"]}).encode()
            sends.append((corr, lambda d=doc, k=corr: _publish_edge(parts, d, k)))
            expected.append((corr, case, "bad_request", "request id"))
        else:  # answered on the edge's default response topic, with our CorrelationData
            doc = json.dumps({"question": Q, "image": GOOD_B64}).encode()
            sends.append((corr, lambda d=doc, k=corr, t=case["value"]: _publish_edge(parts, d, k, response_topic=t)))
            expected.append((corr, case, "bad_request", case["match"]))
    got = parts.edge_wire.send_all(sends, {corr for corr, *_ in expected})
    problems = _check_edge_answers(got, expected)
    wrong_topic = [c.id for corr, c, *_ in expected if corr in got and c["kind"] == "response_topic" and got[corr].topic != edge_response_topic(parts.edge_id)]  # fmt: skip
    assert not problems and not wrong_topic, "\n".join(problems[:40] + wrong_topic)


def test_http_chat_bodies_each_get_their_status_and_code(parts: Parts):
    problems = []
    cases = [(c, c.data, c["status"], c["code"]) for c in load_cases("http_chat")]
    cases += [(c, json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": Q}, {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + __import__("base64").b64encode(c.data).decode()}}]}]}).encode(), 400, c["codes"]["http"])
        for c in load_cases("image")]  # fmt: skip
    for case, body, status, code in cases:
        got, doc = _post_chat(parts, body)
        err = doc.get("error") or {}
        if got != status or err.get("code") != code or not re.search(case["match"], err.get("message", ""), re.IGNORECASE):
            problems.append(f"{case.id}: expected {status} {code} /{case['match']}/, got {got} {err}")
    assert not problems, f"{len(problems)} of {len(cases)} wrong:\n" + "\n".join(problems[:40])


def _raw_http(port: int, data: bytes, half_close: bool) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        try:
            while chunk := s.recv(65536):
                buf += chunk
        except ConnectionResetError:  # the server closed with our unread bytes; its answer came first
            pass
    head, _, body = buf.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    return (int(m.group(1)) if m else 0), body


def test_raw_http_requests_each_get_their_status(parts: Parts):
    problems = []
    for case in load_cases("http_raw"):
        status, body = _raw_http(parts.daemon.http_port, case.data, case["half_close"])
        text = body.decode("utf-8", "replace")
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if status != case["status"] or code != case["code"] or not re.search(case["match"], text, re.IGNORECASE):
            problems.append(f"{case.id}: expected {case['status']} {case['code']} /{case['match']}/, got {status} {code}: {text[:200]}")
    assert not problems, "\n".join(problems)


def test_jobs_each_get_their_error_result_or_are_dropped(parts: Parts):
    sends, expected, drops = [], [], []
    for case in load_cases("job"):
        data = case.data.replace(PLACEHOLDER_HASH.encode(), parts.model_hash.encode()) if case["needs_model_hash"] else case.data
        if case.get("drop"):
            corr = None if case["correlation_hex"] is None else bytes.fromhex(case["correlation_hex"])
            topic = None if case["response_topic"] is None else case["response_topic"].replace("REPLY", parts.job_reply)
            sends.append((b"", lambda d=data, k=corr, t=topic: _publish_job(parts, d, k, t)))
            drops.append(case)
            continue
        corr = case["job_id"].encode()
        sends.append((corr, lambda d=data, k=corr: _publish_job(parts, d, k)))
        expected.append((corr, case, case["code"], case["match"]))
    for case in load_cases("image"):
        jid = _corr(case, "img-")
        md = {"job_id": jid.decode(), "model_hash": parts.model_hash, "kind": "answer", "deadline_unix_s": repr(FAR_DEADLINE_UNIX_S),
              "question": Q, "layout": "1"}  # fmt: skip
        data = payload_from_tensors({"image": np.frombuffer(case.data, np.uint8)}, md)
        sends.append((jid, lambda d=data, k=jid: _publish_job(parts, d, k)))
        expected.append((jid, case, case["codes"]["worker"], case["match"]))
    for case in load_cases("topic"):
        if case["kind"] == "hash":  # a header naming an invalid model hash
            jid = _corr(case)
            md = {"job_id": jid.decode(), "model_hash": case["value"], "kind": "split", "deadline_unix_s": repr(FAR_DEADLINE_UNIX_S),
                  "segment": "decoder[3:4]", "layout": "1"}  # fmt: skip
            sends.append((jid, lambda d=payload_from_tensors({}, md), k=jid: _publish_job(parts, d, k)))
            expected.append((jid, case, "bad_job", "model_hash"))
        elif case["kind"] == "id" or (case["kind"] == "response_topic" and case["match"] == "wildcard"):  # no one to answer
            corr = case["value"].encode() if case["kind"] == "id" else _corr(case)
            topic = "" if case["kind"] == "id" else parts.job_reply + "/" + case["value"]
            sends.append((b"", lambda d=_good_job(parts.model_hash, "corpus-topic"), k=corr, t=topic: _publish_job(parts, d, k, t)))
            drops.append(case)
    log_before = parts.worker.log().count("dropped a message on")
    got = parts.job_wire.send_all(sends, {corr for corr, *_ in expected})
    problems = _check_job_answers(got, expected)
    assert not problems, f"{len(problems)} of {len(expected)} wrong:\n" + "\n".join(problems[:40])
    _assert_serving(parts)  # the good job after them is answered, so every drop before it was handled
    dropped = parts.worker.log().count("dropped a message on") - log_before
    assert dropped >= len(drops), f"{dropped} drops logged for {len(drops)} cases: {[c.id for c in drops]}"
    assert not set(got) - {corr for corr, *_ in expected}, "a dropped job got an answer"


def test_bad_chunks_are_dropped_and_the_worker_keeps_serving(parts: Parts):
    before = parts.worker.log().count("dropped a chunk on")
    sends, bad = [], 0
    for i, case in enumerate(c for c in load_cases("chunk") if c["wire"]):
        corr = f"chunk-{i}".encode()
        for chunk in case["chunks"]:
            props = ((CHUNK_PROPERTY, chunk["property"]),)
            sends.append((corr, lambda n=chunk["bytes"], k=corr, pr=props: _publish_job(parts, bytes(n), k, props=pr)))
        bad += 1
    got = parts.job_wire.send_all(sends, set())
    _assert_serving(parts)
    assert not got, f"answers to chunks that should have been dropped: {list(got)}"
    assert parts.worker.log().count("dropped a chunk on") - before >= bad


def _heavy_round(p: Parts, r: int) -> None:
    """The cases that allocate most, once more: bombs, oversize payloads, deep JSON, undecodable images."""
    heavy = re.compile(r"bomb|oversize|over_limit|too_large|recursion|wide_|big_|huge|deep|z_|random")
    edge = [c for c in load_cases("edge_request") + load_cases("image") if heavy.search(c.name)]
    sends, expect = [], set()
    for c in edge:
        corr = _corr(c, f"r{r}-")
        sends.append((corr, lambda c=c, k=corr: _publish_edge(p, c.data, k, c.get("properties") or (("question", Q),))))
        expect.add(corr)
    p.edge_wire.send_all(sends, expect)
    sends, expect = [], set()
    for c in load_cases("job"):
        if heavy.search(c.name) and not c.get("drop"):
            corr = f"r{r}-{c['job_id']}"[:64].encode()
            data = c.data.replace(PLACEHOLDER_HASH.encode(), p.model_hash.encode()) if c["needs_model_hash"] else c.data
            sends.append((corr, lambda d=data, k=corr: _publish_job(p, d, k)))
            expect.add(corr)
    p.job_wire.send_all(sends, expect)
    for c in load_cases("http_chat"):
        if heavy.search(c.name):
            _post_chat(p, c.data)


def test_repeating_the_heaviest_cases_does_not_grow_memory(parts: Parts):
    after = []
    for r in range(REPEATS):
        _heavy_round(parts, r)
        after.append({"worker": _rss(parts.worker.pid)[0], "daemon": _rss(parts.daemon.pid)[0]})
    for name in ("worker", "daemon"):
        rounds = [f"{a[name]:.1f}" for a in after]
        print(f"{name}: RSS after each of {REPEATS} heavy rounds: {rounds} MB")
        assert after[-1][name] - after[1][name] <= RSS_REPEAT_GROWTH_MB, f"{name} grows per round: {rounds} MB"


def test_both_processes_survive_the_corpus_with_bounded_memory(parts: Parts):
    _assert_serving(parts)
    report = []
    for name, proc, log in (("worker", parts.worker.process, parts.worker.log()), ("daemon", parts.daemon.process, parts.daemon.log())):
        assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{log[-3000:]}"
        assert "Traceback" not in log, f"{name} logged a traceback:\n{log[log.index('Traceback') - 500 :][:4000]}"
        rss, peak = _rss(proc.pid)
        before = parts.rss_before[name]
        report.append(f"{name}: RSS {before:.0f} MB before, {rss:.0f} MB after, peak {peak:.0f} MB")
        assert peak - before <= RSS_PEAK_GROWTH_MB and rss - before <= RSS_KEPT_GROWTH_MB, "; ".join(report)
    print("; ".join(report))
