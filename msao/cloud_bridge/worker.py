"""The cloud worker behind ``msao cloud``: MQTT intake, a bounded job queue, inference threads, status.

Decides no placement; runs what jobs ask. Life of a job:

    broker ─(network thread: reassemble, de-duplicate, enqueue or answer busy)─► queue (bounded)
    queue ─(worker thread: expiry check, decode, ModelServer.run, encode)─► result to ResponseTopic

The network thread never decodes tensors nor runs a model: a paho callback that blocks stalls
keepalives and every other message. A full queue answers ``busy`` at once so the edge can fall
back instead of waiting. A job past its deadline (MessageExpiryInterval counted from receipt,
or its header deadline) is dropped and counted. Results are kept by job id for a while: a re-sent
job (paho may re-send after a reconnect) gets the same result again, not a second run.
Everything counted is counted once, in ``self.metrics`` (``worker_metrics.py``): the retained
status is summed from it, and ``msao cloud --metrics`` serves it to Prometheus.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from msao.cloud_bridge.client import BridgeClient, ClientOptions, InboundMessage
from msao.cloud_bridge.codec import CodecLimits, payload_from_tensors, tensors_from_payload
from msao.cloud_bridge.messages import JobHeader, ResultHeader, WorkerStatus
from msao.cloud_bridge.model_server import JobOutput, ModelServer
from msao.cloud_bridge.sessions import RecentResults, StoredResult
from msao.cloud_bridge.topics import check_id, shared_job_filter, worker_job_filter, worker_status_topic
from msao.cloud_bridge.worker_metrics import UNKNOWN_KIND, WorkerMetrics
from msao.errors import CloudJobFailed, CodecError, ConfigError, FeedError, ImageError, MsaoError, PayloadTooLarge

__all__ = ["CloudWorker", "WorkerOptions"]

log = logging.getLogger(__name__)

COMPRESS_RESULTS_ABOVE = 64 * 1024


@dataclass(frozen=True)
class WorkerOptions:
    """Worker settings (``msao cloud --help`` explains each with its consequence).

    Attributes:
        worker_id: this worker's id in topics and status; unique per worker.
        client: MQTT connection options (the worker's will/status topic is filled in here).
        threads: jobs run at once (each on its own thread).
        queue_size: jobs that may wait beyond the running ones; one more gets ``busy``.
        limits: codec limits for job payloads.
        max_sessions / session_idle_s: KV sessions kept for split decode steps.
        recent_results: results kept by job id to answer re-sent jobs.
        clock_skew_s: grace on the header's wall-clock deadline (edge and cloud clocks differ).
        status_interval_s: retained status is refreshed at least this often (and on changes).
    """

    worker_id: str
    client: ClientOptions
    threads: int = 1
    queue_size: int = 8
    limits: CodecLimits = CodecLimits()
    max_sessions: int = 64
    session_idle_s: float = 60.0
    recent_results: int = 256
    clock_skew_s: float = 1.0
    status_interval_s: float = 10.0

    def __post_init__(self) -> None:
        check_id(self.worker_id, "worker id")
        if self.threads < 1 or self.queue_size < 1 or self.recent_results < 1:
            raise ConfigError(
                f"threads, queue size and recent results must be >= 1, got {self.threads}, {self.queue_size}, {self.recent_results}"
            )
        if self.clock_skew_s < 0 or self.status_interval_s <= 0:
            raise ConfigError("clock skew must be >= 0 and the status interval > 0")


@dataclass
class _Item:
    job_id: str
    message: InboundMessage


class CloudWorker:
    """Serves jobs for the models of ``servers`` until ``stop``.

    Args:
        servers: one ``ModelServer`` per bundle; jobs are routed by model hash.
        options: worker settings; ``options.client.will_topic`` is this worker's status topic.
    """

    def __init__(self, servers: Sequence[ModelServer], options: WorkerOptions):
        if not servers:
            raise ConfigError("a worker needs at least one bundle (--bundle DIR)")
        self.options = options
        self.servers = {s.model_hash: s for s in servers}
        self.sessions = servers[0].sessions
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=options.queue_size)
        self.metrics = WorkerMetrics(lambda: float(self._queue.qsize()), options.queue_size, lambda: float(len(self.sessions)))
        for s in servers:
            self.metrics.add_model("served", s.manifest.name, s.model_hash)
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._recent = RecentResults(options.recent_results)
        self._status_dirty = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.status_topic = worker_status_topic(options.worker_id)
        client_options = _with_will(options.client, self.status_topic, self._status("offline"))
        self.client = BridgeClient(client_options, self._on_message, on_connect=self._status_dirty.set)
        self.metrics.watch_client("worker", lambda: self.client.counters)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> CloudWorker:
        for model_hash in self.servers:
            self.client.subscribe(shared_job_filter(model_hash), qos=1)
        self.client.subscribe(worker_job_filter(self.options.worker_id), qos=1)
        self.client.start()
        for i in range(self.options.threads):
            t = threading.Thread(target=self._work, name=f"msao-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._publish_status_loop, name="msao-worker-status", daemon=True)
        t.start()
        self._threads.append(t)
        names = ", ".join(f"{s.manifest.name} ({h[:12]})" for h, s in self.servers.items())
        log.info(
            "worker %s serving %s: %d thread(s), queue %d, broker %s",
            self.options.worker_id,
            names,
            self.options.threads,
            self.options.queue_size,
            self.client.url,
        )
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking jobs, finish running ones, publish ``offline`` and disconnect."""
        self._stopping.set()
        for _ in range(self.options.threads):
            try:
                self._queue.put(None, timeout=timeout_s)
            except queue.Full:
                break
        for t in self._threads:
            t.join(timeout_s)
        self.client.stop(final=(self.status_topic, self._status("offline")))
        for s in self.servers.values():
            s.close()

    def wait(self) -> None:
        """Block until ``stop`` is called from another thread (or a signal handler)."""
        while not self._stopping.wait(1.0):
            pass

    # -- network thread: quick decisions only ------------------------------------------------

    def _on_message(self, msg: InboundMessage) -> None:
        job_id = _job_id(msg.correlation_data)
        if not msg.response_topic or job_id is None or "+" in msg.response_topic or "#" in msg.response_topic:
            self.metrics.dropped.inc()  # (paho refuses to publish to a topic with a wildcard: ValueError)
            log.warning(
                "dropped a message on %s: no ResponseTopic or no valid CorrelationData (job id), so no one to answer (ResponseTopic %r)",
                msg.topic, (msg.response_topic or "")[:80],
            )  # fmt: skip
            return
        stored = self._recent.get(job_id)
        if stored is not None:
            self.metrics.duplicates.inc()
            log.info("job %s was sent again; re-sending its stored result", job_id)
            self._send(stored.response_topic, job_id, stored.payload, stored.deadline_unix_s)
            return
        with self._lock:
            if job_id in self._in_flight:
                self.metrics.duplicates.inc()
                log.info("job %s was sent again while queued or running; its result will follow once", job_id)
                return
            try:
                self._queue.put_nowait(_Item(job_id, msg))
            except queue.Full:
                self.metrics.busy.inc()
                busy = True
            else:
                self._in_flight.add(job_id)
                busy = False
        self._status_dirty.set()
        if busy:
            log.debug("job %s: queue full (%d), answered busy", job_id, self.options.queue_size)
            header = ResultHeader(job_id=job_id, status="busy", worker_id=self.options.worker_id)
            self._send(msg.response_topic, job_id, payload_from_tensors({}, header.to_metadata()), time.time() + (msg.expiry_s or 5))

    # -- worker threads ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._handle(item)
            except Exception:  # never lose a worker thread; a bug here is logged and counted
                self.metrics.failures.inc()
                log.exception("job %s: unexpected failure outside the job handler", item.job_id)
            finally:
                with self._lock:
                    self._in_flight.discard(item.job_id)
                self._status_dirty.set()

    def _handle(self, item: _Item) -> None:
        msg, job_id = item.message, item.job_id
        t_start = time.monotonic()
        queue_wait_ms = (t_start - msg.received_monotonic) * 1e3
        self.metrics.queue_wait.observe(queue_wait_ms / 1e3)
        if msg.expiry_s is not None and t_start > msg.received_monotonic + msg.expiry_s:
            return self._expired(job_id, f"message expiry ({msg.expiry_s} s) passed while queued")
        deadline = time.time() + (msg.expiry_s or 60)
        header: JobHeader | None = None
        codec_ms = 0.0
        try:
            t0 = time.perf_counter()
            payload = tensors_from_payload(msg.payload, self.options.limits)
            try:
                header = JobHeader.from_metadata(payload.metadata)
            except CodecError as exc:
                raise CloudJobFailed(f"{exc}; fix the sender", "bad_job") from exc
            codec_ms += (time.perf_counter() - t0) * 1e3
            deadline = header.deadline_unix_s
            if header.job_id != job_id:
                raise CloudJobFailed(f"header job id {header.job_id} differs from CorrelationData {job_id}", "bad_job")
            if time.time() > header.deadline_unix_s + self.options.clock_skew_s:
                return self._expired(job_id, f"deadline passed {time.time() - header.deadline_unix_s:.1f} s ago")
            server = self.servers.get(header.model_hash)
            if server is None:
                served = ", ".join(f"{s.manifest.name} {h[:12]}" for h, s in self.servers.items())
                raise CloudJobFailed(
                    f"worker {self.options.worker_id} has no model {header.model_hash[:12]}…; it serves {served}", "unknown_model"
                )
            if header.reply_bytes > self.options.limits.max_payload_bytes:
                raise CloudJobFailed(
                    f"probe asks {header.reply_bytes} reply bytes, over this worker's limit {self.options.limits.max_payload_bytes}",
                    "too_large",
                )
            log.debug(
                "job %s: running %s %s %s on %s",
                job_id,
                header.kind,
                header.segment,
                header.head if header.kind == "split" else "",
                server.manifest.name,
            )
            out = server.run(header, payload.tensors)
            self.metrics.compute.observe(out.compute_ms / 1e3, kind=header.kind)
            result, outcome = self._ok(job_id, header, out, queue_wait_ms, codec_ms), "ok"
        except MsaoError as exc:
            result, outcome = self._error(job_id, exc, queue_wait_ms)
        except Exception as exc:
            log.exception("job %s: internal error", job_id)
            result, outcome = self._error(job_id, exc, queue_wait_ms)
        self.metrics.jobs.inc(kind=header.kind if header is not None else UNKNOWN_KIND, outcome=outcome)
        self._send(msg.response_topic or "", job_id, result, deadline)
        self._recent.put(job_id, StoredResult(msg.response_topic or "", result, deadline))
        log.debug("job %s: done in %.1f ms after %.1f ms queued", job_id, (time.monotonic() - t_start) * 1e3, queue_wait_ms)

    def _ok(self, job_id: str, header: JobHeader, out: JobOutput, queue_wait_ms: float, codec_ms: float) -> bytes:
        server = self.servers[header.model_hash]
        t0 = time.perf_counter()
        body_bytes = sum(x.nbytes for x in out.tensors.values())
        meta = ResultHeader(
            job_id=job_id, status="ok", worker_id=self.options.worker_id, queue_wait_ms=round(queue_wait_ms, 3),
            compute_ms=round(out.compute_ms, 3), codec_ms=round(codec_ms + (time.perf_counter() - t0) * 1e3, 3),
            session_id=out.session_id, past_length=out.past_length, text=out.text[:2000], confidence=out.confidence,
            providers=",".join(server.served().providers), finish_reason=out.finish_reason,
        ).to_metadata()  # fmt: skip
        # a probe's reply measures the downlink: compressed, 4 MB of zeros would cross as 400 bytes
        compress = body_bytes > COMPRESS_RESULTS_ABOVE and header.kind != "probe"
        return payload_from_tensors(out.tensors, meta, compress=compress)

    def _error(self, job_id: str, exc: BaseException, queue_wait_ms: float) -> tuple[bytes, str]:
        """The error result's payload and its code."""
        if isinstance(exc, CloudJobFailed):
            code = exc.code
        elif isinstance(exc, PayloadTooLarge):
            code = "too_large"
        elif isinstance(exc, CodecError):
            code = "bad_payload"
        elif isinstance(exc, (FeedError, ImageError)):
            code = "bad_input"
        elif isinstance(exc, MsaoError):
            code = "bad_job"
        else:
            code = "internal"
        message = str(exc) if code != "internal" else f"{type(exc).__name__}: {exc}; this is a bug in the worker, see its log"
        log.info("job %s: error %s: %s", job_id, code, message.splitlines()[0][:300])
        header = ResultHeader(
            job_id=job_id,
            status="error",
            worker_id=self.options.worker_id,
            error_code=code,
            error=message[:2000],
            queue_wait_ms=round(queue_wait_ms, 3),
        )
        return payload_from_tensors({}, header.to_metadata()), code

    def _expired(self, job_id: str, why: str) -> None:
        self.metrics.expired.inc()
        log.info("job %s: dropped, %s (nobody waits for it any more)", job_id, why)

    def _send(self, topic: str, job_id: str, payload: bytes, deadline_unix_s: float) -> None:
        remaining = deadline_unix_s - time.time()
        try:
            self.client.publish(topic, payload, qos=1, correlation_data=job_id.encode("ascii"), expiry_s=max(1.0, remaining))
        except MsaoError as exc:
            log.warning("job %s: could not publish the result to %s: %s", job_id, topic, exc)

    # -- status ------------------------------------------------------------------------------

    def _status(self, state: str) -> bytes:
        c = self.metrics.totals()
        status = WorkerStatus(
            worker_id=self.options.worker_id, state=state, models=tuple(s.served() for s in self.servers.values()),
            queue_depth=self._queue.qsize() if state == "online" else 0, queue_capacity=self.options.queue_size,
            threads=self.options.threads, sessions=len(self.sessions), jobs_total=c.jobs, busy_total=c.busy,
            errors_total=c.errors, expired_total=c.expired, updated_unix_s=round(time.time(), 3),
        )  # fmt: skip
        return json.dumps(status.to_dict(), separators=(",", ":")).encode("utf-8")

    def _publish_status_loop(self) -> None:
        """Retained status on change (at most every 0.2 s) and at least every ``status_interval_s``."""
        while not self._stopping.is_set():
            self._status_dirty.wait(self.options.status_interval_s)
            if self._stopping.is_set():
                return
            self._status_dirty.clear()
            self.sessions.sweep()
            if self.client.connected:
                try:
                    self.client.publish(self.status_topic, self._status("online"), qos=1, retain=True)
                except MsaoError as exc:
                    log.warning("could not publish status: %s", exc)
            self._stopping.wait(0.2)


def _with_will(options: ClientOptions, topic: str, payload: bytes) -> ClientOptions:
    from dataclasses import replace

    return replace(options, will_topic=topic, will_payload=payload, session_expiry_s=0)


def _job_id(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return check_id(raw.decode("ascii"), "job id")
    except (UnicodeDecodeError, ConfigError):
        return None
