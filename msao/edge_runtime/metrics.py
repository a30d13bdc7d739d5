"""Prometheus metrics of the edge daemon, in the text exposition format, with no dependency.

Names follow the conventions in FIELD_NOTES: ``msao_*_seconds`` / ``_bytes`` / ``_total``, base
units, and no per-request labels (label values come from small fixed sets: plan kinds,
outcomes, stages, sides), so a scrape stays small however many requests were served.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

__all__ = ["Counter", "EdgeMetrics", "Gauge", "Histogram", "Registry"]

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in items]


class Gauge(_Metric):
    """A value read when scraped (``read``), or set."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float] | None = None):
        super().__init__(name, help_text)
        self._read = read
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = value

    def render(self) -> list[str]:
        value = self._read() if self._read is not None else self._value
        return self.header() + [f"{self.name} {value:g}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = LATENCY_BUCKETS_S):
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., +Inf count, sum

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            s = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            s[i] += 1
            s[-1] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            s = self._series.get(self._key(labels))
        return 0 if s is None else int(sum(s[:-1]))

    def render(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, s in items:
            cum = 0.0
            for b, c in zip((*self.buckets, float("inf")), s[:-1]):
                cum += c
                le = "+Inf" if b == float("inf") else f"{b:g}"
                out.append(f"{self.name}_bucket{_labels((*self.label_names, 'le'), (*key, le))} {cum:g}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {s[-1]:g}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {cum:g}")
        return out


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self.metrics:
            lines += m.render()  # type: ignore[attr-defined]
        return "\n".join(lines) + "\n"


class EdgeMetrics:
    """The daemon's metrics, created once per runtime."""

    def __init__(self, queue_depth: Callable[[], float], cloud_available: Callable[[], float]):
        r = self.registry = Registry()
        self.requests = r.add(Counter("msao_requests_total", "Requests finished, by plan kind and outcome", ("plan", "outcome")))
        self.answered_by = r.add(Counter("msao_answers_total", "Committed answers, by the side that produced them", ("side",)))
        self.fallbacks = r.add(Counter("msao_fallbacks_total", "Plans abandoned for an edge-only answer, by plan kind", ("plan",)))
        self.rejected = r.add(Counter("msao_rejected_total", "Requests refused at intake or admission, by error code", ("code",)))
        self.latency = r.add(Histogram("msao_request_seconds", "End-to-end latency from acceptance to committed answer", ("plan",)))
        self.stages = r.add(Histogram("msao_stage_seconds", "Wall time per stage of a request", ("stage",)))
        self.bytes = r.add(Counter("msao_network_bytes_total", "Payload bytes crossing the network for requests", ("direction",)))
        r.add(Gauge("msao_queue_depth", "Requests accepted and waiting for a worker", queue_depth))
        r.add(Gauge("msao_cloud_available", "1 when the broker is connected and a worker serves the large model", cloud_available))
