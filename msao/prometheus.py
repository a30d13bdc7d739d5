"""Prometheus for every msao process: one registry each, the metric kinds msao uses, the ``--metrics`` listener.

    ProcessMetrics          one process's registry: msao_build_info, msao_model_info, MQTT client
                            events, process_* / python_* (prometheus_client's collectors)
      .counter()            LabelledCounter   inc(amount, **labels), value(**labels)
      .histogram()          LabelledHistogram observe(seconds, **labels), count(**labels)
      .gauge()              read when scraped
      .readings()           ReadCounter       counts kept by their owner (a dataclass), read when scraped
    MetricsListener         GET /metrics on its own HOST:PORT, bound before the models load

Rendering is prometheus_client's, so a counter keeps every digit (``123456789.0``, never
``1.23457e+08``) and a scraper asking for OpenMetrics gets it. Each process (and each
``EdgeRuntime`` a test builds) has its own ``CollectorRegistry``, never the library's global
default, so two runtimes in one process do not collide. Knows nothing of models, MQTT or HTTP
requests: the edge's metrics are ``edge_runtime/metrics.py``'s, the worker's
``cloud_bridge/worker_metrics.py``'s.

The listener has no authentication: bind it to loopback (``127.0.0.1:9464`` for ``msao edge``,
``127.0.0.1:9465`` for ``msao cloud``, the ports docs/metrics.md documents) and scrape through
an authenticating proxy if anything else must reach it.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from msao import __version__
from msao.errors import ConfigError, MissingDependency
from msao.listener import BackgroundListener

try:
    import prometheus_client
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.exposition import ThreadingWSGIServer
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as _exc:  # a source checkout updated without reinstalling its extra
    raise MissingDependency(
        "prometheus-client is not installed; pip install 'msao[edge]' (or msao[cloud] / msao[cloud-gpu] on a worker)"
    ) from _exc

__all__ = [
    "LATENCY_BUCKETS_S",
    "LabelledCounter",
    "LabelledHistogram",
    "MetricsListener",
    "ProcessMetrics",
    "ReadCounter",
    "counts_of",
    "parse_listen_address",
]

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SCRAPE_TIMEOUT_S = 10.0  # a scraper silent this long is dropped, so idle connections cannot pile up threads
Labels = tuple[str, ...]


def parse_listen_address(text: str, flag: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ``[::1]:9464`` for IPv6. Port 0 = any free port (the listener logs it).

    Raises:
        ConfigError: no colon, an empty host, or a port outside 0-65535; the message names ``flag``.
    """
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdecimal() or int(port) > 65535:
        raise ConfigError(f"{flag} must be HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464; port 0 = any free one), got {text!r}")
    return host, int(port)


def counts_of(snapshot: Any) -> dict[str, float]:
    """A dataclass of counts (``IntakeCounters``, ``ClientCounters``) -> {field name: count}."""
    return {f.name: float(getattr(snapshot, f.name)) for f in dataclasses.fields(snapshot)}


def _label_values(names: Labels, given: Mapping[str, object], metric: str) -> Labels:
    if set(given) != set(names):
        raise ValueError(f"{metric} takes labels {names}, got {sorted(given)}")
    return tuple(str(given[n]) for n in names)  # a str enum (PlanKind) reads as its value


class LabelledCounter:
    """A Prometheus counter called as the runtime calls it: ``inc(amount, plan="edge", outcome="ok")``.

    Label values come from small fixed sets (plan kinds, error codes, sides): never a request id,
    so a scrape stays small however many requests were served.
    """

    def __init__(self, registry: CollectorRegistry, name: str, documentation: str, labels: Labels = ()):
        self.name, self.label_names = name, labels
        self._metric = prometheus_client.Counter(name, documentation, labels, registry=registry)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        values = _label_values(self.label_names, labels, self.name)
        (self._metric.labels(*values) if values else self._metric).inc(amount)

    def values(self) -> dict[Labels, float]:
        """Every series so far: {label values in ``label_names`` order: count}."""
        total = self.name if self.name.endswith("_total") else self.name + "_total"
        return {
            tuple(s.labels[n] for n in self.label_names): s.value
            for family in self._metric.collect()
            for s in family.samples
            if s.name == total
        }

    def value(self, **labels: object) -> float:
        """The count of one series (0 before its first ``inc``)."""
        return self.values().get(_label_values(self.label_names, labels, self.name), 0.0)


class LabelledHistogram:
    """A Prometheus histogram (base unit: seconds) called as ``observe(0.012, stage="mas")``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        name: str,
        documentation: str,
        labels: Labels = (),
        buckets: tuple[float, ...] = LATENCY_BUCKETS_S,
    ):
        self.name, self.label_names = name, labels
        self._metric = prometheus_client.Histogram(name, documentation, labels, registry=registry, buckets=buckets)

    def observe(self, value: float, **labels: object) -> None:
        values = _label_values(self.label_names, labels, self.name)
        (self._metric.labels(*values) if values else self._metric).observe(value)

    def count(self, **labels: object) -> int:
        """Observations of one series so far."""
        want = dict(zip(self.label_names, _label_values(self.label_names, labels, self.name)))
        for family in self._metric.collect():
            for s in family.samples:
                if s.name == self.name + "_count" and s.labels == want:
                    return int(s.value)
        return 0


class ReadCounter(Collector):
    """A counter family whose counts live with their owner and are read when scraped.

    For parts that keep their own counts and must not know Prometheus (the MQTT intake's
    ``IntakeCounters``, a client's ``ClientCounters``), and for counts pushed here with ``inc``:
    a series fed both ways shows the sum. Several owners may feed one family (one per label
    value), which a second ``LabelledCounter`` of the same name could not: the registry refuses
    duplicate names.
    """

    def __init__(self, registry: CollectorRegistry, name: str, documentation: str, labels: Labels):
        self.name, self.documentation, self.label_names = name.removesuffix("_total"), documentation, labels
        self._readers: list[Callable[[], Mapping[Labels, float]]] = []
        self._pushed: dict[Labels, float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def add_reader(self, read: Callable[[], Mapping[Labels, float]]) -> None:
        """``read()`` -> {label values: count since the owner started}; called at every scrape."""
        with self._lock:
            self._readers.append(read)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        key = _label_values(self.label_names, labels, self.name)
        with self._lock:
            self._pushed[key] = self._pushed.get(key, 0.0) + amount

    def values(self) -> dict[Labels, float]:
        with self._lock:
            readers, out = list(self._readers), dict(self._pushed)
        for read in readers:
            for key, v in read().items():
                out[key] = out.get(key, 0.0) + v
        return out

    def value(self, **labels: object) -> float:
        return self.values().get(_label_values(self.label_names, labels, self.name), 0.0)

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.label_names)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for key, v in sorted(self.values().items()):
            family.add_metric(list(key), v)
        yield family


class ProcessMetrics:
    """The registry of one msao process, with what every process exports.

    ``msao_build_info{version, process}``, ``msao_model_info{role, model, model_hash}`` (one
    series per model; join on ``model_hash`` with the MQTT topics and statuses), MQTT client
    events (connects, disconnects, messages, acks, ...) and prometheus_client's ``process_*``
    (CPU, memory, open files, start time; Linux), ``python_info`` and ``python_gc_*``.

    Args:
        process: ``edge`` or ``cloud`` (the ``process`` label of ``msao_build_info``).
    """

    def __init__(self, process: str):
        self.registry = CollectorRegistry(auto_describe=True)
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        prometheus_client.GCCollector(registry=self.registry)
        build = prometheus_client.Info("msao_build", "The msao version this process runs (value 1)", registry=self.registry)
        build.info({"version": __version__, "process": process, "python": platform.python_version()})
        self._models = prometheus_client.Gauge(
            "msao_model_info", "A model this process serves (value 1), by role: edge, large (held on the edge) or served (a worker's)",
            ("role", "model", "model_hash"), registry=self.registry,
        )  # fmt: skip
        self.mqtt_client_events = self.readings(
            "msao_mqtt_client_events_total", "MQTT client events since start (ClientCounters), by connection and event", ("client", "event")
        )

    def counter(self, name: str, documentation: str, labels: Labels = ()) -> LabelledCounter:
        return LabelledCounter(self.registry, name, documentation, labels)

    def histogram(
        self, name: str, documentation: str, labels: Labels = (), buckets: tuple[float, ...] = LATENCY_BUCKETS_S
    ) -> LabelledHistogram:
        return LabelledHistogram(self.registry, name, documentation, labels, buckets)

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is ``read()`` at each scrape (queue depth, sessions held)."""
        prometheus_client.Gauge(name, documentation, registry=self.registry).set_function(read)

    def readings(self, name: str, documentation: str, labels: Labels) -> ReadCounter:
        return ReadCounter(self.registry, name, documentation, labels)

    def add_model(self, role: str, name: str, model_hash: str) -> None:
        self._models.labels(role, name, model_hash).set(1)

    def watch_client(self, client: str, counters: Callable[[], Any]) -> None:
        """Export a ``BridgeClient``'s ``ClientCounters`` (``counters()`` returns them) as ``client=<client>``."""
        self.mqtt_client_events.add_reader(lambda: {(client, k): v for k, v in counts_of(counters()).items()})

    def text(self) -> str:
        """The exposition text, as the listener serves it to a plain Prometheus scrape."""
        return prometheus_client.generate_latest(self.registry).decode("utf-8")


class MetricsListener:
    """``GET /metrics`` on its own address, on a background thread; nothing else is served there.

    Bind it first (``start``), before the models load, so a port in use fails at once, not
    after a minute of loading; until ``serve`` hands it the process's registry it answers 503.

    Args:
        host: address to bind (``127.0.0.1``; ``::1``; ``0.0.0.0`` exposes unauthenticated metrics).
        port: TCP port; 0 picks a free one, readable from ``port`` (and logged) once started.
        flag: the option that set the address, named when it cannot be bound.
    """

    def __init__(self, host: str, port: int, flag: str = "--metrics"):
        self.host, self.flag = host, flag
        self._scrape: Callable | None = None  # prometheus_client's WSGI app over the registry, once ``serve`` gave one
        self._listener = BackgroundListener(host, port, lambda: _Server(host, port, self._app), "metrics", flag, "msao-metrics")

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def url(self) -> str:
        return f"{self._listener.base_url}/metrics"

    def start(self) -> MetricsListener:
        """Bind and serve (503 until ``serve``).

        Raises:
            ConfigError: the address cannot be bound (in use, not local, no permission); names ``flag``.
        """
        if not self._listener.running:
            self._listener.start()
            log.info("Prometheus metrics on %s", self.url)
        return self

    def serve(self, registry: CollectorRegistry) -> None:
        """From now on scrapes get ``registry``'s metrics."""
        self._scrape = prometheus_client.make_wsgi_app(registry)

    def _app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """One URL, as documented (prometheus_client's app answers every path with the metrics)."""
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"msao serves its metrics at /metrics only\n"]
        scrape = self._scrape
        if scrape is None:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8"), ("Retry-After", "5")])
            return [b"msao is starting (loading its models); metrics follow once it serves\n"]
        return scrape(environ, start_response)

    def stop(self) -> None:
        self._listener.stop()

    def __enter__(self) -> MetricsListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(WSGIRequestHandler):
    timeout = _SCRAPE_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s: " + format, self.client_address[0], *args)


class _Server(ThreadingWSGIServer):
    """prometheus_client's threaded WSGI server without the DNS lookup at bind, IPv6-aware."""

    def __init__(self, host: str, port: int, app: Callable):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.set_app(app)

    def server_bind(self) -> None:
        # WSGIServer.server_bind calls socket.getfqdn, a DNS lookup that can hang on a Jetson offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()
