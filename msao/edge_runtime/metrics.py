"""Prometheus metrics of the edge daemon: what the runtime and its intakes count, by name.

Names follow the conventions in FIELD_NOTES: ``msao_*_seconds`` / ``_bytes`` / ``_total``, base
units, and no per-request labels (label values come from small fixed sets: plan kinds,
outcomes, stages, sides, error codes, routes, status codes), so a scrape stays small however
many requests were served. The names and labels from before prometheus_client are kept, so
dashboards and docs stay valid; docs/metrics.md lists every series. Served on the daemon's own
``--metrics`` listener (``msao/prometheus.py``), never on the unauthenticated chat listener.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from msao.prometheus import ProcessMetrics, counts_of

if TYPE_CHECKING:
    from msao.edge_runtime.mqtt_intake import IntakeCounters
    from msao.engines.manifest import Manifest

__all__ = ["EdgeMetrics"]


class EdgeMetrics(ProcessMetrics):
    """The daemon's metrics, created once per runtime, each runtime with its own registry.

    Args:
        queue_depth: requests accepted and waiting, read at each scrape.
        cloud_available: 1.0 when the broker is connected and a worker serves the large model.
    """

    def __init__(self, queue_depth: Callable[[], float], cloud_available: Callable[[], float]):
        super().__init__("edge")
        self.requests = self.counter("msao_requests_total", "Requests finished, by plan kind and outcome", ("plan", "outcome"))
        self.answered_by = self.counter("msao_answers_total", "Committed answers, by the side that produced them", ("side",))
        self.fallbacks = self.counter("msao_fallbacks_total", "Plans abandoned for an edge-only answer, by plan kind", ("plan",))
        self.rejected = self.counter("msao_rejected_total", "Requests refused at intake or admission, by error code", ("code",))
        self.latency = self.histogram("msao_request_seconds", "End-to-end latency from acceptance to committed answer", ("plan",))
        self.stages = self.histogram("msao_stage_seconds", "Wall time per stage of a request", ("stage",))
        self.bytes = self.counter("msao_network_bytes_total", "Payload bytes crossing the network for requests", ("direction",))
        self.gauge("msao_queue_depth", "Requests accepted and waiting for a worker", queue_depth)
        self.gauge("msao_cloud_available", "1 when the broker is connected and a worker serves the large model", cloud_available)
        self.intake_requests = self.readings(
            "msao_intake_requests_total",
            "Requests received, by intake (http: chat completions posted; mqtt: request messages)",
            ("source",),
        )
        self.http_responses = self.counter(
            "msao_http_responses_total", "Answers of the HTTP intake, by route (other = an unknown path) and status code", ("route", "code")
        )
        self.mqtt_intake_events = self.readings(
            "msao_mqtt_intake_events_total", "What the MQTT intake did with request messages (IntakeCounters), by event", ("event",)
        )

    def add_models(self, edge: Manifest, large: Manifest | None) -> None:
        """``msao_model_info`` for the edge model and the large model held here (none: edge-only)."""
        self.add_model("edge", edge.name, edge.model_hash)
        if large is not None:
            self.add_model("large", large.name, large.model_hash)

    def watch_mqtt_intake(self, counters: Callable[[], IntakeCounters]) -> None:
        """Read the MQTT intake's own counts at each scrape (it keeps them; nothing is counted twice)."""
        self.intake_requests.add_reader(lambda: {("mqtt",): float(counters().requests_in)})
        self.mqtt_intake_events.add_reader(lambda: {(k,): v for k, v in counts_of(counters()).items()})
