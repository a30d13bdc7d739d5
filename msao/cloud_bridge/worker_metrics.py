"""Prometheus metrics of a cloud worker (``msao cloud``): jobs, refusals, queue, compute time.

The one place the worker counts: its retained status (``jobs_total``, ``busy_total``,
``errors_total``, ``expired_total``) is summed from these (``totals``), so the status and a
scrape never disagree. Label values come from fixed sets (``JOB_KINDS`` + ``unknown`` when
the header could not be read; ``ok`` or an ``ERROR_CODES`` code). Served on the worker's own
``--metrics`` listener (``msao/prometheus.py``); docs/metrics.md lists every series.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from msao.cloud_bridge.messages import JOB_KINDS
from msao.prometheus import ProcessMetrics

__all__ = ["WorkerMetrics", "WorkerTotals"]

UNKNOWN_KIND = "unknown"  # the job's header could not be read (bad payload or header)
# compute per job: a probe runs nothing (0 s), a split step on a GPU takes milliseconds, an answer on a CPU seconds
COMPUTE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class WorkerTotals:
    """What the retained status reports, summed from the metrics.

    Attributes:
        jobs: jobs answered with a result (ok or error).
        errors: jobs answered with an error, plus failures outside a job's handler.
        busy: jobs refused at once because the queue was full.
        expired: jobs dropped unanswered because their deadline passed while queued.
    """

    jobs: int
    errors: int
    busy: int
    expired: int


class WorkerMetrics(ProcessMetrics):
    """One worker process's metrics, with its own registry.

    Args:
        queue_depth: jobs waiting for a worker thread, read at each scrape.
        queue_capacity: jobs that may wait (``--queue-size``); one more is answered busy.
        sessions: KV sessions held for split decode steps, read at each scrape.
    """

    def __init__(self, queue_depth: Callable[[], float], queue_capacity: int, sessions: Callable[[], float]):
        super().__init__("cloud")
        self.jobs = self.counter(
            "msao_worker_jobs_total", "Jobs answered with a result, by job kind and outcome (ok or the error code)", ("kind", "outcome")
        )
        for kind in JOB_KINDS:
            self.jobs.inc(0, kind=kind, outcome="ok")  # every kind's series exists from the start, so rate() sees the first job
        self.busy = self.counter("msao_worker_busy_total", "Jobs refused at once with busy because the queue was full")
        self.expired = self.counter(
            "msao_worker_expired_total", "Jobs dropped unanswered: their deadline or MessageExpiry passed while queued"
        )
        self.dropped = self.counter("msao_worker_dropped_total", "Messages dropped without an answer: no ResponseTopic or no valid job id")
        self.duplicates = self.counter(
            "msao_worker_duplicates_total", "Jobs sent again, answered from the stored result or by the copy already queued (not run twice)"
        )
        self.failures = self.counter("msao_worker_failures_total", "Failures outside a job's handler (a bug: see the worker log)")
        self.compute = self.histogram(
            "msao_worker_compute_seconds", "Model time per job that ran, by job kind (probes run nothing)", ("kind",), COMPUTE_BUCKETS_S
        )
        self.queue_wait = self.histogram("msao_worker_queue_wait_seconds", "Time from a job's arrival to a worker thread taking it")
        self.gauge("msao_worker_queue_depth", "Jobs waiting for a worker thread", queue_depth)
        self.gauge(
            "msao_worker_queue_capacity", "Jobs that may wait (--queue-size); one more is answered busy", lambda: float(queue_capacity)
        )
        self.gauge("msao_worker_sessions", "KV sessions held for split decode steps (--max-sessions at most)", sessions)

    def totals(self) -> WorkerTotals:
        jobs = self.jobs.values()
        errors = sum(v for (_, outcome), v in jobs.items() if outcome != "ok") + self.failures.value()
        return WorkerTotals(int(sum(jobs.values())), int(errors), int(self.busy.value()), int(self.expired.value()))
