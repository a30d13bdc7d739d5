"""The MQTT client wrapper against a real broker: NODELAY, guarded callbacks, watchdog, reconnect, bounded queue, TLS."""

from __future__ import annotations

import queue
import shutil
import subprocess
import time
import uuid

import numpy as np
import pytest

from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.link import CloudLink, LinkOptions, new_job_id
from msao.cloud_bridge.messages import JobHeader
from msao.cloud_bridge.mqtt_options import BrokerUrl, ClientOptions, TlsOptions
from msao.errors import CloudUnavailable, ConfigError
from testbed import free_port, start_broker


def _client(url: str, handler, **kw) -> BridgeClient:
    c = BridgeClient(ClientOptions(url, "t-" + uuid.uuid4().hex[:8], **kw), handler)
    return c


def _wait(cond, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_socket_has_tcp_nodelay_and_small_round_trips_are_fast(broker):
    got: queue.Queue = queue.Queue()
    c = _client(broker.url, got.put)
    c.subscribe("t/echo")
    c.start()
    try:
        assert c.wait_subscribed(10) and c.tcp_nodelay
        rtts = []
        for _ in range(20):
            t0 = time.perf_counter()
            c.publish("t/echo", b"x" * 1000)
            got.get(timeout=5)
            rtts.append(time.perf_counter() - t0)
        assert sorted(rtts)[10] < 0.030  # with Nagle + delayed ACK a 1 KB round trip stalls ~40 ms
    finally:
        c.stop()


def test_an_exception_in_a_callback_is_logged_and_the_loop_keeps_running(broker, caplog):
    got = []

    def handler(msg):
        got.append(msg.payload)
        if msg.payload == b"boom":
            raise RuntimeError("handler bug")

    c = _client(broker.url, handler)
    c.subscribe("t/cb")
    c.start()
    try:
        assert c.wait_subscribed(10)
        c.publish("t/cb", b"boom")
        c.publish("t/cb", b"after")
        assert _wait(lambda: b"after" in got)
        assert c.counters.callback_errors == 1 and "network thread keeps running" in caplog.text
    finally:
        c.stop()


def test_watchdog_restarts_a_dead_network_thread(broker):
    got = []
    c = _client(broker.url, lambda m: got.append(m.payload), watchdog_interval_s=0.2)
    c.subscribe("t/wd")
    c.start()
    try:
        assert c.wait_connected(10)
        thread = c._net_thread
        c._mqtt.disconnect()  # paho's loop ends as after a fatal error: the thread exits
        assert _wait(lambda: not thread.is_alive())
        assert _wait(lambda: c.counters.loop_restarts == 1 and c.connected, 10)
        c.publish("t/wd", b"alive")
        assert _wait(lambda: b"alive" in got)
    finally:
        c.stop()


def test_client_reconnects_and_resubscribes_after_the_broker_restarts(tmp_path):
    b = start_broker(tmp_path / "b")
    got = []
    c = _client(b.url, lambda m: got.append(m.payload), reconnect_min_s=0.5, reconnect_max_s=1.0)
    c.subscribe("t/re")
    c.start()
    try:
        assert c.wait_connected(10)
        b.restart()
        assert _wait(lambda: c.counters.connects >= 2 and c.connected, 15)
        assert c.wait_subscribed(10)  # the new session's SUBACK, not a pause
        c.publish("t/re", b"back")
        assert _wait(lambda: b"back" in got)
    finally:
        c.stop()
        b.stop()


def test_outgoing_queue_is_bounded_while_the_broker_is_down(tmp_path):
    b = start_broker(tmp_path / "b")
    c = _client(b.url, lambda m: None, max_queued_messages=5)
    c.start()
    try:
        assert c.wait_connected(10)
        b.stop()
        assert _wait(lambda: not c.connected)
        with pytest.raises(CloudUnavailable, match=r"outgoing queue is full \(5 messages\)"):
            for _ in range(10):
                c.publish("t/q", b"x")
    finally:
        c.stop()


def test_a_job_with_no_broker_fails_within_its_deadline_instead_of_hanging():
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens here
    link = CloudLink(LinkOptions("edge-nobroker", ClientOptions(url, "msao-edge-nobroker"))).start(timeout_s=0.2)
    try:
        header = JobHeader(new_job_id(), "ab" * 32, "split", time.time() + 1.0, segment="decoder[1:2]")
        t0 = time.monotonic()
        with pytest.raises(CloudUnavailable, match="run it on the edge"):
            link.submit(header, {"hidden_states": np.zeros((1, 1, 4), np.float32)})
        assert time.monotonic() - t0 < 2.0
        assert link.transfers.last.outcome == "timeout"
    finally:
        link.close()


@pytest.mark.parametrize(
    "url, want",
    [
        ("mqtt://h:1884", BrokerUrl("h", 1884, False)),
        ("mqtts://broker.example", BrokerUrl("broker.example", 8883, True)),
        ("localhost:1883", BrokerUrl("localhost", 1883, False)),
    ],
)
def test_broker_urls_parse(url, want):
    assert BrokerUrl.parse(url) == want


@pytest.mark.parametrize("url", ["http://h:1", "mqtt://user:pw@h:1", "mqtt://h:99999", "mqtt:///x"])
def test_bad_broker_urls_are_refused_with_the_expected_form(url):
    with pytest.raises(ConfigError, match="mqtt://HOST:PORT|bad port"):
        BrokerUrl.parse(url)


def test_tls_options_check_their_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TlsOptions(ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="TLS files given but"):
        BridgeClient(ClientOptions("mqtt://h:1", "x", tls=TlsOptions(ca_file=__file__)), lambda m: None)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI needed to make a test CA")
def test_mqtts_connects_with_a_ca_file(tmp_path):
    """A TLS listener with a fresh CA: mqtts:// + --ca-file connects and verifies the host name."""
    run = lambda *a: subprocess.run(["openssl", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=msao-test-ca", "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "srv.key", "-out", "srv.csr")
    (tmp_path / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext",
        "-out",
        "srv.pem",
    )
    b = start_broker(tmp_path / "b")
    b.stop()
    port = b.port
    b.conf.write_text(b.conf.read_text() + f"certfile {tmp_path / 'srv.pem'}\nkeyfile {tmp_path / 'srv.key'}\n")
    b.restart()
    got = []
    c = BridgeClient(
        ClientOptions(f"mqtts://localhost:{port}", "tls-" + uuid.uuid4().hex[:6], tls=TlsOptions(ca_file=str(tmp_path / "ca.pem"))),
        got.append,
    )
    c.subscribe("t/tls")
    c.start()
    try:
        assert c.wait_subscribed(10) and c.tcp_nodelay
        c.publish("t/tls", b"secret")
        assert _wait(lambda: got)
    finally:
        c.stop()
        b.stop()
