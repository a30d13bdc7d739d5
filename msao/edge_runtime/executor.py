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

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace

import numpy as np

from msao.cloud_bridge.link import CloudLink, RemoteAnswer, new_job_id
from msao.cloud_bridge.remote_runner import RemoteOptions, RemoteRunner
from msao.edge_runtime.dilation import Dilation
from msao.edge_runtime.image_cache import image_key
from msao.edge_runtime.local_model import LocalModel
from msao.edge_runtime.plans import Plan, PlanKind, sends_tokens
from msao.edge_runtime.requests import EdgeRequest
from msao.edge_runtime.token_speculation import BlockReply, SpeculationOutcome, speculate
from msao.edge_runtime.uploads import upload_tensors
from msao.edge_runtime.verifier import DraftSample
from msao.engines.flops import request_flops
from msao.engines.generation import Answer, Generator, finish_reason_from_ids
from msao.engines.pipeline import Prepared
from msao.engines.speculation import TokenSequence
from msao.errors import CloudError, CloudUnavailable

__all__ = ["Executor", "Outcome", "Partial"]

log = logging.getLogger(__name__)

Partial = Callable[[str], None]  # gets the answer's text so far whenever more of it is final before the end


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
    prompt_tokens: int = 0  # the committed answer's prefill (text + kept image tokens)
    completion_tokens: int = 0  # its generated tokens, the end token not counted
    finish_reason: str = "stop"  # stop | length
    image_cached: bool = False  # the edge took the image's tokens from its image cache
    relevance: tuple[float, ...] | None = None  # MAS relevance per image token (N,), row-major; None where MAS did not run


def _vision_flops(model: LocalModel, p: Prepared) -> int:
    """The encoder run that prepared ``p`` (0 when its tokens were reused, or for a text-only turn)."""
    if not p.encoder_ran:
        return 0
    return request_flops(model.manifest, image_tokens=0, text_tokens=0, new_tokens=0, layers=(0, 0), include_head=False)


def _local_flops(model: LocalModel, p: Prepared, a: Answer) -> int:
    """A whole local answer: encoder (unless reused or text-only), prefill of the kept tokens, decode steps."""
    return request_flops(
        model.manifest, image_tokens=a.kept_tokens, text_tokens=a.text_tokens, new_tokens=len(a.token_ids),
        include_vision=p.encoder_ran,
    )  # fmt: skip


def _relevance(p: Prepared | None) -> tuple[float, ...] | None:
    """The MAS relevance of each image token (for the web view's heat-map), or None where MAS did not run."""
    return tuple(p.mas.scores.relevance.tolist()) if p is not None and p.mas is not None else None


def _mas_fields(p: Prepared) -> dict[str, float]:
    out: dict[str, float] = {"kept_tokens": float(p.kept_tokens), "image_tokens": float(p.encoding.tokens.shape[0])}
    if p.mas is not None:
        v = p.mas.values
        out.update(image=round(v.image, 4), text=round(v.text, 4), image_necessity=round(v.image_necessity, 4))
    if p.skipped_encoder:
        out["encoder_skipped"] = 1.0
    return out


def _answer_text(gen: Generator, ids: tuple[int, ...]) -> str:
    return gen.tokenizer.decode([t for t in ids if t not in gen.eos], skip_special_tokens=True).strip()


def _partial_text(run: _Run, gen: Generator) -> Callable[[tuple[int, ...]], None]:
    """Verified tokens -> ``run.on_partial(text so far)`` when the text grew (a token may decode to nothing);
    a listener that fails is logged and dropped, never the answer."""
    last = [""]

    def committed(ids: tuple[int, ...]) -> None:
        listener = run.on_partial
        text = _answer_text(gen, ids).rstrip("\ufffd")  # a character cut in the middle waits for its next token
        if listener is None or len(text) <= len(last[0]):
            return
        last[0] = text
        try:
            listener(text)
        except Exception:
            log.exception("request %s: its partial-answer listener failed; it gets no more partials", run.request.request_id)
            run.on_partial = None

    return committed


class _TimedTail(RemoteRunner):
    """A remote ``decoder[k:L]`` + head that adds up its wall time and names every job it sends in ``run.jobs``."""

    def __init__(self, run: _Run, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run = run
        self.cloud_ms = 0.0

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        try:
            return super()._infer(feeds)
        finally:
            self.cloud_ms += (time.perf_counter() - t0) * 1e3
            self.run.jobs.extend(j for j in self.job_ids if j not in self.run.jobs)


@dataclass
class _Run:
    """One request's run of one plan: its inputs, its deadlines, and every cloud job it sent.

    Bytes are looked up by job id in the link's transfer log, so that a request is charged for
    its own jobs only, however many workers and speculation threads share the link.
    """

    plan: Plan
    request: EdgeRequest
    rgb: np.ndarray
    decode_ms: float
    deadline: float  # time.monotonic() by which the answer must be committed
    on_partial: Partial | None = None
    jobs: list[str] = field(default_factory=list)

    @functools.cached_property
    def image_key(self) -> bytes | None:
        """The image cache's key of a still image, hashed only when a plan encodes it here (not for a raw upload)."""
        r = self.request
        return image_key(r.image) if r.image and r.stream_id is None else None

    @property
    def cloud_deadline(self) -> float:
        return self.deadline - self.plan.fallback_reserve_ms / 1e3

    def new_job(self) -> str:
        job_id = new_job_id()
        self.jobs.append(job_id)
        return job_id


class Executor:
    """Executes plans; one instance shared by the daemon's worker threads (thread-safe).

    Args:
        edge: the edge model. large: the large model held on the edge (split, local_large).
        link: the cloud link (None: edge-only deployment; cloud plans fall back).
        speculation_threads: helper threads that wait for speculative cloud answers.
        commit_score: what a draft/verify plan's commit threshold is compared with: the
            calibration's commit verifier (``PairCalibration.commit_score``); None = the
            draft's lowest token probability.
        round_trip_ms: the live estimate of a small job's round trip (speculative plans size
            their blocks with it); None = 20 ms.
    """

    def __init__(
        self,
        edge: LocalModel,
        large: LocalModel | None,
        link: CloudLink | None,
        speculation_threads: int = 4,
        mas_always: bool = False,
        dilation: Dilation = Dilation(),
        commit_score: Callable[[DraftSample], float] | None = None,
        round_trip_ms: Callable[[], float] | None = None,
    ):
        self.edge, self.large, self.link = edge, large, link
        self.mas_always = mas_always  # run MAS for its values even when every token is kept
        self.dilation = dilation  # emulated slowness of this edge, per kind of work (RuntimeOptions.dilation)
        self.commit_score = commit_score
        self.round_trip_ms = round_trip_ms  # the live link's round trip of a small job (token-level speculation's block size)
        self._pool = ThreadPoolExecutor(max_workers=speculation_threads, thread_name_prefix="msao-speculate")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run(
        self, plan: Plan, request: EdgeRequest, rgb: np.ndarray | None, decode_ms: float, deadline: float, on_partial: Partial | None = None
    ) -> Outcome:
        """Run ``plan``; ``deadline`` is ``time.monotonic()`` by which the answer must be committed.

        ``rgb`` is None for a text-only request: no model encodes anything, MAS does not run.
        ``on_partial`` gets the answer's text so far each time more of it is final before the
        end (the speculative plan's verified tokens); a plan that commits its answer whole never
        calls it.

        Cloud and split plans give their cloud jobs ``deadline - plan.fallback_reserve_ms``, so
        that an edge-only answer still fits if the cloud fails.
        """
        run = _Run(plan, request, rgb, decode_ms, deadline, on_partial)
        if plan.kind is PlanKind.EDGE:
            return self._local(self.edge, run)
        if plan.kind is PlanKind.LOCAL_LARGE:
            return self._local(self._large(), run)
        if plan.kind is PlanKind.CLOUD:
            return self._cloud(run)
        if plan.kind is PlanKind.SPLIT:
            return self._split(run)
        if plan.kind is PlanKind.SPECULATIVE:
            return self._speculative(run)
        return self._draft_verify(run)

    # -- device emulation -------------------------------------------------------------------

    def dilate(self, ms: float, kind: str) -> float:
        """Hold this thread for (k - 1) x ``ms`` of edge compute of ``kind`` just done (``DILATION_KINDS``); the dilated time."""
        k = self.dilation.factor(kind)
        if k <= 1.0 or ms <= 0:
            return ms
        time.sleep((k - 1.0) * ms / 1e3)
        return k * ms

    def _dilated_answer(self, model: LocalModel, p: Prepared, question: str, *, budget: int, **kwargs) -> Answer:
        """``model.answer`` (at most ``budget`` tokens) with its local stages dilated (a split's remote share is not edge compute)."""
        a = model.answer(p, question, max_new_tokens=budget, **kwargs)
        if self.dilation.identity:
            return a
        tail = kwargs.get("tail")
        remote_ms = tail[1].cloud_ms if tail is not None else 0.0
        t = a.timings
        self.dilate(t.embed_ms + t.prefill_ms, "prefill")
        self.dilate(t.decode_ms - remote_ms, "decode")
        kp, kd = self.dilation.prefill, self.dilation.decode
        scaled = replace(t, embed_ms=kp * t.embed_ms, prefill_ms=kp * t.prefill_ms, decode_ms=kd * t.decode_ms - (kd - 1) * remote_ms)
        return replace(a, timings=scaled)

    # -- plans ------------------------------------------------------------------------------

    def _prepare(self, model: LocalModel, run: _Run, keep_ratio: float) -> Prepared:
        r = run.request
        if run.rgb is None:
            return model.text_only(run.decode_ms)
        p = model.prepare(
            run.rgb, r.question, keep_ratio, stream_id=r.stream_id, analyse=self.mas_always, decode_ms=run.decode_ms,
            image_key=run.image_key,
        )  # fmt: skip
        if self.dilation.identity:
            return p
        return replace(p, vision_ms=self.dilate(p.vision_ms, "vision"), mas_ms=self.dilate(p.mas_ms, "mas"))

    def _large(self) -> LocalModel:
        if self.large is None:
            raise CloudUnavailable("this plan needs the large model's bundle on the edge (--large-bundle)")
        return self.large

    def _local(self, model: LocalModel, run: _Run) -> Outcome:
        return self._local_answer(model, self._prepare(model, run, run.plan.keep_ratio), run)

    def _local_answer(self, model: LocalModel, p: Prepared, run: _Run, fallback: str = "") -> Outcome:
        return self._draft_outcome(model, p, self._dilated_answer(model, p, run.request.question, budget=run.request.token_budget), fallback)

    def _draft_outcome(self, model: LocalModel, p: Prepared, a: Answer, fallback: str = "") -> Outcome:
        """An answer computed here (by ``model`` from ``p``), committed."""
        local_ms = a.timings.embed_ms + a.timings.prefill_ms + a.timings.decode_ms
        return Outcome(
            a.text, a.confidence, "edge", model.name, fallback, _mas_fields(p), self._timings(p, local=local_ms),
            flops_edge=_local_flops(model, p, a), local_observed_ms=p.vision_ms + local_ms,
            prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens, finish_reason=a.finish_reason, image_cached=p.cached,
            relevance=_relevance(p),
        )  # fmt: skip

    def _cloud_text_tokens(self, question: str) -> int:
        prefix, suffix = self._large().prompt_ids(question)
        return len(prefix) + len(suffix)

    def _cloud_flops(self, question: str, kept: int, new_tokens: int) -> int:
        """The large model answering in the cloud from ``kept`` image tokens."""
        large = self._large()
        return request_flops(large.manifest, image_tokens=kept, text_tokens=self._cloud_text_tokens(question), new_tokens=new_tokens)

    @staticmethod
    def _timings(p: Prepared, **more: float) -> dict[str, float]:
        t = {"decode_image": p.decode_ms, "vision": p.vision_ms, "mas": p.mas_ms}
        t.update(more)
        return {k: round(v, 3) for k, v in t.items()}

    def _upload(self, run: _Run, keep: np.ndarray | None, p: Prepared | None) -> dict[str, np.ndarray]:
        """The cloud job's prompt tensors in the plan's upload form (built on the calling thread, before the job goes up)."""
        large = self._large().manifest
        return upload_tensors(
            run.plan.upload, image_file=run.request.image, rgb=run.rgb, keep=keep, preprocess=large.preprocess,
            n_tokens=large.model.image_tokens, tokens=p.encoding.tokens if p is not None else None,
        )  # fmt: skip

    def _cloud_answer(self, run: _Run, prompt: dict[str, np.ndarray], deadline: float, job_id: str) -> RemoteAnswer:
        if self.link is None:
            raise CloudUnavailable("no cloud link configured (--broker)")
        large = self._large()
        remaining = deadline - time.monotonic()
        if remaining <= 0.005:
            raise CloudUnavailable("no time left in the request's deadline for a cloud job")
        r = run.request
        return self.link.answer(
            large.manifest.model_hash, r.question, job_id=job_id, prompt=prompt, deadline_s=remaining, max_new_tokens=r.token_budget
        )

    def _sent(self, run: _Run) -> tuple[int, int]:
        """Bytes up and down of every cloud job this run sent (delivered, cancelled or failed), from the link's log."""
        if self.link is None:
            return 0, 0
        up = down = 0
        for job_id in run.jobs:
            t = self.link.transfers.find(job_id)
            if t is not None:
                up, down = up + t.bytes_up, down + t.bytes_down
        return up, down

    def _cloud_outcome(self, run: _Run, r: RemoteAnswer, p: Prepared | None, cloud_ms: float, **timings: float) -> Outcome:
        large = self._large()
        kept = p.kept_tokens if p is not None else (0 if run.request.text_only else large.n_tokens)
        up, down = self._sent(run)
        finish = finish_reason_from_ids(r.token_ids, large.manifest.model.eos_token_ids)
        return Outcome(
            r.text, r.confidence, "cloud", large.name, "", _mas_fields(p) if p else {},
            {**(self._timings(p) if p else {}), "cloud": round(cloud_ms, 3), **{k: round(v, 3) for k, v in timings.items()}},
            up, down, flops_edge=_vision_flops(self.edge, p) if p else 0,
            flops_cloud=self._cloud_flops(run.request.question, kept, len(r.token_ids)),
            prompt_tokens=kept + self._cloud_text_tokens(run.request.question),
            completion_tokens=len(r.token_ids) - (finish == "stop"), finish_reason=finish, image_cached=bool(p and p.cached),
            relevance=_relevance(p),
        )  # fmt: skip

    def _cloud(self, run: _Run) -> Outcome:
        p = None
        if run.plan.send_keep or sends_tokens(run.plan.upload):  # the edge encoder's tokens (+ MAS: the keep-set) go up
            p = self._prepare(self.edge, run, run.plan.keep_ratio)
        t0 = time.perf_counter()
        try:
            r = self._cloud_answer(run, self._upload(run, p.keep if p and run.plan.send_keep else None, p), run.cloud_deadline, run.new_job())
        except CloudError as exc:
            return self._fallback(exc, run, p)
        return self._cloud_outcome(run, r, p, (time.perf_counter() - t0) * 1e3, decode_image=run.decode_ms)

    def _split(self, run: _Run) -> Outcome:
        large, plan = self._large(), run.plan
        if self.link is None:
            return self._fallback(CloudUnavailable("no cloud link configured"), run)
        p = self._prepare(large, run, plan.keep_ratio)
        remaining = run.cloud_deadline - time.monotonic()
        if remaining <= 0.005:
            return self._fallback(CloudUnavailable("no time left for the split"), run)
        tail = _TimedTail(run, self.link, large.manifest, plan.split_layer, options=RemoteOptions(deadline_s=remaining))
        try:
            a: Answer = self._dilated_answer(large, p, run.request.question, budget=run.request.token_budget, tail=(plan.split_layer, tail))
        except CloudError as exc:
            return self._fallback(exc, run)
        local_ms = a.timings.embed_ms + a.timings.prefill_ms + a.timings.decode_ms - tail.cloud_ms
        k, n = plan.split_layer, large.manifest.model.num_layers
        tokens = dict(image_tokens=a.kept_tokens, text_tokens=a.text_tokens, new_tokens=len(a.token_ids))
        up, down = self._sent(run)
        return Outcome(
            a.text, a.confidence, "cloud", large.name, "", _mas_fields(p),
            self._timings(p, local=local_ms, cloud=tail.cloud_ms), up, down,
            flops_edge=request_flops(large.manifest, **tokens, layers=(0, k), include_head=False, include_vision=p.encoder_ran),
            flops_cloud=request_flops(large.manifest, **tokens, layers=(k, n), include_vision=False),
            prompt_tokens=a.prompt_tokens, completion_tokens=a.completion_tokens, finish_reason=a.finish_reason, image_cached=p.cached,
            relevance=_relevance(p),
        )  # fmt: skip

    def _draft_verify(self, run: _Run) -> Outcome:
        plan, request = run.plan, run.request
        p = self._prepare(self.edge, run, plan.keep_ratio)
        keep = p.keep if plan.send_keep and self._large().n_tokens == self.edge.n_tokens else None
        job_id = run.new_job()
        started = time.perf_counter()
        future: Future | None = None
        if plan.speculate:  # publish now; the edge answer is computed meanwhile
            future = self._pool.submit(self._cloud_answer, run, self._upload(run, keep, p), run.deadline, job_id)
        draft = self._dilated_answer(self.edge, p, request.question, budget=request.token_budget, signals=self.commit_score is not None)
        committed = self._draft_outcome(self.edge, p, draft)
        kept = p.kept_tokens if keep is not None else self._large().n_tokens
        score = draft.confidence if self.commit_score is None else self.commit_score(DraftSample(draft, p.mas, plan.keep_ratio))
        rule = "confidence" if self.commit_score is None else "verifier P(right)"
        if score >= plan.commit_threshold:
            if future is None or self.link is None:
                return replace(committed, speculation=f"edge committed ({rule} {score:.3f} >= {plan.commit_threshold:g})")
            spec = f"edge committed ({rule} {score:.3f} >= {plan.commit_threshold:g}); " + ("speculative cloud answer unused" if future.done() else "speculative cloud job cancelled")
            if not future.done():
                self.link.cancel(job_id)
                wait([future], timeout=0.5)  # the link lets go at once; its bytes are then logged
            up, down = self._sent(run)  # the speculation's cost is counted even when it lost
            # the worker likely ran the job it was sent (a cancel only stops the waiting): counted as its cost
            cloud = self._cloud_flops(request.question, kept, len(draft.token_ids)) if up else 0
            return replace(committed, bytes_up=up, bytes_down=down, flops_cloud=cloud, speculation=spec)
        if future is None:
            future = self._pool.submit(self._cloud_answer, run, self._upload(run, keep, p), run.deadline, job_id)
        try:
            r: RemoteAnswer = future.result(timeout=max(0.0, run.deadline - time.monotonic()) + 0.05)
        except (CloudError, FutureTimeout) as exc:
            if self.link is not None:
                self.link.cancel(job_id)
                wait([future], timeout=0.5)
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else "the cloud gave no answer within the deadline"
            log.info(
                "request %s: draft/verify falls back to the edge draft (%s)", request.request_id, reason,
                extra={"request_id": request.request_id},
            )  # fmt: skip
            up, down = self._sent(run)
            return replace(committed, fallback=reason, bytes_up=up, bytes_down=down, speculation="cloud failed")
        cloud_ms = (time.perf_counter() - started) * 1e3
        out = self._cloud_outcome(run, r, p, cloud_ms, local=committed.timings_ms.get("local", 0.0))
        spec = f"cloud committed ({rule} {score:.3f} < {plan.commit_threshold:g})"
        return replace(out, flops_edge=committed.flops_edge, local_observed_ms=committed.local_observed_ms, speculation=spec)

    def _speculative(self, run: _Run) -> Outcome:
        """Token-level speculation: the prompt goes up first (no drafts), the edge prepares and drafts while the cloud prefills.

        Where the prompt needs nothing of the edge's (the image file or a re-encoded JPEG, no keep-set),
        it leaves before the edge's vision encoder; and where the prompt's verdict will reach the
        budget (the cloud decodes ahead that far), the edge's encoder and prefill wait for a reason
        (the cloud failed, or its worker lost the session): they could not shorten the answer.
        """
        plan, request, large = run.plan, run.request, self._large()
        if self.link is None:
            return self._fallback(CloudUnavailable("no cloud link configured (--broker)"), run)
        link = self.link
        budget = request.token_budget
        edge: dict = {"p": None, "prefill_ms": 0.0}
        if plan.send_keep or sends_tokens(plan.upload):  # the prompt carries the edge's keep-set or tokens
            edge["p"] = self._prepare(self.edge, run, plan.keep_ratio)
        p0 = edge["p"]
        keep = p0.keep if p0 is not None and plan.send_keep and large.n_tokens == self.edge.n_tokens else None
        prompt = self._upload(run, keep, p0)
        session = {"id": new_job_id(), "worker": None}

        def verify(drafts: list[int], committed: list[int], restart: bool, ahead: int) -> BlockReply:
            remaining = run.cloud_deadline - time.monotonic()
            if remaining <= 0.005:
                raise CloudUnavailable("no time left in the request's deadline for another block")
            if restart:
                session["id"], session["worker"] = new_job_id(), None
            t0 = time.perf_counter()
            v = link.verify(
                large.manifest.model_hash, session["id"], np.asarray(drafts, np.int64), committed=0 if restart else len(committed),
                job_id=run.new_job(), worker_id=session["worker"], question=request.question, prompt=prompt if restart else None,
                max_new_tokens=budget, deadline_s=remaining, decode_ahead=ahead,
            )  # fmt: skip
            session["worker"] = v.worker_id
            verify_ms.append((time.perf_counter() - t0) * 1e3)
            return BlockReply(v.token_ids, v.token_probs, v.committed, v.finish_reason, v.stats.compute_ms)

        verify_ms: list[float] = []
        started = time.perf_counter()
        first_ahead = max(0, min(plan.decode_ahead, budget - 1))
        sent = self._pool.submit(verify, [], [], True, first_ahead)  # the cloud's prefill overlaps all the edge does next
        gen = self.edge.generator()
        seq = TokenSequence(gen)

        def edge_prefill() -> np.ndarray:
            if edge["p"] is None:
                edge["p"] = self._prepare(self.edge, run, plan.keep_ratio)
            t0 = time.perf_counter()
            first = seq.start(edge["p"].encoding, request.question, keep=edge["p"].keep, capacity=budget)[-1]
            edge["prefill_ms"] = self.dilate((time.perf_counter() - t0) * 1e3, "prefill")
            return first

        lazy = first_ahead >= budget - 1  # the prompt's verdict reaches the budget: the edge's drafts are the fallback's only
        first = edge_prefill if lazy else edge_prefill()
        prior_step = max(0.05, edge["prefill_ms"] / max(1, seq.prompt_length)) if not lazy else 1.0  # lazy: blocks only after a loss
        link_rtt = self.round_trip_ms() if self.round_trip_ms is not None else 20.0
        s: SpeculationOutcome = speculate(
            seq, first, verify, self._pool.submit, budget=budget, eos=gen.eos, round_trip_ms=link_rtt, edge_step_ms=prior_step,
            first_block=0, dilate=functools.partial(self.dilate, kind="decode"), deadline=run.cloud_deadline,
            on_commit=_partial_text(run, gen) if run.on_partial is not None else None, decode_ahead=plan.decode_ahead, first_sent=sent,
        )  # fmt: skip
        if s.fallback:
            for job_id in run.jobs:
                link.cancel(job_id)
        total_ms = (time.perf_counter() - started) * 1e3
        ids = s.token_ids
        text = _answer_text(gen, ids)
        up, down = self._sent(run)
        p: Prepared | None = edge["p"]
        kept = keep.size if keep is not None else (0 if request.text_only else large.n_tokens)
        text_tokens = self._cloud_text_tokens(request.question)
        edge_flops = 0
        if p is not None:
            edge_flops = _vision_flops(self.edge, p) + (request_flops(
                self.edge.manifest, image_tokens=p.kept_tokens, text_tokens=text_tokens, new_tokens=s.edge_steps, include_vision=False
            ) if seq.prompt_length else 0)  # fmt: skip
        cloud_flops = request_flops(large.manifest, image_tokens=kept, text_tokens=text_tokens, new_tokens=s.drafted + s.blocks + s.decoded) if s.blocks else 0
        spec = (
            f"token-level: {s.blocks} blocks (k={','.join(map(str, s.block_sizes))}), {s.accepted}/{s.drafted} drafts accepted, "
            f"{s.decoded} decoded ahead, {s.verified} of {len(ids)} tokens verified"
        )
        if p is None:
            spec += "; the edge did not need to prefill"
        if s.fallback:
            spec += "; the edge finished the answer alone"
        finish = s.finish_reason
        local_ms = edge["prefill_ms"] + s.edge_ms
        return Outcome(
            text, min(s.token_probs) if s.token_probs else 0.0, "cloud" if not s.fallback else "edge",
            large.name if not s.fallback else self.edge.name, s.fallback, _mas_fields(p) if p is not None else {},
            {**(self._timings(p) if p is not None else {"decode_image": round(run.decode_ms, 3)}), **{k: round(v, 3) for k, v in {"local": local_ms, "cloud": sum(verify_ms),
                                                                                            "speculation": total_ms}.items()}},
            up, down, flops_edge=edge_flops, flops_cloud=cloud_flops, local_observed_ms=(p.vision_ms if p is not None else 0.0) + local_ms,
            speculation=spec, prompt_tokens=kept + text_tokens, completion_tokens=len(ids) - (finish == "stop"), finish_reason=finish,
            image_cached=bool(p is not None and p.cached), relevance=_relevance(p),
        )  # fmt: skip

    # -- fallback ---------------------------------------------------------------------------

    def _fallback(self, exc: Exception, run: _Run, prepared: Prepared | None = None) -> Outcome:
        """The edge model answers; ``prepared``: the edge model's tokens when the plan already made them."""
        reason = f"{type(exc).__name__}: {exc}"
        request = run.request
        log.warning(
            "request %s: cloud path failed, answering on the edge (%s)", request.request_id, reason, extra={"request_id": request.request_id}
        )
        if prepared is None:
            prepared = self._prepare(self.edge, run, 1.0)
        out = self._local_answer(self.edge, prepared, run, reason)
        up, down = self._sent(run)
        return replace(out, bytes_up=up, bytes_down=down)
