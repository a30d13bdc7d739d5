"""The edge's end of the bridge: submit a job, wait for its result within a deadline, measure it.

Decides no placement: the edge runtime asks, this module delivers or raises an error it can
act on (``CloudUnavailable``, ``CloudBusy``, ``CloudJobFailed``). It owns one MQTT connection,
the edge's result topic, the table of worker statuses (retained, with Last Wills) and one
``TransferStats`` per job for the scheduler's bandwidth/RTT estimates.

Routing of a job:
    fits one packet, no worker named   -> shared topic (the broker load-balances)
    needs chunks                       -> one worker's topic (chunks must not be spread), least loaded
    decode step of a KV session        -> the worker holding the session
A job is re-dispatched at most once: after ``busy`` (to another worker if one is known), or
when no result came within ``redispatch_after_s`` or its worker went offline. The same job id
is re-used, so a worker that already ran it answers from its stored result.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.codec import CodecLimits, compress_payload, payload_from_tensors, tensors_from_payload
from msao.cloud_bridge.messages import EdgeStatus, JobHeader, ResultHeader, WorkerStatus
from msao.cloud_bridge.mqtt_options import ClientOptions, InboundMessage
from msao.cloud_bridge.stats import TransferLog, TransferStats
from msao.cloud_bridge.topics import (
    PREFIX,
    check_id,
    edge_results_topic,
    edge_status_topic,
    job_topic,
    worker_job_topic,
    worker_status_filter,
)
from msao.engines.generation import DEFAULT_MAX_NEW_TOKENS
from msao.errors import CloudBusy, CloudJobFailed, CloudUnavailable, CodecError, ConfigError, MsaoError

__all__ = ["CloudLink", "JobResult", "LinkOptions", "new_job_id", "RemoteAnswer", "VerifiedBlock"]

log = logging.getLogger(__name__)

PACKET_MARGIN_BYTES = 1024  # topic + properties of a job, generously


def new_job_id() -> str:
    """A fresh job (or session) id: 20 random hex digits."""
    return uuid.uuid4().hex[:20]


@dataclass(frozen=True)
class LinkOptions:
    """Edge-side settings.

    Attributes:
        edge_id: this edge's id (result and status topics).
        client: MQTT connection options (will topic and session expiry are filled in).
        redispatch_after_s: wait this long for the first attempt before re-dispatching;
            None = half of the job's remaining deadline.
        compress_above_bytes: zstd job payloads larger than this (level ``zstd_level``).
        limits: codec limits applied to results.
        history: transfers kept in ``transfers``.
        publish_status: publish the edge's retained status (``online`` on connect, Last Will
            ``offline``). False when the daemon's MQTT intake owns that topic: its status says
            whether requests are served, which a link cannot know (``docs/mqtt-api.md``).
    """

    edge_id: str
    client: ClientOptions
    redispatch_after_s: float | None = None
    compress_above_bytes: int = 16 * 1024
    zstd_level: int = 1
    limits: CodecLimits = CodecLimits()
    history: int = 256
    publish_status: bool = True

    def __post_init__(self) -> None:
        check_id(self.edge_id, "edge id")
        if self.redispatch_after_s is not None and self.redispatch_after_s <= 0:
            raise ConfigError(f"redispatch_after_s must be > 0, got {self.redispatch_after_s}")


@dataclass(frozen=True)
class JobResult:
    """A successful result: its header, tensors (read-only arrays) and what the transfer cost."""

    header: ResultHeader
    tensors: Mapping[str, np.ndarray]
    stats: TransferStats


@dataclass(frozen=True)
class RemoteAnswer:
    """A whole-model answer from the cloud."""

    text: str
    token_ids: tuple[int, ...]
    token_probs: tuple[float, ...]
    confidence: float
    worker_id: str
    stats: TransferStats


@dataclass(frozen=True)
class VerifiedBlock:
    """The large model's verdict on one block of drafted tokens (token-level speculation).

    Attributes:
        token_ids / token_probs: tokens this block committed (the accepted drafts, then the
            large model's own next token unless the answer ended first) and their probabilities.
        committed: answer tokens the session has committed so far.
        finish_reason: "" while the answer goes on, else ``stop`` or ``length``.
        worker_id: the worker that holds the session (send the next block there).
    """

    token_ids: tuple[int, ...]
    token_probs: tuple[float, ...]
    committed: int
    finish_reason: str
    worker_id: str
    stats: TransferStats


class _Pending:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.message: InboundMessage | None = None
        self.target: str | None = None
        self.target_offline = False
        self.cancelled = False
        self.model_hash = ""


class CloudLink:
    """One edge's connection to the cloud workers. Thread-safe: many jobs may wait at once."""

    def __init__(self, options: LinkOptions):
        self.options = options
        self.results_topic = edge_results_topic(options.edge_id)
        self.status_topic = edge_status_topic(options.edge_id)
        self.transfers = TransferLog(options.history)
        self.late_results = 0
        self._pending: dict[str, _Pending] = {}
        self._workers: dict[str, WorkerStatus] = {}
        self._lock = threading.Lock()
        client = options.client
        if options.publish_status:
            client = replace(client, will_topic=self.status_topic, will_payload=EdgeStatus(options.edge_id, "offline").to_json_bytes())
        self.client = BridgeClient(client, self._on_message, on_connect=self._on_connect)

    def start(self, timeout_s: float = 5.0) -> CloudLink:
        """Connect (in the background) and wait up to ``timeout_s``; a missing broker is not fatal."""
        self.client.subscribe(self.results_topic, qos=1)
        self.client.subscribe(worker_status_filter(), qos=1)
        self.client.start()
        if not self.client.wait_connected(timeout_s):
            log.warning("no broker at %s yet; cloud jobs fail with CloudUnavailable until it is reachable", self.client.url)
        return self

    def close(self) -> None:
        if not self.options.publish_status:
            self.client.stop()
            return
        status = EdgeStatus(self.options.edge_id, "offline", round(time.time(), 3)).to_json_bytes()
        self.client.stop(final=(self.status_topic, status))

    def __enter__(self) -> CloudLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- workers ------------------------------------------------------------------------------

    def workers(self, model_hash: str | None = None) -> list[WorkerStatus]:
        """Online workers (serving ``model_hash`` if given), from their retained statuses."""
        with self._lock:
            found = [w for w in self._workers.values() if w.state == "online"]
        return [w for w in found if model_hash is None or w.serves(model_hash)]

    def worker_status(self, worker_id: str) -> WorkerStatus | None:
        """The last status seen from ``worker_id`` (online or offline), or None."""
        with self._lock:
            return self._workers.get(worker_id)

    def wait_for_workers(self, model_hash: str, count: int = 1, timeout_s: float = 10.0) -> list[WorkerStatus]:
        """Block until ``count`` online workers serve ``model_hash``; raise CloudUnavailable after ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while True:
            found = self.workers(model_hash)
            if len(found) >= count:
                return found
            if time.monotonic() > end:
                raise CloudUnavailable(
                    f"{len(found)} of {count} worker(s) for model {model_hash[:12]}… online after {timeout_s:.0f} s; start `msao cloud`"
                )
            time.sleep(0.05)

    # -- jobs ---------------------------------------------------------------------------------

    def submit(
        self, header: JobHeader, tensors: Mapping[str, np.ndarray], *, worker_id: str | None = None, compress: bool | None = None
    ) -> JobResult:
        """Send a job and wait for its result until ``header.deadline_unix_s``.

        Args:
            worker_id: send to this worker only (decode steps of its KV session); no
                re-dispatch elsewhere.
            compress: zstd the payload; None = when larger than ``compress_above_bytes``.

        Raises:
            CloudUnavailable: no result by the deadline (after one re-dispatch), no broker, or
                a chunked job with no known worker.
            CloudBusy: ``busy`` on both attempts.
            CloudJobFailed: the worker answered with an error (``.code`` says which).
        """
        t0 = time.perf_counter()
        body = payload_from_tensors(tensors, header.to_metadata())
        if compress is None:
            compress = len(body) > self.options.compress_above_bytes
        payload = compress_payload(body, self.options.zstd_level) if compress else body
        encode_ms = (time.perf_counter() - t0) * 1e3
        end = time.monotonic() + header.deadline_unix_s - time.time()
        pending = _Pending()
        pending.model_hash = header.model_hash
        with self._lock:
            self._pending[header.job_id] = pending
        sent = dict(attempts=0, bytes_up=0, chunks_up=0)
        excluded: set[str] = set()
        target = worker_id
        t_sent = time.monotonic()
        target_used: str | None = None
        try:
            while True:
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise self._fail(
                        header, sent, len(body), t_sent, encode_ms, "timeout", CloudUnavailable, "the deadline passed before dispatch"
                    )
                wait = remaining
                if pending.message is None and worker_id is None and self._known_unserved(header.model_hash):
                    raise self._fail(
                        header, sent, len(body), t_sent, encode_ms, "timeout", CloudUnavailable,
                        f"no online worker serves model {header.model_hash[:12]}… (their retained statuses say offline)",
                    )  # fmt: skip
                if pending.message is None:  # else a late answer to the previous attempt is already here
                    topic, target_used = self._route(header, len(payload), target, excluded)
                    pending.event.clear()
                    pending.target, pending.target_offline = target_used, False
                    if pending.message is not None:  # it arrived just now: do not wait for it
                        pending.event.set()
                    t_sent = time.monotonic()
                    try:
                        report = self.client.publish(
                            topic, payload, response_topic=self.results_topic, correlation_data=header.job_id.encode("ascii"),
                            expiry_s=remaining, timeout_s=remaining,
                        )  # fmt: skip
                    except CloudUnavailable as exc:
                        raise self._fail(header, sent, len(body), t_sent, encode_ms, "timeout", CloudUnavailable, str(exc)) from exc
                    sent["attempts"] += 1
                    sent["bytes_up"] += report.wire_bytes
                    sent["chunks_up"] += report.chunks
                    first_wait = self.options.redispatch_after_s or remaining / 2
                    wait = min(remaining, first_wait) if sent["attempts"] == 1 else remaining
                    pending.event.wait(max(0.0, wait))
                if pending.cancelled:
                    raise self._fail(header, sent, len(body), t_sent, encode_ms, "cancelled", CloudUnavailable, "cancelled by the edge")
                msg = pending.message
                if msg is not None:
                    result, busy_worker = self._decode(header, msg, sent, len(body), t_sent, encode_ms)
                    if result is not None:
                        return result
                    excluded.add(busy_worker)
                    pending.message = None
                    if sent["attempts"] >= 2:
                        raise self._fail(header, sent, len(body), t_sent, encode_ms, "busy", CloudBusy, "every worker tried answered busy")
                    target = worker_id  # a session's steps stay with its worker
                    continue
                if sent["attempts"] >= 2 or end - time.monotonic() <= 0:
                    where = f"worker {target_used} went offline" if pending.target_offline else "no result"
                    raise self._fail(header, sent, len(body), t_sent, encode_ms, "timeout", CloudUnavailable, where)
                why = "went offline" if pending.target_offline else f"gave no result in {wait:.2f} s"
                log.info("job %s: %s %s; re-dispatching once", header.job_id, target_used or "the worker", why)
                if target_used and worker_id is None:
                    excluded.add(target_used)
        finally:
            with self._lock:
                self._pending.pop(header.job_id, None)

    def cancel(self, job_id: str) -> bool:
        """Stop waiting for ``job_id`` (its ``submit`` raises ``CloudUnavailable`` at once); False if not pending.

        The worker may still run it; its result is then dropped as late. Speculation uses this
        when the edge's own answer was committed first.
        """
        with self._lock:
            p = self._pending.get(job_id)
        if p is None:
            return False
        p.cancelled = True
        p.event.set()
        return True

    def answer(
        self,
        model_hash: str,
        question: str,
        *,
        job_id: str | None = None,
        image: bytes | None = None,
        image_tokens: np.ndarray | None = None,
        keep: np.ndarray | None = None,
        prompt: Mapping[str, np.ndarray] | None = None,
        exit_layer: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        deadline_s: float = 5.0,
    ) -> RemoteAnswer:
        """A whole-model answer: image bytes (PNG/JPEG), or kept image tokens + their indices.

        Args:
            image: the image file's bytes; ``b""`` = a text-only turn (the job carries no tensor).
            prompt: instead of image / image_tokens / keep, the job's prompt tensors as an upload
                form builds them (``msao.edge_runtime.uploads.upload_tensors``).
            job_id: the job's id (to ``cancel`` it from another thread); None = a fresh one.
            max_new_tokens: the answer's budget, the end token included.
        """
        if sum(x is not None for x in (image, image_tokens, prompt)) != 1:
            raise ConfigError("answer needs exactly one of image (file bytes, b\"\" for text-only), image_tokens (+ keep) or prompt")
        tensors: dict[str, np.ndarray] = {}
        if prompt is not None:
            if keep is not None:
                raise ConfigError("a prompt carries its own keep-set")
            tensors.update(prompt)
        elif image is not None:
            if image:  # b"": a text-only turn carries no tensor
                tensors["image"] = np.frombuffer(image, np.uint8)
        else:
            if keep is None:
                raise ConfigError("image_tokens need keep: the token indices they came from")
            tensors["image_tokens"] = np.asarray(image_tokens)
        if keep is not None:
            tensors["keep"] = np.asarray(keep, np.int64)
        header = JobHeader(
            job_id=job_id or new_job_id(), model_hash=model_hash, kind="answer", deadline_unix_s=time.time() + deadline_s, question=question,
            max_new_tokens=max_new_tokens, exit_layer=-1 if exit_layer is None else exit_layer,
        )  # fmt: skip
        res = self.submit(header, tensors)
        ids = tuple(int(t) for t in res.tensors["token_ids"])
        probs = tuple(float(p) for p in res.tensors["token_probs"])
        return RemoteAnswer(res.header.text, ids, probs, res.header.confidence, res.header.worker_id, res.stats)

    def verify(
        self,
        model_hash: str,
        session_id: str,
        drafts: np.ndarray,
        *,
        committed: int,
        job_id: str | None = None,
        worker_id: str | None = None,
        question: str = "",
        prompt: Mapping[str, np.ndarray] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        deadline_s: float = 5.0,
        decode_ahead: int = 0,
    ) -> VerifiedBlock:
        """Send one block of drafts (k,) for the large model to check in one forward pass.

        Args:
            committed: answer tokens the session has committed before this block; 0 = the first
                block, which carries ``question``, ``prompt`` (an answer job's tensors: image
                [+ keep], image_tokens + keep, or none) and ``max_new_tokens``, to any worker.
            worker_id: later blocks: the worker holding the session (``VerifiedBlock.worker_id``).
            decode_ahead: the large model then decodes up to this many more of its own tokens,
                committed with the block's (``VerifySession.verify``).
        """
        tensors: dict[str, np.ndarray] = {"draft": np.asarray(drafts, np.int64)}
        if committed == 0:
            tensors.update(prompt or {})
        elif prompt:
            raise ConfigError("only the first block (committed=0) carries the prompt")
        header = JobHeader(
            job_id=job_id or new_job_id(), model_hash=model_hash, kind="verify", deadline_unix_s=time.time() + deadline_s,
            session_id=session_id, past_length=committed, question=question if committed == 0 else "",
            max_new_tokens=max_new_tokens, decode_ahead=decode_ahead,
        )  # fmt: skip
        res = self.submit(header, tensors, worker_id=worker_id)
        ids = tuple(int(t) for t in res.tensors["token_ids"])
        probs = tuple(float(p) for p in res.tensors["token_probs"])
        h = res.header
        if not ids or len(ids) != len(probs) or h.past_length != committed + len(ids):
            raise CloudJobFailed(
                f"worker {h.worker_id}: verify result of job {header.job_id} is inconsistent ({len(ids)} tokens, {len(probs)} "
                f"probabilities, {h.past_length} committed after {committed})",
                "internal",
            )
        return VerifiedBlock(ids, probs, h.past_length, h.finish_reason, h.worker_id, res.stats)

    def probe(
        self, model_hash: str, up_bytes: int, reply_bytes: int = 0, deadline_s: float = 5.0, worker_id: str | None = None
    ) -> TransferStats:
        """Measure the link: ``up_bytes`` to a worker, ``reply_bytes`` back, no compute, no compression."""
        header = JobHeader(new_job_id(), model_hash, "probe", time.time() + deadline_s, reply_bytes=reply_bytes)
        return self.submit(header, {"probe": np.zeros(up_bytes, np.uint8)}, worker_id=worker_id, compress=False).stats

    # -- internals ----------------------------------------------------------------------------

    def _route(self, header: JobHeader, size: int, target: str | None, excluded: set[str]) -> tuple[str, str | None]:
        if target:
            return worker_job_topic(target, header.model_hash), target
        if size + PACKET_MARGIN_BYTES <= self.client.max_packet_bytes:
            pick = self._pick(header.model_hash, excluded) if excluded else None
            return (worker_job_topic(pick, header.model_hash), pick) if pick else (job_topic(header.model_hash), None)
        pick = self._pick(header.model_hash, excluded) or self._pick(header.model_hash, set())
        if pick is None:
            raise CloudUnavailable(
                f"job {header.job_id} is {size} bytes, above the broker's packet limit ({self.client.max_packet_bytes}), so it goes "
                f"in chunks to one worker, but no worker status for model {header.model_hash[:12]}… has been seen; is `msao cloud` running?"
            )
        return worker_job_topic(pick, header.model_hash), pick

    def _known_unserved(self, model_hash: str) -> bool:
        """Statuses have been seen and none of the online workers serves ``model_hash``: waiting is pointless."""
        with self._lock:
            seen = bool(self._workers)
        return seen and not self.workers(model_hash)

    def _pick(self, model_hash: str, excluded: set[str]) -> str | None:
        candidates = [w for w in self.workers(model_hash) if w.worker_id not in excluded]
        if not candidates:
            return None
        random.shuffle(candidates)
        return min(candidates, key=lambda w: w.queue_depth / max(1, w.queue_capacity)).worker_id

    def _decode(
        self, header: JobHeader, msg: InboundMessage, sent: dict, body_bytes: int, t_sent: float, encode_ms: float
    ) -> tuple[JobResult | None, str]:
        """(result, worker id), or (None, busy worker's id) for ``busy``; raises on error results."""
        rtt_ms = (msg.received_monotonic - t_sent) * 1e3
        t0 = time.perf_counter()
        try:
            decoded = tensors_from_payload(msg.payload, self.options.limits)
            result = ResultHeader.from_metadata(decoded.metadata)
        except CodecError as exc:
            raise self._fail(header, sent, body_bytes, t_sent, encode_ms, "error", CloudJobFailed, f"unreadable result: {exc}") from exc
        decode_ms = (time.perf_counter() - t0) * 1e3
        stats = TransferStats(
            job_id=header.job_id, kind=header.kind, worker_id=result.worker_id, outcome=result.status,
            attempts=sent["attempts"], bytes_up=sent["bytes_up"], bytes_down=msg.wire_bytes, chunks_up=sent["chunks_up"],
            body_bytes_up=body_bytes, rtt_ms=rtt_ms, queue_wait_ms=result.queue_wait_ms, compute_ms=result.compute_ms,
            worker_codec_ms=result.codec_ms, encode_ms=encode_ms, decode_ms=decode_ms,
        )  # fmt: skip
        self.transfers.add(stats)
        if result.status == "ok":
            return JobResult(result, decoded.tensors, stats), result.worker_id
        if result.status == "error":
            raise CloudJobFailed(
                f"worker {result.worker_id}: job {header.job_id} failed ({result.error_code}): {result.error}", result.error_code
            )
        log.info("job %s: worker %s is busy", header.job_id, result.worker_id)
        return None, result.worker_id

    def _fail(self, header, sent, body_bytes, t_sent, encode_ms, outcome, cls, why) -> MsaoError:
        self.transfers.add(
            TransferStats(
                job_id=header.job_id, kind=header.kind, worker_id="", outcome=outcome, attempts=sent["attempts"], bytes_up=sent["bytes_up"],
                bytes_down=0, chunks_up=sent["chunks_up"], body_bytes_up=body_bytes, rtt_ms=(time.monotonic() - t_sent) * 1e3, encode_ms=encode_ms,
            )
        )  # fmt: skip
        what = "cloud busy" if cls is CloudBusy else "no cloud result"
        return cls(
            f"job {header.job_id} ({header.kind} {header.segment}): {what} after {sent['attempts']} attempt(s): {why}; run it on the edge"
        )

    def _on_connect(self) -> None:
        if not self.options.publish_status:
            return
        status = EdgeStatus(self.options.edge_id, "online", round(time.time(), 3), ready=True).to_json_bytes()
        self.client.publish(self.status_topic, status, qos=1, retain=True)

    def _on_message(self, msg: InboundMessage) -> None:
        if msg.topic == self.results_topic:
            job_id = (msg.correlation_data or b"").decode("ascii", "replace")
            with self._lock:
                p = self._pending.get(job_id)
            if p is None:
                self.late_results += 1
                log.debug("result for job %s arrived after its caller stopped waiting (late or duplicate); ignored", job_id)
                return
            p.message = msg
            p.event.set()
        elif msg.topic.startswith(f"{PREFIX}/cloud/status/"):
            self._on_status(msg)

    def _on_status(self, msg: InboundMessage) -> None:
        if not msg.payload:  # a cleared retained status
            with self._lock:
                self._workers.pop(msg.topic.rsplit("/", 1)[-1], None)
            return
        try:
            status = WorkerStatus.from_dict(json.loads(bytes(msg.payload)))
        except (ValueError, TypeError, KeyError, RecursionError, MsaoError) as exc:
            log.warning("ignored a malformed worker status on %s: %s", msg.topic, exc)
            return
        with self._lock:
            self._workers[status.worker_id] = status
            waiting = [p for p in self._pending.values() if p.target == status.worker_id] if status.state == "offline" else []
        if status.state == "offline":  # jobs on the shared topic whose model no online worker serves any more
            with self._lock:
                shared = [p for p in self._pending.values() if p.target is None and p not in waiting]
            waiting += [p for p in shared if self._known_unserved(p.model_hash)]
        for p in waiting:
            p.target_offline = True
            p.event.set()
