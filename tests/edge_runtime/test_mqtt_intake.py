"""The MQTT intake against real parts: Mosquitto on a free port, the exported edge bundle in a real
EdgeRuntime (edge-only, no cloud), real easy-VQA images, paho and the mosquitto command-line clients.

Runtimes that are built but not yet started stand in for a daemon whose workers are all busy:
requests are admitted into the queue and wait there, which makes "queued when the daemon stops"
and "in progress when a copy arrives" deterministic instead of a race against a 3 ms model.
"""

from __future__ import annotations

import base64
import json
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.mqtt_options import ClientOptions
from msao.cloud_bridge.topics import edge_request_topic, edge_response_topic, edge_status_topic
from msao.edge_runtime.mqtt_intake import IntakeOptions, MqttIntake, intake_client_id, response_topic_problem
from msao.edge_runtime.requests import RequestLimits
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions
from msao.errors import ConfigError
from testbed import Broker, EdgeDaemon, free_port

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "mqtt-api.md"
SCHEMAS = ROOT / "docs" / "schemas"
WAIT_S = 15.0


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edge_model(models):
    return models[0]


@dataclass(frozen=True)
class Sample:
    question: str
    answer: str
    png: bytes

    def json_request(self, request_id: str | None = None, **extra) -> dict:
        doc = {"question": self.question, "image": base64.b64encode(self.png).decode("ascii"), **extra}
        if request_id is not None:
            doc["request_id"] = request_id
        return doc


@pytest.fixture(scope="module")
def colour_samples(easyvqa_test) -> list[Sample]:
    """Colour questions only: the tiny models answer those (almost) always right, so answers can be compared."""
    d = easyvqa_test
    out = []
    for i, q in enumerate(d.questions):
        if q.startswith(("what color is the", "what is the color of the")):
            out.append(Sample(q, d.answers[i], d.image_pngs[int(d.image_ids[i])]))
        if len(out) == 12:
            return out
    raise AssertionError("easy-VQA test split has fewer than 12 colour questions")


def _runtime(model, *, start: bool = True, **options) -> EdgeRuntime:
    opts = dict(workers=1, queue_size=8, probe_interval_s=0.0, drain_s=0.05)
    rt = EdgeRuntime(model, None, link=None, calibration=None, options=RuntimeOptions(**{**opts, **options}))
    return rt.start() if start else rt


class Served:
    """A runtime plus an intake on a fresh edge id; ``close`` stops both in the daemon's order."""

    def __init__(self, broker: Broker, runtime: EdgeRuntime, edge_id: str | None = None, **intake_kw):
        self.edge_id = edge_id or "e-" + uuid.uuid4().hex[:10]
        self.runtime = runtime
        self.intake = MqttIntake(runtime, ClientOptions(broker.url, "replaced"), self.edge_id, **intake_kw).start()
        assert self.intake.wait_ready(10), f"intake for {self.edge_id} did not connect and subscribe to {broker.url}"

    def close(self) -> None:
        self.runtime.stop()
        self.intake.stop()


# -- a requester: plain paho, so every MQTT 5 property of a response can be checked ----------


@dataclass(frozen=True)
class Got:
    topic: str
    correlation_data: bytes | None
    content_type: str | None
    raw: bytes
    retained: bool = False

    @property
    def body(self) -> dict:
        return json.loads(self.raw)


class Requester:
    def __init__(self, broker: Broker, *topics: str):
        import paho.mqtt.client as mqtt

        self.got: list[Got] = []
        self._cond = threading.Condition()
        self._subacks = threading.Semaphore(0)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="req-" + uuid.uuid4().hex[:8], protocol=mqtt.MQTTv5)
        c.on_message = self._on_message
        c.on_subscribe = lambda *_a: self._subacks.release()
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        for t in topics:
            c.subscribe(t, qos=1)
        for t in topics:
            assert self._subacks.acquire(timeout=10), f"no SUBACK for {t}"
        self.c = c

    def _on_message(self, client, userdata, msg) -> None:
        p = msg.properties
        corr = getattr(p, "CorrelationData", None)
        got = Got(
            msg.topic, bytes(corr) if corr is not None else None, getattr(p, "ContentType", None), bytes(msg.payload), bool(msg.retain)
        )
        with self._cond:
            self.got.append(got)
            self._cond.notify_all()

    def publish(
        self, topic: str, payload: bytes | str, *, response_topic=None, correlation_data=None, user=(), retain=False, expiry_s=None
    ) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        p = Properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            p.MessageExpiryInterval = expiry_s
        if response_topic is not None:
            p.ResponseTopic = response_topic
        if correlation_data is not None:
            p.CorrelationData = correlation_data
        if user:
            p.UserProperty = list(user)
        info = self.c.publish(topic, payload, qos=1, retain=retain, properties=p)
        info.wait_for_publish(5)
        assert info.is_published(), f"the broker did not acknowledge a request on {topic}"

    def wait(self, pred: Callable[[list[Got]], bool], timeout_s: float = WAIT_S) -> list[Got]:
        end = time.monotonic() + timeout_s
        with self._cond:
            while not pred(self.got):
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; got {len(self.got)} responses: {[g.raw[:200] for g in self.got]}")
                self._cond.wait(left)
            return list(self.got)

    def wait_count(self, n: int, timeout_s: float = WAIT_S) -> list[Got]:
        return self.wait(lambda g: len(g) >= n, timeout_s)

    def settle(self, quiet_s: float = 0.3) -> list[Got]:
        """All responses once none arrived for ``quiet_s`` (to check that no extra copy comes)."""
        while True:
            with self._cond:
                n = len(self.got)
            time.sleep(quiet_s)
            with self._cond:
                if len(self.got) == n:
                    return list(self.got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _wait_until(cond: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "condition") -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _by_id(got: list[Got]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for g in got:
        out.setdefault(g.body["request_id"], []).append(g.body)
    return out


# -- the JSON schemas of docs/schemas, checked with a small validator (jsonschema is not a dependency) --

_KEYWORDS = {"$schema", "$id", "title", "description", "type", "required", "additionalProperties", "properties", "enum",
             "const", "pattern", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "allOf", "if", "then"}  # fmt: skip
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(schema: dict, value, path: str = "$") -> list[str]:
    """Draft 2020-12 errors for the keywords our schemas use; an unsupported keyword fails loudly."""
    unknown = set(schema) - _KEYWORDS
    assert not unknown, f"the test's validator does not know {unknown} (at {path}); extend it or install jsonschema"
    errs: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_TYPES[t](value) for t in types):
            return [f"{path}: {value!r:.60} is not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r:.60} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path}: {value!r:.60} != {schema['const']!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", float("inf")):
            errs.append(f"{path}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{path}: {value!r:.60} does not match {schema['pattern']}")
    if _TYPES["number"](value):
        if value < schema.get("minimum", float("-inf")) or value > schema.get("maximum", float("inf")):
            errs.append(f"{path}: {value} out of [{schema.get('minimum')}, {schema.get('maximum')}]")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errs.append(f"{path}: {value} <= {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errs += [f"{path}: missing {k!r}" for k in schema.get("required", ()) if k not in value]
        for k, v in value.items():
            if k in props:
                errs += schema_errors(props[k], v, f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errs.append(f"{path}: unexpected key {k!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errs += schema_errors(schema["additionalProperties"], v, f"{path}.{k}")
    for sub in schema.get("allOf", ()):
        if "if" in sub:
            if not schema_errors(sub["if"], value, path):
                errs += schema_errors(sub.get("then", {}), value, path)
        else:
            errs += schema_errors(sub, value, path)
    return errs


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    out = {}
    for name in ("edge-request", "edge-response"):
        s = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
        assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert f"schemas/{name}.schema.json" in DOC.read_text(), f"docs/mqtt-api.md does not reference {name}.schema.json"
        out[name] = s
    return out


def _valid_response(schemas, body: dict) -> dict:
    errs = schema_errors(schemas["edge-response"], body)
    assert not errs, f"response does not match docs/schemas/edge-response.schema.json: {errs}"
    return body


def _doc_command(marker: str, broker: Broker, edge_id: str) -> str:
    """The bash block after ``<!-- example: marker -->`` in docs/mqtt-api.md, pointed at the test broker."""
    m = re.search(rf"<!-- example: {marker} -->\s*```bash\n(.*?)```", DOC.read_text(), re.S)
    assert m, f"docs/mqtt-api.md has no `<!-- example: {marker} -->` bash block"
    cmd = m.group(1)
    assert "-h localhost -p 1883" in cmd and "jetson-1" in cmd, f"the {marker} example changed form: {cmd}"
    return cmd.replace("-h localhost -p 1883", f"-h 127.0.0.1 -p {broker.port}").replace("jetson-1", edge_id)


# -- tests ----------------------------------------------------------------------------------


def test_json_requests_are_answered_with_the_dataset_answer_on_the_asked_topic(broker, edge_model, colour_samples, schemas):
    s = Served(broker, _runtime(edge_model))
    mine = f"clients/{uuid.uuid4().hex[:8]}/answers"
    req = Requester(broker, mine, edge_response_topic(s.edge_id))
    try:
        samples = colour_samples[:4]
        for i, sample in enumerate(samples[:3]):
            doc = sample.json_request(f"json-{i}", deadline_ms=20000)
            assert not schema_errors(schemas["edge-request"], doc)
            req.publish(edge_request_topic(s.edge_id), json.dumps(doc), response_topic=mine, correlation_data=f"corr-{i}".encode())
        # no ResponseTopic, no CorrelationData, no request_id: default topic, new id echoed as correlation data
        req.publish(edge_request_topic(s.edge_id), json.dumps(samples[3].json_request()))
        got = req.wait_count(4)
        for i, sample in enumerate(samples[:3]):
            (g,) = [g for g in got if g.correlation_data == f"corr-{i}".encode()]
            body = _valid_response(schemas, g.body)
            assert (g.topic, g.content_type) == (mine, "application/json")
            assert (body["request_id"], body["status"], body["error_code"]) == (f"json-{i}", "ok", "")
            assert body["answer"] == sample.answer, f"{sample.question!r}: got {body['answer']!r}, dataset says {sample.answer!r}"
            assert body["answered_by"] == "edge" and body["timings_ms"]["total"] > 0
        (g,) = [g for g in got if g.topic == edge_response_topic(s.edge_id)]
        body = _valid_response(schemas, g.body)
        assert g.correlation_data == body["request_id"].encode() and body["answer"] == samples[3].answer
        _wait_until(lambda: s.intake.counters().acked == 4, what="4 requests acknowledged after their answers")
        c = s.intake.counters()
        assert (c.requests_in, c.published, c.parse_errors, c.duplicates) == (4, 4, 0, 0)
    finally:
        req.close()
        s.close()


def test_raw_png_with_the_question_in_a_user_property_as_documented_for_mosquitto_pub(
    broker, edge_model, colour_samples, schemas, tmp_path
):
    assert shutil.which("mosquitto_pub"), "mosquitto_pub is not installed (Debian package mosquitto-clients)"
    sample = next(x for x in colour_samples if x.question == "what color is the shape?")
    (tmp_path / "shape.png").write_bytes(sample.png)
    s = Served(broker, _runtime(edge_model))
    req = Requester(broker, edge_response_topic(s.edge_id))
    try:
        subprocess.run(["bash", "-c", _doc_command("mosquitto_pub", broker, s.edge_id)], cwd=tmp_path, check=True, timeout=30)
        # the same form from Python, with a deadline and a stream id as user properties
        user = [("question", sample.question), ("deadline_ms", "20000"), ("stream", "cam-1")]
        req.publish(edge_request_topic(s.edge_id), sample.png, correlation_data=b"py-raw", user=user)
        got = req.wait_count(2)
        for g in got:
            body = _valid_response(schemas, g.body)
            assert body["status"] == "ok" and body["answer"] == sample.answer, body
        assert {g.correlation_data for g in got} == {b"pub-1", b"py-raw"}
        assert {g.body["request_id"] for g in got} >= {"pub-1", "py-raw"}
    finally:
        req.close()
        s.close()


def test_mosquitto_rr_run_as_documented_gets_a_valid_answer(broker, edge_model, colour_samples, schemas, tmp_path):
    assert shutil.which("mosquitto_rr"), "mosquitto_rr is not installed (Debian package mosquitto-clients)"
    sample = next(x for x in colour_samples if x.question == "what color is the shape?")
    (tmp_path / "shape.png").write_bytes(sample.png)
    s = Served(broker, _runtime(edge_model))
    try:
        cmd = _doc_command("mosquitto_rr", broker, s.edge_id)
        assert cmd.startswith("mosquitto_rr -V 5 ") and f"-t msao/v1/edge/{s.edge_id}/request -e msao/v1/edge/{s.edge_id}/response" in cmd
        out = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, timeout=40)
        assert out.returncode == 0, f"mosquitto_rr failed ({out.returncode}): {out.stderr.decode(errors='replace')}"
        body = _valid_response(schemas, json.loads(out.stdout))
        assert (body["request_id"], body["status"], body["answer"]) == ("rr-1", "ok", sample.answer)
    finally:
        s.close()


def test_bad_requests_get_an_error_naming_the_problem_and_the_intake_keeps_serving(broker, edge_model, colour_samples, schemas):
    limits = RequestLimits(max_payload_bytes=4096, max_context_bytes=256)
    s = Served(broker, _runtime(edge_model), limits=limits)
    mine = f"clients/{uuid.uuid4().hex[:8]}/answers"
    default = edge_response_topic(s.edge_id)
    req = Requester(broker, mine, default)
    sample = colour_samples[0]
    b64 = base64.b64encode(sample.png).decode()
    # name, payload, user properties, response topic, expected error code, words the error must contain
    cases = [
        ("not_json", b'{"question": "what color?", "image": ', (), mine, "bad_request", "not JSON"),
        ("no_question", json.dumps({"image": b64}), (), mine, "bad_request", "question"),
        ("empty_question", json.dumps({"question": "  ", "image": b64}), (), mine, "bad_request", "question"),
        ("not_base64", json.dumps({"question": "what color?", "image": "***not base64***"}), (), mine, "bad_image", "base64"),
        ("not_utf8", b'{"question": "what \xff\xfe color?", "image": "' + b64.encode() + b'"}', (), mine, "bad_request", "UTF-8"),
        ("too_large", json.dumps({"question": "q?", "image": b64 + "A" * 5000}), (), mine, "too_large", "over the limit of 4096"),
        ("deadline_zero", json.dumps(sample.json_request(deadline_ms=0)), (), mine, "deadline", "deadline"),
        ("deadline_negative", json.dumps(sample.json_request(deadline_ms=-50)), (), mine, "deadline", "in the past"),
        ("wildcard_topic", json.dumps(sample.json_request()), (), "clients/+/answers", "bad_request", "wildcard"),
        ("raw_no_question", sample.png, (), mine, "bad_request", "question"),
        ("raw_typo_property", sample.png, (("qustion", "what color?"),), mine, "bad_request", "question is missing"),
        ("raw_json_only_property", sample.png, (("question", "what color?"), ("split_layer", "1")), mine, "bad_request", "JSON form"),
        ("wrong_type_known_key", json.dumps(sample.json_request(deadline_ms="5000")), (), mine, "bad_request", "deadline_ms must be"),
        ("context_too_large", json.dumps(sample.json_request(context=["x" * 100] * 3)), (), mine, "bad_request", "context is 310 bytes"),
        ("raw_too_large", sample.png + b"\0" * 5000, (("question", "what color?"),), mine, "too_large", "over the limit"),
        ("bad_request_id", json.dumps(sample.json_request("no spaces allowed")), (), mine, "bad_request", "request id"),
        ("not_an_image", json.dumps({"question": "what color?", "image": base64.b64encode(b"hello, not a png").decode()}), (),
         mine, "bad_image", "image"),
    ]  # fmt: skip
    try:
        for name, payload, user, topic, _code, _words in cases:
            req.publish(edge_request_topic(s.edge_id), payload, response_topic=topic, correlation_data=name.encode(), user=user)
        got = req.wait_count(len(cases))
        for name, _payload, _user, topic, code, words in cases:
            copies = [g for g in got if g.correlation_data == name.encode()]
            assert len(copies) == 1, f"{name}: {len(copies)} responses"
            g = copies[0]
            body = _valid_response(schemas, g.body)
            assert g.topic == (default if "+" in topic else topic), f"{name}: answered on {g.topic}"
            assert (body["status"], body["error_code"]) == ("error", code), f"{name}: {body}"
            assert words.lower() in body["error"].lower(), f"{name}: error {body['error']!r} does not mention {words!r}"
        # the JSON schema refuses what the intake refuses (for the cases a schema can see)
        for name in ("no_question", "empty_question", "deadline_zero", "deadline_negative", "bad_request_id", "wrong_type_known_key"):
            payload = next(c[1] for c in cases if c[0] == name)
            assert schema_errors(schemas["edge-request"], json.loads(payload)), f"{name} passes the request schema"
        # ... and the intake still serves
        req.publish(edge_request_topic(s.edge_id), json.dumps(sample.json_request("after-errors")), response_topic=mine)
        (g,) = [
            g
            for g in req.wait(lambda got: any(x.correlation_data == b"after-errors" for x in got))
            if g.correlation_data == b"after-errors"
        ]
        assert (g.body["status"], g.body["answer"]) == ("ok", sample.answer)
        c = s.intake.counters()
        assert c.parse_errors == len(cases) - 1  # all but not_an_image, which only the worker's decoder can tell
        assert c.requests_in == len(cases) + 1
    finally:
        req.close()
        s.close()


def test_a_flooded_daemon_answers_busy_at_once_and_every_request_exactly_once(broker, edge_model, colour_samples, schemas):
    # one worker, one queue slot, workers not yet running: the first request waits, the rest are busy
    rt = _runtime(edge_model, start=False, workers=1, queue_size=1)
    s = Served(broker, rt)
    req = Requester(broker, edge_response_topic(s.edge_id))
    n = 6
    try:
        for i in range(n):
            req.publish(edge_request_topic(s.edge_id), json.dumps(colour_samples[i].json_request(f"flood-{i}")))
        busy = req.wait_count(n - 1)
        assert all(_valid_response(schemas, g.body)["status"] == "busy" and g.body["error_code"] == "busy" for g in busy)
        assert "retry later" in busy[0].body["error"]
        rt.start()
        got = req.wait_count(n)
        got = req.settle()
        answers = _by_id(got)
        assert sorted(answers) == [f"flood-{i}" for i in range(n)]
        assert all(len(v) == 1 for v in answers.values()), "a request was answered more than once"
        (ok,) = [v[0] for v in answers.values() if v[0]["status"] == "ok"]
        assert ok["request_id"] == "flood-0" and ok["answer"] == colour_samples[0].answer
        c = s.intake.counters()
        assert (c.refused, c.published) == (n - 1, n)
    finally:
        req.close()
        s.close()


def test_requests_unanswered_at_stop_are_redelivered_to_the_restarted_daemon_and_answered_once(broker, edge_model, colour_samples, schemas):
    edge_id = "e-" + uuid.uuid4().hex[:10]
    req = Requester(broker, edge_response_topic(edge_id))
    opts = IntakeOptions(session_expiry_s=60, drain_s=0.2)
    try:
        # 1. a daemon answers one request, which is therefore acknowledged and never comes back
        first = Served(broker, _runtime(edge_model), edge_id, options=opts)
        assert first.intake.client.options.client_id == intake_client_id(edge_id) == f"msao-edge-{edge_id}-intake"
        req.publish(edge_request_topic(edge_id), json.dumps(colour_samples[0].json_request("early")))
        req.wait_count(1)
        _wait_until(lambda: first.intake.counters().acked == 1, what="the early request's ack")
        first.close()
        # 2. a daemon takes four requests but stops before serving them (they stay unacknowledged)
        stalled = Served(broker, _runtime(edge_model, start=False), edge_id, options=opts)
        late = [f"late-{i}" for i in range(4)]
        for i, rid in enumerate(late, start=1):
            req.publish(edge_request_topic(edge_id), json.dumps(colour_samples[i].json_request(rid)))
        _wait_until(lambda: stalled.intake.counters().requests_in == 4, what="4 requests delivered to the stalled daemon")
        stalled.close()
        assert [g.body["request_id"] for g in req.settle()] == ["early"], "the stalled daemon answered something"
        assert stalled.intake.counters().acked == 0
        # 3. the restarted daemon (same edge id, same session) gets exactly the unanswered ones again
        restarted = Served(broker, _runtime(edge_model), edge_id, options=opts)
        try:
            req.wait_count(1 + len(late))
            answers = _by_id(req.settle())
            assert sorted(answers) == sorted(["early", *late])
            assert all(len(v) == 1 for v in answers.values()), f"answered more than once: {answers}"
            for i, rid in enumerate(late, start=1):
                body = _valid_response(schemas, answers[rid][0])
                assert (body["status"], body["answer"]) == ("ok", colour_samples[i].answer)
            c = restarted.intake.counters()
            assert c.requests_in == len(late), f"the restarted daemon got {c.requests_in} requests, not the {len(late)} unanswered"
            _wait_until(lambda: restarted.intake.counters().acked == len(late), what="acks of the redelivered requests")
        finally:
            restarted.close()
    finally:
        req.close()


def test_a_repeated_request_id_is_computed_once_and_each_copy_gets_the_same_response(broker, edge_model, colour_samples, schemas):
    rt = _runtime(edge_model, start=False)
    s = Served(broker, rt)
    req = Requester(broker, edge_response_topic(s.edge_id))
    payload = json.dumps(colour_samples[0].json_request("dup-1"))
    try:
        # two copies while the first is still queued: the second waits for the first's answer
        req.publish(edge_request_topic(s.edge_id), payload, correlation_data=b"copy-a")
        req.publish(edge_request_topic(s.edge_id), payload, correlation_data=b"copy-b")
        _wait_until(lambda: s.intake.counters().requests_in == 2, what="both copies delivered")
        assert req.got == []
        rt.start()
        got = req.wait_count(2)
        # a third copy after the answer: sent from memory
        req.publish(edge_request_topic(s.edge_id), payload, correlation_data=b"copy-c")
        got = req.wait_count(3)
        got = req.settle()
        assert sorted(g.correlation_data for g in got) == [b"copy-a", b"copy-b", b"copy-c"]
        assert len({g.raw for g in got}) == 1, "copies of one request got different responses"
        body = _valid_response(schemas, got[0].body)
        assert (body["request_id"], body["status"], body["answer"]) == ("dup-1", "ok", colour_samples[0].answer)
        assert rt.metrics.requests.value(plan="edge", outcome="ok") == 1, "the request was computed more than once"
        c = s.intake.counters()
        assert (c.requests_in, c.duplicates, c.published) == (3, 2, 3)
        _wait_until(lambda: s.intake.counters().acked == 3, what="all three copies acknowledged")
    finally:
        req.close()
        s.close()


def test_retained_messages_on_the_request_topic_are_not_answered(broker, edge_model, colour_samples):
    edge_id = "e-" + uuid.uuid4().hex[:10]
    req = Requester(broker, edge_response_topic(edge_id))
    req.publish(edge_request_topic(edge_id), json.dumps(colour_samples[0].json_request("stale")), retain=True)
    s = Served(broker, _runtime(edge_model), edge_id)
    try:
        _wait_until(lambda: s.intake.counters().ignored == 1, what="the retained request to be ignored")
        assert req.settle() == []
    finally:
        s.close()
        req.publish(edge_request_topic(edge_id), b"", retain=True)  # clear the retained message
        req.close()


@pytest.mark.parametrize(
    "topic, problem",
    [
        ("a/b/c", ""),
        ("msao/v1/edge/other-edge/response", ""),  # allowed here: ACLs are the broker's job
        ("", "empty"),
        ("a/+/c", "wildcard"),
        ("a/#", "wildcard"),
        ("$SYS/x", "reserved"),
        ("a" * 257, "over the limit"),
        ("a\x00b", "NUL"),
    ],
)
def test_response_topic_rules(topic, problem):
    got = response_topic_problem(topic)
    assert (problem in got) if problem else got == ""


def test_intake_options_refuse_a_session_that_cannot_be_resumed():
    with pytest.raises(ConfigError, match="session_expiry_s must be >= 1"):
        IntakeOptions(session_expiry_s=0)
    with pytest.raises(ConfigError, match="resume_session needs session_expiry_s > 0"):
        ClientOptions("mqtt://127.0.0.1:1883", "x", resume_session=True)


# -- BridgeClient's manual ack, across a real connection loss (a TCP relay the test can cut) ----


class Relay:
    """A loopback TCP relay to the broker; ``cut`` drops every relayed connection (both ends)."""

    def __init__(self, upstream_port: int):
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._upstream = upstream_port
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._server.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self._upstream))
            with self._lock:
                self._socks += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._server.close()
        self.cut()


def test_manual_ack_goes_only_to_the_connection_the_message_came_on_and_unacked_messages_come_back(broker):
    relay = Relay(broker.port)
    got: queue.Queue = queue.Queue()
    topic = f"t/ack/{uuid.uuid4().hex[:8]}"
    opts = ClientOptions(f"mqtt://127.0.0.1:{relay.port}", "t-ack-" + uuid.uuid4().hex[:8], session_expiry_s=60,
                         manual_ack=True, resume_session=True, reconnect_min_s=0.5, reconnect_max_s=1.0)  # fmt: skip
    client = BridgeClient(opts, got.put)
    client.subscribe(topic, qos=1)
    client.start()
    req = Requester(broker)
    try:
        assert client.wait_subscribed(10)
        req.publish(topic, b"m1")
        first = got.get(timeout=5)
        assert (first.payload, first.qos) == (b"m1", 1) and first.mid is not None
        relay.cut()  # the connection drops before the owner is done with m1
        _wait_until(lambda: client.counters.connects == 2 and client.connected, what="the client to reconnect")
        again = got.get(timeout=10)  # the broker redelivers what was not acknowledged, on the new connection
        assert again.payload == b"m1" and again.connection != first.connection
        assert client.ack(first) is False and client.counters.acks_skipped == 1, "an ack crossed into a newer connection"
        assert client.ack(again) is True
        time.sleep(0.2)  # let the PUBACK reach the broker before cutting again
        relay.cut()
        _wait_until(lambda: client.counters.connects == 3 and client.connected, what="the second reconnect")
        with pytest.raises(queue.Empty):
            got.get(timeout=0.5)  # acknowledged: not redelivered
        req.c.publish(topic, b"q0", qos=0).wait_for_publish(5)
        q0 = got.get(timeout=5)
        assert (q0.qos, q0.mid) == (0, None) and client.ack(q0) is False  # nothing to acknowledge at QoS 0
    finally:
        client.stop()
        req.close()
        relay.close()


# -- integrators: tolerated extra keys, context, message expiry, readiness status with a Last Will --


def _states(got: list[Got]) -> list[str]:
    """The status states seen, consecutive repeats folded (a reconnect republishes the same state)."""
    out: list[str] = []
    for g in got:
        state = g.body["state"]
        if not out or out[-1] != state:
            out.append(state)
    return out


def test_unknown_keys_and_properties_are_ignored_and_the_context_comes_back_unchanged(broker, edge_model, colour_samples, schemas):
    s = Served(broker, _runtime(edge_model))
    req = Requester(broker, edge_response_topic(s.edge_id))
    topic = edge_request_topic(s.edge_id)
    sample = colour_samples[0]
    context = {"flow": "cam-1", "seq": [1, 2.5, None, True], "note": "\u00fcn\u00efcode", "n": 12345678901234567890}
    # what a Node-RED function node leaves in: its message id, topic and payload besides the request's keys
    node_red = sample.json_request("ctx-json", _msgid="a1b2c3d4.e5f6a7", topic="camera/front", payload={"x": 1}, context=context)
    user = [("question", sample.question), ("request_id", "ctx-raw"), ("_msgid", "a1b2c3d4.e5f6a7"), ("x-node-red", "1")]
    try:
        assert not schema_errors(schemas["edge-request"], node_red), "the request schema refuses extra keys or a context"
        req.publish(topic, json.dumps(node_red))
        req.publish(topic, sample.png, user=user)
        # a known key of the wrong type is still refused, and its context still comes back
        req.publish(topic, json.dumps(sample.json_request("ctx-bad", stream=5, context=context)))
        req.publish(topic, json.dumps(sample.json_request("ctx-none")))
        by = {g.body["request_id"]: _valid_response(schemas, g.body) for g in req.wait_count(4)}
        ok = by["ctx-json"]
        assert (ok["status"], ok["answer"], ok["context"]) == ("ok", sample.answer, context)
        assert ok["context"]["n"] == 12345678901234567890, "a big integer did not come back exactly"
        assert (by["ctx-raw"]["status"], by["ctx-raw"]["answer"], by["ctx-raw"]["context"]) == ("ok", sample.answer, None)
        bad = by["ctx-bad"]
        assert (bad["status"], bad["error_code"], bad["context"]) == ("error", "bad_request", context)
        assert "stream must be a string" in bad["error"]
        assert by["ctx-none"]["context"] is None and "context" in by["ctx-none"]
    finally:
        req.close()
        s.close()


def test_the_message_expiry_interval_caps_the_deadline_of_a_request_that_waited(broker, edge_model, colour_samples, schemas):
    rt = _runtime(edge_model, start=False)  # the workers are "busy": both requests wait in the queue
    s = Served(broker, rt)
    req = Requester(broker, edge_response_topic(s.edge_id))
    try:
        req.publish(edge_request_topic(s.edge_id), json.dumps(colour_samples[0].json_request("exp-2s", deadline_ms=60000)), expiry_s=2)
        req.publish(edge_request_topic(s.edge_id), json.dumps(colour_samples[1].json_request("exp-none", deadline_ms=60000)))
        _wait_until(lambda: s.intake.counters().requests_in == 2, what="both requests delivered")
        time.sleep(2.5)  # the condition is the clock itself: past the 2 s expiry, well within the 60 s deadline
        rt.start()
        by = {g.body["request_id"]: _valid_response(schemas, g.body) for g in req.wait_count(2)}
        late = by["exp-2s"]
        assert (late["status"], late["error_code"], late["answer"]) == ("error", "deadline", ""), late
        m = re.search(r"deadline of (\d+) ms passed while queued", late["error"])
        assert m and 0 < int(m.group(1)) <= 2000, f"the deadline was not capped by the 2 s expiry: {late['error']!r}"
        fresh = by["exp-none"]
        assert (fresh["status"], fresh["answer"]) == ("ok", colour_samples[1].answer)
    finally:
        req.close()
        s.close()


def test_requests_held_while_starting_are_served_once_ready_unless_expired_and_the_status_follows(
    broker, edge_model, colour_samples, schemas
):
    edge_id = "e-" + uuid.uuid4().hex[:10]
    status = Requester(broker, edge_status_topic(edge_id))
    req = Requester(broker, edge_response_topic(edge_id))
    intake = MqttIntake(None, ClientOptions(broker.url, "replaced"), edge_id).start()  # the daemon is "loading its models"
    rt = None
    try:
        assert intake.wait_ready(10)
        (first,) = status.wait_count(1)
        assert {k: first.body[k] for k in ("edge_id", "state", "ready", "mode")} == {
            "edge_id": edge_id, "state": "starting", "ready": False, "mode": ""}  # fmt: skip
        req.publish(edge_request_topic(edge_id), json.dumps(colour_samples[0].json_request("held-1s")), expiry_s=1)
        req.publish(edge_request_topic(edge_id), json.dumps(colour_samples[1].json_request("held-fresh", context={"k": 7})))
        _wait_until(lambda: intake.counters().held == 2, what="both requests held while starting")
        time.sleep(1.5)  # past the first one's expiry, still starting
        assert req.got == [], "a request was answered before the runtime served"
        rt = _runtime(edge_model)
        intake.serve(rt)
        by = {g.body["request_id"]: _valid_response(schemas, g.body) for g in req.wait_count(2)}
        assert (by["held-1s"]["error_code"], by["held-1s"]["answer"]) == ("deadline", "")
        assert "MessageExpiryInterval" in by["held-1s"]["error"]
        assert (by["held-fresh"]["status"], by["held-fresh"]["answer"], by["held-fresh"]["context"]) == (
            "ok", colour_samples[1].answer, {"k": 7})  # fmt: skip
        online = status.wait(lambda g: g[-1].body["state"] == "online")[-1].body
        assert (online["ready"], online["mode"]) == (True, "edge-only")
        late = Requester(broker, edge_status_topic(edge_id))  # a subscriber that comes later gets the retained status
        try:
            (g,) = late.wait_count(1)
            assert g.retained and g.body["state"] == "online"
        finally:
            late.close()
        _wait_until(lambda: intake.counters().acked == 2, what="both held requests acknowledged")
        c = intake.counters()
        assert (c.held, c.requests_in, c.expired, c.published) == (2, 2, 1, 2)
        rt.stop()
        intake.stop()
        got = status.wait(lambda g: g[-1].body["state"] == "offline")
        assert _states(got) == ["starting", "online", "stopping", "offline"]
        assert got[-1].body["updated_unix_s"] > 0, "a clean stop published the Last Will instead of its own offline status"
    finally:
        if rt is not None:
            rt.stop()
        intake.stop()
        status.close()
        req.close()


def test_the_last_will_says_offline_when_the_connection_dies_and_a_reconnect_says_online_again(broker, edge_model):
    relay = Relay(broker.port)
    edge_id = "e-" + uuid.uuid4().hex[:10]
    status = Requester(broker, edge_status_topic(edge_id))
    rt = _runtime(edge_model)
    options = ClientOptions(f"mqtt://127.0.0.1:{relay.port}", "replaced", reconnect_min_s=0.5, reconnect_max_s=1.0)
    intake = MqttIntake(rt, options, edge_id).start()
    try:
        status.wait(lambda g: bool(g) and g[-1].body["state"] == "online")
        relay.cut()  # no DISCONNECT: the broker publishes the Last Will
        will = status.wait(lambda g: "offline" in _states(g))
        offline = next(g.body for g in will if g.body["state"] == "offline")
        assert (offline["ready"], offline["mode"], offline["updated_unix_s"]) == (False, "", 0.0), offline
        again = status.wait(lambda g: _states(g)[-1] == "online" and "offline" in _states(g))
        assert _states(again) == ["online", "offline", "online"]
        assert again[-1].body["ready"] and again[-1].body["mode"] == "edge-only"
    finally:
        rt.stop()
        intake.stop()
        status.close()
        relay.close()


def test_an_edge_only_daemon_publishes_its_readiness_and_its_last_will_when_killed(broker, edge_bundle_dir, tmp_path):
    edge_id = "e-" + uuid.uuid4().hex[:10]
    status = Requester(broker, edge_status_topic(edge_id))
    http_port = free_port()
    args = ["--broker", broker.url, "--edge-id", edge_id, "--http", f"127.0.0.1:{http_port}", "--bundle", str(edge_bundle_dir),
            "--large-bundle", "", "--calibration", ""]  # fmt: skip
    daemon = EdgeDaemon(args, tmp_path / "edge.log", http_port)
    try:
        daemon.wait_ready()
        got = status.wait(lambda g: bool(g) and g[-1].body["state"] == "online", timeout_s=60)
        assert set(_states(got)) <= {"starting", "online"}, _states(got)
        assert (got[-1].body["ready"], got[-1].body["mode"]) == (True, "edge-only")
        daemon.kill()  # SIGKILL: nothing announced; the broker speaks for it
        got = status.wait(lambda g: g[-1].body["state"] == "offline", timeout_s=30)
        assert got[-1].body["updated_unix_s"] == 0, "the offline status after SIGKILL is not the Last Will"
        n = len(got)
        daemon = daemon.restarted(tmp_path / "edge-2.log")
        daemon.wait_ready()
        status.wait(lambda g: g[-1].body["state"] == "online", timeout_s=60)
        assert daemon.stop() == 0
        got = status.wait(lambda g: g[-1].body["state"] == "offline", timeout_s=30)
        assert "online" in _states(got[n:]) and got[-1].body["updated_unix_s"] > 0, "a clean stop did not publish its own offline status"
    finally:
        daemon.stop()
        status.close()


def test_the_cloud_link_leaves_the_edge_status_to_the_intake_when_told_so(broker):
    from msao.cloud_bridge.link import CloudLink, LinkOptions

    edge_id = "e-" + uuid.uuid4().hex[:10]
    status = Requester(broker, edge_status_topic(edge_id))
    try:
        # what `msao edge` runs beside its MQTT intake: a link that publishes no status and sets no Last Will
        quiet = CloudLink(LinkOptions(edge_id, ClientOptions(broker.url, f"quiet-{edge_id}"), publish_status=False)).start(timeout_s=10)
        assert quiet.client.connected and quiet.client.options.will_topic is None
        quiet.close()
        # the link alone (the intake switched off) still announces the edge
        loud = CloudLink(LinkOptions(edge_id, ClientOptions(broker.url, f"loud-{edge_id}"))).start(timeout_s=10)
        status.wait(lambda g: "online" in _states(g))
        loud.close()
        got = status.wait(lambda g: _states(g)[-1] == "offline")
        assert _states(got) == ["online", "offline"] and len(got) == 2, f"the quiet link published a status: {[g.body for g in got]}"
    finally:
        status.close()
