"""``msao/prometheus.py`` through real sockets: the ``--metrics`` listener, what it renders, how it fails."""

from __future__ import annotations

import http.client
import socket
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from msao.cloud_bridge.worker_metrics import WorkerMetrics
from msao.edge_runtime.metrics import EdgeMetrics
from msao.errors import ConfigError
from msao.prometheus import MetricsListener, ProcessMetrics, parse_listen_address


def scrape(host: str, port: int, path: str = "/metrics") -> tuple[int, str, str]:
    """(status, Content-Type, body) of one real GET."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser: {(name, labels): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def scraped(port: int) -> dict[tuple[str, frozenset], float]:
    """The samples of a listener on loopback ``port`` (a daemon's or a worker's), after checking it answered 200."""
    status, _, text = scrape("127.0.0.1", port)
    assert status == 200, text
    return samples(text)


def test_a_counter_past_10_to_the_8_keeps_every_digit():
    m = EdgeMetrics(lambda: 0.0, lambda: 0.0)
    m.requests.inc(123_456_789, plan="edge", outcome="ok")
    m.bytes.inc(2**53, direction="up")  # the largest integer below which a float holds every integer exactly
    with MetricsListener("127.0.0.1", 0) as listener:
        listener.serve(m.registry)
        status, kind, text = scrape("127.0.0.1", listener.port)
    assert status == 200 and kind.startswith("text/plain"), (status, kind)
    got = samples(text)
    assert got[("msao_requests_total", frozenset({("plan", "edge"), ("outcome", "ok")}))] == 123_456_789  # {:g} read 123457000
    assert got[("msao_network_bytes_total", frozenset({("direction", "up")}))] == 2**53


def test_listener_binds_the_port_it_is_given_and_serves_only_metrics():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = ProcessMetrics("edge")
    with MetricsListener("127.0.0.1", port) as listener:
        assert listener.port == port and listener.url == f"http://127.0.0.1:{port}/metrics"
        assert scrape("127.0.0.1", port)[0] == 503  # bound before the models load; nothing to serve yet
        listener.serve(m.registry)
        status, _, text = scrape("127.0.0.1", port)
        assert status == 200
        assert scrape("127.0.0.1", port, "/")[0] == 404
    got = samples(text)
    build = [labels for (name, labels) in got if name == "msao_build_info"]
    assert len(build) == 1 and dict(build[0])["process"] == "edge" and dict(build[0])["version"]
    assert any(name == "python_info" for name, _ in got)
    if sys.platform.startswith("linux"):  # ProcessCollector reads /proc
        assert ("process_resident_memory_bytes", frozenset()) in got and ("process_cpu_seconds_total", frozenset()) in got
    with pytest.raises(ConnectionRefusedError):
        scrape("127.0.0.1", port)  # stopped: the port is free again


def test_port_in_use_names_the_flag_to_change():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{port}.*in use.*pick another --metrics HOST:PORT"):
            MetricsListener("127.0.0.1", port, "--metrics").start()


@pytest.mark.parametrize(
    ("text", "want"), [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9465", ("::1", 9465)), ("0.0.0.0:0", ("0.0.0.0", 0))]
)
def test_parse_listen_address_reads_host_and_port(text, want):
    assert parse_listen_address(text, "--metrics") == want


@pytest.mark.parametrize("text", ["9464", ":9464", "localhost:", "localhost:http", "127.0.0.1:65536"])
def test_parse_listen_address_refuses_what_is_not_host_and_port(text):
    with pytest.raises(ConfigError, match=r"--metrics must be HOST:PORT \(e\.g\. 127\.0\.0\.1:9464"):
        parse_listen_address(text, "--metrics")


def test_two_runtimes_in_one_process_keep_their_own_counts():
    a, b = EdgeMetrics(lambda: 1.0, lambda: 0.0), EdgeMetrics(lambda: 2.0, lambda: 0.0)
    a.rejected.inc(code="busy")
    assert a.rejected.value(code="busy") == 1 and b.rejected.value(code="busy") == 0
    assert samples(b.text())[("msao_queue_depth", frozenset())] == 2.0


def test_read_counter_sums_what_its_owners_keep_and_what_is_pushed():
    m = EdgeMetrics(lambda: 0.0, lambda: 0.0)
    kept = {"n": 5}
    m.intake_requests.add_reader(lambda: {("mqtt",): float(kept["n"])})
    m.intake_requests.inc(source="http")
    m.intake_requests.inc(2, source="mqtt")
    kept["n"] = 7  # read again at the next scrape
    got = samples(m.text())
    assert got[("msao_intake_requests_total", frozenset({("source", "mqtt")}))] == 9
    assert got[("msao_intake_requests_total", frozenset({("source", "http")}))] == 1


def test_worker_totals_for_the_status_are_summed_from_its_metrics():
    w = WorkerMetrics(lambda: 0.0, 8, lambda: 0.0)
    w.jobs.inc(kind="split", outcome="ok")
    w.jobs.inc(kind="answer", outcome="bad_input")
    w.failures.inc()
    w.busy.inc(3)
    t = w.totals()
    assert (t.jobs, t.errors, t.busy, t.expired) == (2, 2, 3, 0)
    got = samples(w.text())
    assert got[("msao_worker_jobs_total", frozenset({("kind", "probe"), ("outcome", "ok")}))] == 0  # every kind exists at 0
    assert got[("msao_worker_queue_capacity", frozenset())] == 8
