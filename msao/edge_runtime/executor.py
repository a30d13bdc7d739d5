"""Runs one plan for one request: local segments, remote segments, speculation, fallback.

Local work runs on this worker thread (``LocalModel``); cloud work goes through the cloud
bridge (``CloudLink``, ``RemoteRunner``). Speculation is real: in a speculative draft/verify
plan the cloud job is published as soon as the edge's keep-set is known, on a helper thread,
while this thread keeps computing the edge answer; whichever answer is committed first wins
and the other path is cancelled (the link stops waiting; a late cloud result is dropped).

Any cloud failure (``CloudError``: no broker, no worker, busy, a deadline missed, an error
result) turns into an edge-only answer with the reason in ``fallback``; the request is never
dropped. Decides no placement: the plan comes from the scheduler.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace

import numpy as np

from msao.cloud_bridge.link import CloudLink, RemoteAnswer, new_job_id
from msao.cloud_bridge.remote_runner import RemoteOptions, RemoteRunner
from msao.edge_runtime.local_model import LocalModel, Prepared
from msao.edge_runtime.requests import EdgeRequest
from msao.edge_runtime.scheduler import Plan
from msao.engines.flops import request_flops
from msao.engines.generation import Answer
from msao.errors import CloudError, CloudUnavailable

__all__ = ["Executor", "Outcome"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What running a plan produced (the runtime turns it into an ``EdgeResponse``)."""

    answer: str
    confidence: float
    answered_by: str  # edge | cloud
    model: str
    fallback: str = ""
    mas: dict[str, float] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    flops_edge: int = 0  # FLOPs this request cost on each side (segment FLOPs models x tokens processed)
    flops_cloud: int = 0
    local_observed_ms: float = 0.0  # local compute, for the live scale of the local clock
    speculation: str = ""  # draft_verify: what became of the draft and the cloud job


def _vision_flops(model: LocalModel, p: Prepared) -> int:
    """The encoder run that prepared ``p`` (0 when a stream frame reused its tokens)."""
    if p.skipped_encoder:
        return 0
    return request_flops(model.manifest, image_tokens=0, text_tokens=0, new_tokens=0, layers=(0, 0), include_head=False)


def _local_flops(model: LocalModel, p: Prepared, a: Answer) -> int:
    """A whole local answer: encoder (unless reused), prefill of the kept tokens, decode steps."""
    return request_flops(
        model.manifest, image_tokens=a.kept_tokens, text_tokens=a.text_tokens, new_tokens=len(a.token_ids),
        include_vision=not p.skipped_encoder,
    )  # fmt: skip


def _mas_fields(p: Prepared) -> dict[str, float]:
    out: dict[str, float] = {"kept_tokens": float(p.kept_tokens), "image_tokens": float(p.encoding.tokens.shape[0])}
    if p.mas is not None:
        v = p.mas.values
        out.update(image=round(v.image, 4), text=round(v.text, 4), image_necessity=round(v.image_necessity, 4))
    if p.skipped_encoder:
        out["encoder_skipped"] = 1.0
    return out


class _CountingTail(RemoteRunner):
    """A remote ``decoder[k:L]`` + head that adds up the bytes of every job it sends."""

    bytes_up = 0
    bytes_down = 0
    cloud_ms = 0.0

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        try:
            return super()._infer(feeds)
        finally:
            self.cloud_ms += (time.perf_counter() - t0) * 1e3
            if self.last_stats is not None:
                self.bytes_up += self.last_stats.bytes_up
                self.bytes_down += self.last_stats.bytes_down


class Executor:
    """Executes plans; one instance shared by the daemon's worker threads (thread-safe).

    Args:
        edge: the edge model. large: the large model held on the edge (split, local_large).
        link: the cloud link (None: edge-only deployment; cloud plans fall back).
        speculation_threads: helper threads that wait for speculative cloud answers.
    """

    def __init__(
        self, edge: LocalModel, large: LocalModel | None, link: CloudLink | None, speculation_threads: int = 4, mas_always: bool = False
    ):
        self.edge, self.large, self.link = edge, large, link
        self.mas_always = mas_always  # run MAS for its values even when every token is kept
        self._pool = ThreadPoolExecutor(max_workers=speculation_threads, thread_name_prefix="msao-speculate")

    def _prepare(self, model: LocalModel, rgb: np.ndarray, request: EdgeRequest, keep_ratio: float, decode_ms: float) -> Prepared:
        return model.prepare(rgb, request.question, keep_ratio, stream_id=request.stream_id, analyse=self.mas_always, decode_ms=decode_ms)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run(
        self, plan: Plan, request: EdgeRequest, rgb: np.ndarray, decode_ms: float, deadline: float, fallback_reserve_s: float = 0.0
    ) -> Outcome:
        """Run ``plan``; ``deadline`` is ``time.monotonic()`` by which the answer must be committed.

        Args:
            fallback_reserve_s: time kept back from cloud and split plans for an edge-only answer
                if the cloud fails; their cloud jobs get ``deadline - fallback_reserve_s``.
                (A draft/verify plan needs none: its fallback, the draft, is already there.)
        """
        if plan.kind == "edge":
            return self._local(self.edge, plan, request, rgb, decode_ms)
        if plan.kind == "local_large":
            return self._local(self._large(), plan, request, rgb, decode_ms)
        if plan.kind == "cloud":
            return self._cloud(plan, request, rgb, decode_ms, deadline - fallback_reserve_s)
        if plan.kind == "split":
            return self._split(plan, request, rgb, decode_ms, deadline - fallback_reserve_s)
        return self._draft_verify(plan, request, rgb, decode_ms, deadline)

    # -- plans ------------------------------------------------------------------------------

    def _large(self) -> LocalModel:
        if self.large is None:
            raise CloudUnavailable("this plan needs the large model's bundle on the edge (--large-bundle)")
        return self.large

    def _local(self, model: LocalModel, plan: Plan, request: EdgeRequest, rgb: np.ndarray, decode_ms: float, fallback: str = "") -> Outcome:
        p = self._prepare(model, rgb, request, plan.keep_ratio, decode_ms)
        return self._local_answer(model, p, request, fallback)

    def _local_answer(self, model: LocalModel, p: Prepared, request: EdgeRequest, fallback: str = "", **extra_timings: float) -> Outcome:
        a = model.answer(p, request.question)
        return self._draft_outcome(model, p, a, fallback, **extra_timings)

    def _draft_outcome(self, model: LocalModel, p: Prepared, a: Answer, fallback: str = "", **extra_timings: float) -> Outcome:
        """An answer computed here (by ``model`` from ``p``), committed."""
        local_ms = a.timings.embed_ms + a.timings.prefill_ms + a.timings.decode_ms
        return Outcome(
            a.text, a.confidence, "edge", model.name, fallback, _mas_fields(p), self._timings(p, local=local_ms, **extra_timings),
            flops_edge=_local_flops(model, p, a), local_observed_ms=p.vision_ms + local_ms,
        )  # fmt: skip

    def _cloud_flops(self, question: str, kept: int, new_tokens: int) -> int:
        """The large model answering in the cloud from ``kept`` image tokens."""
        large = self._large()
        prefix, suffix = large.generator().prompt_ids(question)
        return request_flops(large.manifest, image_tokens=kept, text_tokens=len(prefix) + len(suffix), new_tokens=new_tokens)

    @staticmethod
    def _timings(p: Prepared, **more: float) -> dict[str, float]:
        t = {"decode_image": p.decode_ms, "vision": p.vision_ms, "mas": p.mas_ms}
        t.update(more)
        return {k: round(v, 3) for k, v in t.items()}

    def _remaining_s(self, deadline: float) -> float:
        return deadline - time.monotonic()

    def _cloud_answer(self, request: EdgeRequest, keep: np.ndarray | None, deadline: float, job_id: str) -> RemoteAnswer:
        if self.link is None:
            raise CloudUnavailable("no cloud link configured (--broker)")
        large = self._large()
        remaining = self._remaining_s(deadline)
        if remaining <= 0.005:
            raise CloudUnavailable("no time left in the request's deadline for a cloud job")
        return self.link.answer(
            large.manifest.model_hash, request.question, job_id=job_id, image=request.image, keep=keep, deadline_s=remaining
        )

    def _cloud_outcome(self, request: EdgeRequest, r: RemoteAnswer, p: Prepared | None, cloud_ms: float, **timings: float) -> Outcome:
        kept = p.kept_tokens if p is not None else self._large().n_tokens
        return Outcome(
            r.text, r.confidence, "cloud", self._large().name, "", _mas_fields(p) if p else {},
            {**(self._timings(p) if p else {}), "cloud": round(cloud_ms, 3), **{k: round(v, 3) for k, v in timings.items()}},
            r.stats.bytes_up, r.stats.bytes_down, flops_edge=_vision_flops(self.edge, p) if p else 0,
            flops_cloud=self._cloud_flops(request.question, kept, len(r.token_ids)),
        )  # fmt: skip

    def _cloud(self, plan: Plan, request: EdgeRequest, rgb: np.ndarray, decode_ms: float, deadline: float) -> Outcome:
        p = None
        if plan.send_keep:  # the edge model's encoder + MAS pick the tokens the cloud prefills
            p = self._prepare(self.edge, rgb, request, plan.keep_ratio, decode_ms)
        t0 = time.perf_counter()
        job_id = new_job_id()
        try:
            r = self._cloud_answer(request, p.keep if p else None, deadline, job_id)
        except CloudError as exc:
            return self._fallback(exc, request, rgb, decode_ms, p, *self._sent(job_id))
        return self._cloud_outcome(request, r, p, (time.perf_counter() - t0) * 1e3, decode_image=decode_ms)

    def _split(self, plan: Plan, request: EdgeRequest, rgb: np.ndarray, decode_ms: float, deadline: float) -> Outcome:
        large = self._large()
        if self.link is None:
            return self._fallback(CloudUnavailable("no cloud link configured"), request, rgb, decode_ms)
        p = self._prepare(large, rgb, request, plan.keep_ratio, decode_ms)
        remaining = self._remaining_s(deadline)
        if remaining <= 0.005:
            return self._fallback(CloudUnavailable("no time left for the split"), request, rgb, decode_ms)
        tail = _CountingTail(self.link, large.manifest, plan.split_layer, options=RemoteOptions(deadline_s=remaining))
        try:
            a: Answer = large.answer(p, request.question, tail=(plan.split_layer, tail))
        except CloudError as exc:
            return self._fallback(exc, request, rgb, decode_ms, bytes_up=tail.bytes_up, bytes_down=tail.bytes_down)
        local_ms = a.timings.embed_ms + a.timings.prefill_ms + a.timings.decode_ms - tail.cloud_ms
        k, n = plan.split_layer, large.manifest.model.num_layers
        tokens = dict(image_tokens=a.kept_tokens, text_tokens=a.text_tokens, new_tokens=len(a.token_ids))
        return Outcome(
            a.text, a.confidence, "cloud", large.name, "", _mas_fields(p),
            self._timings(p, local=local_ms, cloud=tail.cloud_ms), tail.bytes_up, tail.bytes_down,
            flops_edge=request_flops(large.manifest, **tokens, layers=(0, k), include_head=False, include_vision=not p.skipped_encoder),
            flops_cloud=request_flops(large.manifest, **tokens, layers=(k, n), include_vision=False),
        )  # fmt: skip

    def _draft_verify(self, plan: Plan, request: EdgeRequest, rgb: np.ndarray, decode_ms: float, deadline: float) -> Outcome:
        p = self._prepare(self.edge, rgb, request, plan.keep_ratio, decode_ms)
        keep = p.keep if plan.send_keep and self._large().n_tokens == self.edge.n_tokens else None
        job_id = new_job_id()
        started = time.perf_counter()
        future: Future | None = None
        if plan.speculate:  # publish now; the edge answer is computed meanwhile
            future = self._pool.submit(self._cloud_answer, request, keep, deadline, job_id)
        draft = self.edge.answer(p, request.question)
        committed = self._draft_outcome(self.edge, p, draft)
        kept = p.kept_tokens if keep is not None else self._large().n_tokens
        if draft.confidence >= plan.commit_threshold:
            if future is None or self.link is None:
                return replace(committed, speculation="edge committed")
            spec = "edge committed; " + ("speculative cloud answer unused" if future.done() else "speculative cloud job cancelled")
            if not future.done():
                self.link.cancel(job_id)
                wait([future], timeout=0.5)  # the link lets go at once; its bytes are then logged
            up, down = self._sent(job_id)  # the speculation's cost is counted even when it lost
            # the worker likely ran the job it was sent (a cancel only stops the waiting): counted as its cost
            cloud = self._cloud_flops(request.question, kept, len(draft.token_ids)) if up else 0
            return replace(committed, bytes_up=up, bytes_down=down, flops_cloud=cloud, speculation=spec)
        if future is None:
            future = self._pool.submit(self._cloud_answer, request, keep, deadline, job_id)
        try:
            r: RemoteAnswer = future.result(timeout=max(0.0, self._remaining_s(deadline)) + 0.05)
        except (CloudError, FutureTimeout) as exc:
            if self.link is not None:
                self.link.cancel(job_id)
                wait([future], timeout=0.5)
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else "the cloud gave no answer within the deadline"
            log.info(
                "request %s: draft/verify falls back to the edge draft (%s)", request.request_id, reason,
                extra={"request_id": request.request_id},
            )  # fmt: skip
            up, down = self._sent(job_id)
            return replace(committed, fallback=reason, bytes_up=up, bytes_down=down, speculation="cloud failed")
        cloud_ms = (time.perf_counter() - started) * 1e3
        out = self._cloud_outcome(request, r, p, cloud_ms, local=committed.timings_ms.get("local", 0.0))
        return replace(out, flops_edge=committed.flops_edge, local_observed_ms=committed.local_observed_ms, speculation="cloud committed")

    def _sent(self, job_id: str) -> tuple[int, int]:
        """Bytes up and down of a cloud job that did not deliver (cancelled, failed), from the link's log."""
        t = self.link.transfers.find(job_id) if self.link is not None else None
        return (t.bytes_up, t.bytes_down) if t is not None else (0, 0)

    # -- fallback ---------------------------------------------------------------------------

    def _fallback(
        self,
        exc: Exception,
        request: EdgeRequest,
        rgb: np.ndarray,
        decode_ms: float,
        prepared: Prepared | None = None,
        bytes_up: int = 0,
        bytes_down: int = 0,
    ) -> Outcome:
        """The edge model answers; ``prepared``: the edge model's tokens when the plan already made them."""
        reason = f"{type(exc).__name__}: {exc}"
        log.warning(
            "request %s: cloud path failed, answering on the edge (%s)",
            request.request_id,
            reason,
            extra={"request_id": request.request_id},
        )
        if prepared is None:
            prepared = self._prepare(self.edge, rgb, request, 1.0, decode_ms)
        out = self._local_answer(self.edge, prepared, request, reason)
        return replace(out, bytes_up=bytes_up, bytes_down=bytes_down)
