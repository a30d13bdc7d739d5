"""The edge runtime: admission, worker threads, scheduling, execution, live estimates, metrics.

Every intake (MQTT, HTTP, ``msao ask``, Python) calls ``EdgeRuntime.submit`` (or the blocking
``answer``); nothing else touches models. The life of one request:

    submit ─► bounded queue (full: RequestError "busy" at once, nothing accepted)
    worker thread ─► decode image (none for a text-only turn) ─► cost inputs (link, cloud queue, edge load, deadline)
                  ─► Scheduler.choose ─► Executor.run (fallback to edge inside)
                  ─► EdgeResponse ─► on_done callback ─► estimates and metrics updated

A request once accepted is answered: by its plan, by the edge after a cloud failure, or with an
explicit error (bad image, deadline). ``stop`` drains the queue first; a request still queued
when the drain time runs out is handed back with ``None`` (the MQTT intake then leaves it
unacknowledged so the broker redelivers it to the next daemon).
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np

from msao.cloud_bridge.link import CloudLink
from msao.edge_runtime.calibration import Calibration
from msao.edge_runtime.dilation import Dilation
from msao.edge_runtime.estimates import EwmaOptions
from msao.edge_runtime.estimator import Estimator, Observation
from msao.edge_runtime.executor import Executor, Outcome, Partial
from msao.edge_runtime.local_model import LocalModel
from msao.edge_runtime.metrics import EdgeMetrics
from msao.edge_runtime.plans import Plan, PlanKind
from msao.edge_runtime.recent import RecentRequests
from msao.edge_runtime.requests import EdgeRequest, EdgeResponse, RequestLimits
from msao.edge_runtime.scheduler import CostInputs, SchedulerOptions
from msao.engines.images import MAX_IMAGE_PIXELS
from msao.errors import ConfigError, ImageError, MsaoError, RequestError

__all__ = ["EdgeRuntime", "RuntimeOptions"]

log = logging.getLogger(__name__)
_IMAGE_UPLOADS = (PlanKind.CLOUD, PlanKind.DRAFT_VERIFY, PlanKind.SPECULATIVE)  # plans whose cloud job carries the image in an upload form

Done = Callable[[EdgeResponse | None], None]


@dataclass(frozen=True)
class RuntimeOptions:
    """How the daemon admits and serves requests (``msao edge --help`` explains each).

    Attributes:
        workers: requests served at once (each on its own thread; local segments share cores).
        queue_size: accepted requests that may wait; one more gets ``busy`` at once.
        max_image_pixels: decoded image size limit (checked from the header before decoding).
        probe_interval_s: with no real transfer for this long, probe the link (1 KB and 64 KB)
            so the estimates stay fresh; 0 = never probe.
        drain_s: on stop, how long queued requests may still be served.
        mas_always: run MAS (and report its values) even when a plan keeps every token; costs
            the MAS time on every request.
        profile_at_start: time every local segment on this device at start (about a second
            per model) instead of trusting the bundle's profile from the export machine.
        edge_dilation: emulate an edge this many times slower (tests and the benchmark, not
            production): every piece of edge compute holds its worker for (k - 1) times its
            measured time, so queueing is real while the CPU stays free for other processes.
            1 = the device's own speed.
        edge_dilation_profile: instead of one factor, a device profile (TOML) with one per kind
            of edge work (``msao.edge_runtime.dilation``; ``bench/profiles/dilation_orin-nx_vs_a100.toml``);
            "" = none. Not both: a profile with ``edge_dilation`` other than 1 is refused.
        recent_requests: served requests the live web view (``GET /ui``) shows, each with a
            small thumbnail (about 10 KB); 0 keeps none.
    """

    workers: int = 2
    queue_size: int = 16
    max_image_pixels: int = MAX_IMAGE_PIXELS
    probe_interval_s: float = 10.0
    drain_s: float = 10.0
    mas_always: bool = False
    profile_at_start: bool = True
    edge_dilation: float = 1.0
    edge_dilation_profile: str = ""
    recent_requests: int = 50
    limits: RequestLimits = RequestLimits()
    scheduler: SchedulerOptions = SchedulerOptions()
    ewma: EwmaOptions = EwmaOptions()

    def __post_init__(self) -> None:
        if self.workers < 1 or self.queue_size < 1 or self.max_image_pixels < 1:
            raise ConfigError(
                f"workers, queue_size and max_image_pixels must be >= 1, got {self.workers}, {self.queue_size}, {self.max_image_pixels}"
            )
        if self.probe_interval_s < 0 or self.drain_s < 0:
            raise ConfigError("probe_interval_s and drain_s must be >= 0")
        if not 0 <= self.recent_requests <= 10_000:
            raise ConfigError(f"recent_requests must be in [0, 10000] (0 turns the web view's history off), got {self.recent_requests}")
        if not 1.0 <= self.edge_dilation <= 1000.0:
            raise ConfigError(f"edge_dilation must be in [1, 1000] (1 = this device's own speed), got {self.edge_dilation}")
        if self.edge_dilation_profile and self.edge_dilation != 1.0:
            raise ConfigError("set edge_dilation (one factor) or edge_dilation_profile (one per kind of work), not both")
        _ = self.dilation  # a profile that does not load fails here, at configuration time (and is read once)

    @functools.cached_property
    def dilation(self) -> Dilation:
        """The emulated edge's factors per kind of work (``Dilation()`` = its own speed)."""
        return Dilation.load(self.edge_dilation_profile) if self.edge_dilation_profile else Dilation.uniform(self.edge_dilation)


@dataclass
class _Item:
    request: EdgeRequest
    accepted: float  # time.monotonic()
    on_done: Done
    on_partial: Partial | None = None
    deadline: float = field(init=False)
    rgb: np.ndarray | None = None  # the decoded image, for the web view's thumbnail (set by _serve)
    relevance: tuple[float, ...] | None = None  # MAS relevance per image token (set by _serve where MAS ran)

    def __post_init__(self) -> None:
        self.deadline = self.accepted + self.request.deadline_ms / 1e3


class EdgeRuntime:
    """The daemon's core, intake-agnostic. Start it, submit requests, stop it.

    Args:
        edge: the edge (draft) model.
        large: the large model's bundle held on the edge (split and local-large plans, and
            the cloud model's identity for cloud jobs); None = edge-only.
        link: the cloud link (None = no cloud: every plan is local).
        calibration: accuracy tables from ``msao calibrate`` (None: see ``Scheduler``).
    """

    def __init__(
        self,
        edge: LocalModel,
        large: LocalModel | None = None,
        link: CloudLink | None = None,
        calibration: Calibration | None = None,
        options: RuntimeOptions = RuntimeOptions(),
    ):
        self.options = options
        self.edge, self.large, self.link = edge, large, link
        self.estimator = Estimator(options.scheduler, edge.manifest, large.manifest if large else None, calibration, options.ewma,
                                   options.workers, large_on_edge=large is not None and large.resident)  # fmt: skip
        self.scheduler = self.estimator.scheduler
        self.load = self.estimator.load
        pair = self.scheduler.pair
        self.executor = Executor(
            edge, large, link, speculation_threads=2 * options.workers, mas_always=options.mas_always, dilation=options.dilation,
            commit_score=pair.commit_score if pair is not None and pair.verifier is not None else None,
            round_trip_ms=lambda: self.estimator.link.snapshot().transfer_ms(700, 700),
        )  # fmt: skip
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=options.queue_size)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.recent = RecentRequests(options.recent_requests)  # what GET /ui shows
        self.metrics = EdgeMetrics(queue_depth=lambda: float(self._queue.qsize()), cloud_available=lambda: float(self.cloud_ok()))
        if link is not None:
            link.transfers.subscribe(self.estimator.observe_transfer)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> EdgeRuntime:
        if self.options.profile_at_start:
            k = self.executor.dilation.prefill  # a dilated edge's starting scale: its prefill's (a request's largest share); the clock learns the rest
            self.estimator.profile_local(PlanKind.EDGE, self.edge.profile(), lambda: k * self.edge.timed_request())
            if self.large is not None and self.large.resident:
                large = self.large
                self.estimator.profile_local(PlanKind.LOCAL_LARGE, large.profile(), lambda: k * large.timed_request())
        for i in range(self.options.workers):
            t = threading.Thread(target=self._work, name=f"msao-edge-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.link is not None and self.large is not None and self.options.probe_interval_s > 0:
            t = threading.Thread(target=self._probe_loop, name="msao-edge-link-probe", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "edge runtime up: %d workers, queue %d, policy %s, models %s%s, cloud %s",
            self.options.workers, self.options.queue_size, self.options.scheduler.policy, self.edge.name,
            f" + {self.large.name}" if self.large else "", "link configured" if self.link else "none (edge-only)",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Serve what is queued for up to ``drain_s``, then hand back the rest with ``None``."""
        end = time.monotonic() + self.options.drain_s
        while not self._queue.empty() and time.monotonic() < end:
            time.sleep(0.02)
        self._stopping.set()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            _deliver(item, None)
        for t in self._threads:
            t.join(timeout=5.0)
        self.executor.close()

    @property
    def ready(self) -> bool:
        return not self._stopping.is_set() and any(t.is_alive() for t in self._threads)

    def cloud_ok(self) -> bool:
        if self.link is None or self.large is None or not self.link.client.connected:
            return False
        return bool(self.link.workers(self.large.manifest.model_hash))

    def health(self) -> dict:
        """What ``/readyz`` and ``msao edge`` status show: degraded = edge-only, still ready."""
        cloud = self.cloud_ok()
        link = self.estimator.link.snapshot()
        return {
            "ready": self.ready,
            "mode": "collaborative" if cloud else "edge-only",
            "degraded": not cloud,
            "models": {"edge": self.edge.name, "large": self.large.name if self.large else None},
            "policy": self.options.scheduler.policy,
            "queue_depth": self._queue.qsize(),
            "running": self.load.running,
            "link": {"rtt_ms": round(link.rtt_ms, 3), "bandwidth_mbps": round(link.bandwidth_bps / 1e6, 3), "measured": link.measured},
            "edge_scale": round(self.estimator.edge_clock.scale, 3),
            "cloud_scale": round(self.estimator.cloud_clock.scale, 3) if self.estimator.cloud_clock else None,
        }

    # -- intake ---------------------------------------------------------------------------------

    def submit(self, request: EdgeRequest, on_done: Done, on_partial: Partial | None = None) -> None:
        """Accept ``request`` or refuse it at once.

        ``on_partial`` (on a serving thread) gets the answer's text so far whenever more of it is
        final before the end: the speculative plan's verified tokens, each a prefix of the answer
        ``on_done`` gets unless that one failed. Other plans commit whole answers and never call it.

        Raises:
            RequestError: ``busy`` (queue full) or ``unavailable`` (stopping); nothing was accepted.
        """
        if self._stopping.is_set():
            self.metrics.rejected.inc(code="unavailable")
            raise RequestError("the edge daemon is shutting down; send the request again in a moment", "unavailable")
        try:
            self._queue.put_nowait(_Item(request, time.monotonic(), on_done, on_partial))
        except queue.Full:
            self.metrics.rejected.inc(code="busy")
            raise RequestError(
                f"the edge is busy: {self.options.queue_size} requests already wait; retry later or raise --queue-size", "busy"
            ) from None
        self.load.enqueue()

    def answer(self, request: EdgeRequest, timeout_s: float | None = None) -> EdgeResponse:
        """Submit and wait (the Python API); a refusal comes back as a ``busy``/``error`` response."""
        wait = timeout_s if timeout_s is not None else request.deadline_ms / 1e3 + 30.0
        try:
            result = self.submit_and_wait(request, wait)
        except RequestError as exc:
            return EdgeResponse.failure(request.request_id, exc.code, str(exc))
        return result or EdgeResponse.failure(request.request_id, "unavailable", "the daemon stopped before serving this request")

    def submit_and_wait(self, request: EdgeRequest, timeout_s: float) -> EdgeResponse | None:
        """Submit and wait, keeping apart what ``answer`` folds into one failed response: for an
        intake that answers a refusal, a timeout and a stop differently (the HTTP intake).

        Returns:
            The response (``ok`` or a served failure), or None when the daemon stopped before
            serving the request (nothing was answered; it may be sent again).

        Raises:
            RequestError: refused at once (``busy``, ``unavailable``); nothing was accepted.
            concurrent.futures.TimeoutError: no answer within ``timeout_s``; the request stays
                accepted and its late answer is dropped.
        """
        fut: Future[EdgeResponse | None] = Future()
        self.submit(request, fut.set_result)
        return fut.result(timeout=timeout_s)

    # -- serving --------------------------------------------------------------------------------

    def _work(self) -> None:
        for model in (self.edge, self.large):
            if model is not None and model.resident:
                model.warm_up()  # this thread's generator, sessions and question cache
        while not self._stopping.is_set():
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self.load.start()
            kind: PlanKind | None = None
            try:
                kind, response = self._serve(item)
            except Exception as exc:  # a bug: answer anyway, keep the worker alive
                log.exception("request %s: internal error", item.request.request_id, extra={"request_id": item.request.request_id})
                response = EdgeResponse.failure(
                    item.request.request_id, "internal", f"internal error ({type(exc).__name__}); see the daemon log"
                )
            finally:
                self.load.finish()
            self.metrics.requests.inc(plan=kind.value if kind else "none", outcome=response.error_code or "ok")
            _deliver(item, response)
            self._remember(item, response)  # after delivery: the thumbnail costs the client nothing

    def _serve(self, item: _Item) -> tuple[PlanKind | None, EdgeResponse]:
        req = item.request
        queue_ms = (time.monotonic() - item.accepted) * 1e3
        if time.monotonic() >= item.deadline:
            return None, EdgeResponse.failure(
                req.request_id, "deadline", f"the deadline of {req.deadline_ms:.0f} ms passed while queued ({queue_ms:.0f} ms)"
            )
        rgb, decode_ms = None, 0.0  # a text-only turn: nothing to decode
        if not req.text_only:
            try:
                rgb, decode_ms = self.edge.decode(req.image, self.options.max_image_pixels)
                item.rgb = rgb
                decode_ms = self.executor.dilate(decode_ms, "image_decode")
            except ImageError as exc:
                return None, EdgeResponse.failure(req.request_id, "bad_image", str(exc))
        inputs = self._cost_inputs(req, item.deadline)
        try:
            plan = self.scheduler.choose(inputs, req.policy, req.split_layer, req.keep_ratio)
        except ConfigError as exc:
            return None, EdgeResponse.failure(req.request_id, "bad_request", str(exc))
        log.debug("request %s: plan %s (%s)", req.request_id, plan.describe(), plan.reason, extra={"request_id": req.request_id})
        try:
            out = self.executor.run(plan, req, rgb, decode_ms, item.deadline, item.on_partial)
        except MsaoError as exc:  # bad input found while running (e.g. MAS refused the question)
            return plan.kind, EdgeResponse.failure(req.request_id, "bad_request", str(exc))
        total_ms = (time.monotonic() - item.accepted) * 1e3
        item.relevance = out.relevance
        log.info(
            "request %s: %s by the %s in %.1f ms (%s)%s", req.request_id, plan.describe(), out.answered_by, total_ms,
            "ok" if total_ms <= req.deadline_ms else "late", f"; fallback: {out.fallback}" if out.fallback else "",
            extra={"request_id": req.request_id, "plan": plan.describe(), "answered_by": out.answered_by, "latency_ms": round(total_ms, 3)},
        )  # fmt: skip
        self.estimator.observe(plan, Observation(out.answered_by, out.local_observed_ms, out.timings_ms.get("mas", 0.0), bool(out.fallback)), inputs)
        timings = {"queue": round(queue_ms, 3), **out.timings_ms, "total": round(total_ms, 3)}
        self._record(plan, out, timings)
        late = total_ms > req.deadline_ms
        return plan.kind, EdgeResponse(
            request_id=req.request_id, status="error" if late else "ok", answer=out.answer, confidence=round(out.confidence, 5),
            answered_by=out.answered_by, model=out.model, plan=plan.describe(), reason=plan.reason + (f"; {out.speculation}" if out.speculation else ""),
            fallback=out.fallback, mas=out.mas, timings_ms=timings, bytes_up=out.bytes_up, bytes_down=out.bytes_down,
            flops_edge=out.flops_edge, flops_cloud=out.flops_cloud, prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens, finish_reason=out.finish_reason, image_cached=out.image_cached,
            upload=plan.upload if out.bytes_up and plan.kind in _IMAGE_UPLOADS else "",
            error_code="deadline" if late else "", error=f"answered after {total_ms:.0f} ms, past the {req.deadline_ms:.0f} ms deadline" if late else "",
        )  # fmt: skip

    # -- live estimates -------------------------------------------------------------------------

    def cloud_queue_depth(self) -> float:
        """Jobs waiting per thread on the least loaded cloud worker of the large model (0 with no cloud)."""
        if not self.cloud_ok():
            return 0.0
        assert self.link is not None and self.large is not None
        workers = self.link.workers(self.large.manifest.model_hash)
        return min((w.queue_depth / max(1, w.threads) for w in workers), default=0.0)

    def _cost_inputs(self, req: EdgeRequest, deadline: float) -> CostInputs:
        cloud = self.cloud_ok()
        depth = self.cloud_queue_depth() if cloud else 0.0
        return self.estimator.snapshot(
            cloud_ok=cloud, cloud_queue_depth=depth, image_bytes=len(req.image), deadline_ms=(deadline - time.monotonic()) * 1e3,
            token_budget=req.token_budget,
        )

    def _remember(self, item: _Item, response: EdgeResponse | None) -> None:
        """Hand a served request to the web view's ring; a failure to draw it is logged, never raised."""
        if response is None:
            return
        model = self.edge
        if self.large is not None and item.relevance is not None and len(item.relevance) == self.large.n_tokens != self.edge.n_tokens:
            model = self.large  # the large model's encoder ran MAS (a split or local-large plan): its crop and grid
        try:
            self.recent.record(item.request, response, item.rgb, item.relevance, model.manifest.preprocess)
        except Exception:
            log.exception("request %s: could not keep it for the web view", item.request.request_id)

    def _record(self, plan: Plan, out: Outcome, timings: dict[str, float]) -> None:
        m = self.metrics
        m.answered_by.inc(side=out.answered_by)
        m.latency.observe(timings["total"] / 1e3, plan=plan.kind)
        for stage, ms in timings.items():
            if stage != "total":
                m.stages.observe(ms / 1e3, stage=stage)
        m.bytes.inc(out.bytes_up, direction="up")
        m.bytes.inc(out.bytes_down, direction="down")
        if out.fallback:
            m.fallbacks.inc(plan=plan.kind)

    def _probe_loop(self) -> None:
        assert self.link is not None and self.large is not None
        h = self.large.manifest.model_hash
        while not self._stopping.wait(self.options.probe_interval_s / 2):
            if time.monotonic() - self.estimator.last_transfer < self.options.probe_interval_s or not self.cloud_ok():
                continue
            try:
                self.link.probe(h, 1024, deadline_s=2.0)
                self.link.probe(h, 64 * 1024, deadline_s=5.0)
            except MsaoError as exc:
                log.debug("link probe failed: %s", exc)


def _deliver(item: _Item, response: EdgeResponse | None) -> None:
    if response is not None and item.request.context is not None:  # every answer echoes the caller's context
        response = replace(response, context=item.request.context)
    try:
        item.on_done(response)
    except Exception:
        log.exception(
            "request %s: the intake's completion callback failed", item.request.request_id, extra={"request_id": item.request.request_id}
        )
