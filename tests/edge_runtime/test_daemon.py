"""`msao edge` as a process, with a real broker, a real `msao cloud` worker and a shaped, cuttable link.

The daemon is a time-dilated edge (``EdgeDaemon(dilation=k)``: each piece of its compute is held
k times as long), a Jetson several times slower than the cloud, so the scheduler has a real
reason to offload when the link is fast and to stay local when it is slow. Dilation, unlike a
cgroup quota, keeps the edge k times slower than the worker however loaded the machine is, so
a busy CI run cannot flip a placement verdict; and it needs no root. Requests come over MQTT (``EdgeClient``, ``msao ask``) and HTTP.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from msao.cloud_bridge.mqtt_options import ClientOptions
from msao.edge_runtime.edge_client import EdgeClient
from testbed import (
    EdgeDaemon,
    LinkShape,
    ShapingProxy,
    free_port,
    poll_until,
    start_broker,
    start_workers,
    stop_all,
)
from tests.test_prometheus import scraped

ROOT = Path(__file__).resolve().parents[2]
EDGE_DILATION = 10.0  # the daemon is ten times slower than the worker (the same model on both sides)


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cloud_bundle_dir: Path, metrics_port: int):
    root = tmp_path_factory.mktemp("daemon")
    broker = start_broker(root / "broker")
    workers = start_workers(broker.url, cloud_bundle_dir, root, count=1)
    proxy = ShapingProxy("127.0.0.1", broker.port).start()
    edge_id = "jetson-" + uuid.uuid4().hex[:6]
    http_port = free_port()
    env = {**os.environ, "MSAO_RUNTIME_PROBE_INTERVAL_S": "1", "MSAO_RUNTIME_WORKERS": "1"}
    # The large model on both sides: every plan is equally accurate, so placement is decided by
    # latency alone, which is what this module tests (docs/scheduler.md).
    args = [
        "--broker", f"mqtt://127.0.0.1:{proxy.port}", "--edge-id", edge_id, "--http", f"127.0.0.1:{http_port}",
        "--metrics", f"127.0.0.1:{metrics_port}",
        "--bundle", str(cloud_bundle_dir), "--large-bundle", str(cloud_bundle_dir), "--calibration", "", "--keepalive-s", "5",
    ]  # fmt: skip
    daemon = EdgeDaemon(args, root / "edge.log", http_port, env, dilation=EDGE_DILATION)
    client = EdgeClient(ClientOptions(broker.url, EdgeClient.new_client_id()), edge_id).start()
    try:
        daemon.wait_ready()
        yield broker, workers, proxy, daemon, client, edge_id
    finally:
        client.close()
        daemon.stop()
        stop_all(workers)
        proxy.stop()
        broker.stop()


def _png(data, i):
    return data.image_pngs[data.image_ids[i]]


def test_ready_and_collaborative_once_the_worker_is_online(setup):
    *_, daemon, _, _ = setup
    end = time.monotonic() + 30
    while time.monotonic() < end:
        _, body = daemon.get("/readyz")
        if body["mode"] == "collaborative":
            break
        time.sleep(0.2)
    assert body["mode"] == "collaborative" and not body["degraded"], body
    assert body["edge_scale"] >= 1.0


def _wait_for_measured_link(daemon: EdgeDaemon, timeout_s: float = 30.0) -> dict:
    """Until the daemon has seen the worker and measured the link (its probes run every second here)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        _, body = daemon.get("/readyz")
        if body["mode"] == "collaborative" and body["link"]["measured"]:
            return body
        time.sleep(0.2)
    pytest.fail(f"link never measured: {body}")


def test_a_fast_link_offloads_and_a_slow_one_keeps_work_on_the_slow_edge(setup, easyvqa_test):
    _, _, proxy, daemon, client, _ = setup
    proxy.set_shape(LinkShape())
    _wait_for_measured_link(daemon)
    # Ten times the worker's compute against a loopback round trip: offloading wins by about 9x the
    # compute, and a loaded machine slows both sides alike, so the ratio holds.
    fast = [client.ask(_png(easyvqa_test, i), easyvqa_test.questions[i], deadline_ms=20_000).response for i in range(8)]
    assert all(r.status == "ok" for r in fast), fast
    offloaded = [r.answered_by == "cloud" and r.plan.split(" ")[0] in ("cloud", "split", "draft_verify") for r in fast[-4:]]
    assert sum(offloaded) >= 3, [(r.plan, r.answered_by, r.reason) for r in fast]  # (not all: a busy machine slows the worker too)
    proxy.set_shape(LinkShape(delay_ms=250))  # 500 ms RTT: every cloud plan now costs more than the slow edge
    slow = [client.ask(_png(easyvqa_test, i), easyvqa_test.questions[i], deadline_ms=20_000).response for i in range(6, 14)]
    assert all(r.status == "ok" for r in slow), slow
    kinds = [r.plan.split(" ")[0] for r in slow]
    assert all(k in ("edge", "local_large") for k in kinds[-3:]), kinds  # once the estimate has seen the new RTT, work stays local
    assert all(r.bytes_up == 0 for r in slow[-3:])
    rtt = float(slow[-1].reason.split("link rtt ")[1].split(" ms")[0])
    assert rtt > 100, slow[-1].reason  # the choice follows the measured link, as its reason says
    proxy.set_shape(LinkShape())


def test_answers_over_mqtt_and_http_agree_and_are_right(setup, easyvqa_test):
    *_, daemon, client, _ = setup
    colour = [i for i in range(200) if easyvqa_test.questions[i] == "what color is the shape?"][:3]
    for i in colour:
        m = client.ask(_png(easyvqa_test, i), easyvqa_test.questions[i], deadline_ms=20_000, policy="edge_only").response
        body = {
            "model": "msao",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": easyvqa_test.questions[i]},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png(easyvqa_test, i)).decode()}},
            ]}],
            "msao": {"policy": "edge_only", "deadline_ms": 20_000},
        }  # fmt: skip
        c = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=30)
        c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        h = json.loads(c.getresponse().read())
        c.close()
        assert m.answer == h["choices"][0]["message"]["content"] == easyvqa_test.answers[i]


def test_msao_ask_through_the_daemon_prints_the_answer_and_its_plan(setup, easyvqa_test, tmp_path):
    broker, *_, edge_id = setup
    img = tmp_path / "q.png"
    img.write_bytes(_png(easyvqa_test, 0))
    r = subprocess.run(
        [sys.executable, "-m", "msao", "ask", "--broker", broker.url, "--edge-id", edge_id, "--image", str(img),
         "--question", easyvqa_test.questions[0], "--deadline-ms", "20000", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "ok" and out["plan"] and out["reason"] and out["answer"]


class RawAsker:
    """Publishes arbitrary payloads to the daemon's request topic and waits for the answer by correlation id."""

    def __init__(self, broker_url: str, edge_id: str):
        from msao.cloud_bridge.client import BridgeClient

        self.topic = f"msao/v1/edge/{edge_id}/request"
        self.reply = f"msao/v1/edge/{edge_id}/response/raw-{uuid.uuid4().hex[:6]}"
        self.got: dict[str, bytes] = {}
        self.client = BridgeClient(ClientOptions(broker_url, "raw-" + uuid.uuid4().hex[:8]), self._on)
        self.client.subscribe(self.reply)
        self.client.start()
        assert self.client.wait_connected(10)

    def _on(self, msg) -> None:
        self.got[(msg.correlation_data or b"").decode()] = bytes(msg.payload)

    def ask(self, payload: bytes, props: tuple[tuple[str, str], ...] = (), wait_s: float = 30.0) -> dict:
        cid = uuid.uuid4().hex[:12]
        self.client.publish(
            self.topic, payload, response_topic=self.reply, correlation_data=cid.encode(), user_properties=props, timeout_s=60
        )
        end = time.monotonic() + wait_s
        while cid not in self.got and time.monotonic() < end:
            time.sleep(0.01)
        assert cid in self.got, f"no answer to a {len(payload)}-byte request"
        return json.loads(self.got.pop(cid))


def _json(question="what color is the shape?", image: bytes | None = None, **kw) -> bytes:
    doc = {"question": question, "image": base64.b64encode(image or b"").decode(), **kw}
    return json.dumps(doc).encode()


def test_bad_requests_each_get_an_error_naming_the_problem_and_the_daemon_keeps_serving(setup, easyvqa_test):
    import io

    from PIL import Image

    broker, *_, edge_id = setup
    good = _png(easyvqa_test, 0)
    big = io.BytesIO()
    Image.new("L", (8000, 6250), 0).save(big, format="PNG")  # 50 megapixels in a 50 KB file
    asker = RawAsker(broker.url, edge_id)
    try:
        cases = [
            (b"{not json", (), "bad_request", "not JSON"),
            (json.dumps({"image": base64.b64encode(good).decode()}).encode(), (), "bad_request", "question"),
            (_json(image=b"\x89PNG but not really"), (), "bad_image", "image"),
            (_json(image=big.getvalue()), (), "bad_image", "pixels"),
            (b"\xff" * (100 * 1024 * 1024), (("question", "what?"),), "too_large", "over the limit"),
            (_json(image=good, deadline_ms=0), (), "deadline", "deadline"),
            (_json(image=good, deadline_ms=-5), (), "deadline", "deadline"),
            ('{"question": "caf\u00e9", "image": "'.encode() + b"\xc3\x28" + b'"}', (), "bad_request", "UTF-8"),
            (good, (), "bad_request", "question"),  # raw image without a question property
        ]
        for payload, props, code, words in cases:
            r = asker.ask(payload, props)
            assert r["status"] == "error" and r["error_code"] == code and words in r["error"], (payload[:40], r)
        stream = asker.ask(_json(image=good, stream="never-seen-before"))  # an unknown stream is a new one
        assert stream["status"] == "ok" and stream["answer"]
        again = asker.ask(_json(image=good, stream="never-seen-before"))  # same frame again: the encoder is skipped
        assert again["status"] == "ok" and again["answer"] == stream["answer"]
    finally:
        asker.client.stop()
    ok = setup[4].ask(good, easyvqa_test.questions[0], deadline_ms=20_000).response
    assert ok.status == "ok"


def test_metrics_listener_counts_what_was_served_by_intake(setup, metrics_port, easyvqa_test, cloud_bundle_dir):
    *_, daemon, client, _ = setup
    before = scraped(metrics_port)
    assert client.ask(_png(easyvqa_test, 0), easyvqa_test.questions[0], deadline_ms=20_000, policy="edge_only").response.status == "ok"
    assert client.ask(_png(easyvqa_test, 1), easyvqa_test.questions[1], deadline_ms=20_000, policy="cloud_only").response.status == "ok"
    c = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=30)
    c.request("POST", "/v1/chat/completions", "{", {"Content-Type": "application/json"})  # refused at intake: 400
    assert c.getresponse().status == 400
    c.close()
    after = scraped(metrics_port)

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("msao_intake_requests_total", source="mqtt") == 2 and delta("msao_intake_requests_total", source="http") == 1
    assert delta("msao_requests_total", plan="edge", outcome="ok") == 1
    answered = ("msao_http_responses_total", frozenset({("route", "/v1/chat/completions"), ("code", "400")}))  # counted once sent
    assert poll_until(lambda: scraped(metrics_port).get(answered, 0.0) == before.get(answered, 0.0) + 1, 10, poll_s=0.05)
    published = ("msao_mqtt_intake_events_total", frozenset({("event", "published")}))  # counted just after the publish returns
    assert poll_until(lambda: scraped(metrics_port).get(published, 0.0) == before.get(published, 0.0) + 2, 10, poll_s=0.05)
    assert delta("msao_requests_total", plan="cloud", outcome="ok") == 1
    assert any(name == "msao_request_seconds_bucket" for name, _ in after)
    model_hash = json.loads((cloud_bundle_dir / "manifest.json").read_text())["model_hash"]
    roles = {dict(labels)["role"]: dict(labels) for name, labels in after if name == "msao_model_info"}
    assert roles["edge"]["model_hash"] == roles["large"]["model_hash"] == model_hash
    assert [dict(labels)["process"] for name, labels in after if name == "msao_build_info"] == ["edge"]
    assert ("process_resident_memory_bytes", frozenset()) in after
    for conn in ("link", "intake"):  # both MQTT connections of the daemon report their events
        assert after[("msao_mqtt_client_events_total", frozenset({("client", conn), ("event", "connects")}))] >= 1
    status, body = daemon.get("/metrics")  # not on the unauthenticated chat listener
    assert status == 404 and "--metrics" in body["error"]["message"]


def test_metrics_port_in_use_fails_before_the_models_load(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        # the bundle does not exist: a daemon that loaded models before binding would complain about it instead
        r = subprocess.run(
            [sys.executable, "-m", "msao", "edge", "--metrics", f"127.0.0.1:{port}", "--bundle", str(tmp_path / "none")],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert f"127.0.0.1:{port}" in r.stderr and "pick another --metrics (edge.metrics) HOST:PORT" in r.stderr
    assert "Traceback" not in r.stderr and "bundle" not in r.stderr.lower()


def test_sigterm_stops_the_daemon_cleanly(setup):
    *_, daemon, _, _ = setup
    assert daemon.stop() == 0
    assert "edge runtime up" in daemon.log()
