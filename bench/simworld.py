"""The simulated world: what a plan the scheduler chose costs when one request actually runs.

A plan becomes a *job*: stages on resources, in order. Its time comes from the same segment
clocks and the same formulas as the scheduler's estimate (``msao.edge_runtime.scheduler``),
evaluated with this request's draws instead of expectations:

    answer tokens n     drawn from the profile's distribution (the estimate uses its mean)
    compute             edge stages x e, cloud stages x c (lognormal, mean 1, the profile's spread)
    link                each direction of each transfer: one-way delay ± jitter (uniform), as the
                        benchmark's shaping proxy does (testbed.PROFILES)
    image bytes         drawn per request (the scheduler sees the request's size, as the daemon does)
    draft commit        committed when a uniform draw < the plan's calibrated commit share
    correct             when the request's difficulty draw u < the plan's accuracy: one u per
                        request for every plan, so answers are maximally correlated across plans
                        (a hard question is hard for every model); u is stratified over the N
                        requests, so each plan's accuracy is its table value within 1/N

With every draw at its mean the job's time equals the plan's ``est_latency_ms`` exactly
(tests/bench/test_simulate.py checks it for every candidate): the simulation validates the
scheduler's *decisions* under its own model, not the model.

Resources: ``edge`` (the edge accelerator), ``uplink`` / ``downlink`` (serialisation at the link
rate), ``cloud`` (the cloud accelerator, ``servers`` of them) and ``net`` (pure delay).
``run_open_loop`` queues jobs FIFO per resource (a discrete-event simulation) for throughput.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from msao.edge_runtime.estimates import SegmentClock
from msao.edge_runtime.scheduler import Plan, Scheduler
from msao.edge_runtime.token_speculation import PRIOR_ACCEPTANCE
from msao.engines.generation import DEFAULT_MAX_NEW_TOKENS
from msao.engines.manifest import Manifest

__all__ = ["Draws", "Job", "Link", "Stage", "draw_requests", "mean_draws", "job_from_plan", "closed_loop_ms", "run_open_loop"]

JITTER_SLOTS = 64  # one-way delay draws per request (two per transfer; split needs 2 per answer token)


@dataclass(frozen=True)
class Link:
    """One link profile: one-way delay ± uniform jitter, a rate per direction."""

    name: str
    delay_ms: float
    jitter_ms: float
    bandwidth_bps: float

    @property
    def rtt_ms(self) -> float:
        return 2 * self.delay_ms


@dataclass(frozen=True)
class Draws:
    """One request's random draws, shared by every policy (common random numbers)."""

    index: int
    u: float  # difficulty: correct iff u < accuracy
    v: float  # draft commit: committed iff v < commit share
    answer_tokens: int
    edge_factor: float
    cloud_factor: float
    image_bytes: int
    jitter: tuple[float, ...]  # in [-1, 1], scaled by the link's jitter


Stage = tuple[str, float]  # (resource, ms)


@dataclass(frozen=True)
class Job:
    """A request's work: ``prefix`` stages, then ``branches`` in parallel.

    Done when the prefix is done (no branches) or when every branch in ``wait_for`` is done;
    branches not waited for still use their resources (a speculative upload that was not needed).
    """

    prefix: tuple[Stage, ...]
    branches: tuple[tuple[Stage, ...], ...] = ()
    wait_for: tuple[int, ...] = ()
    suffix: tuple[Stage, ...] = ()  # after the waited branches: a token-speculation answer's blocks
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    answered_by: str = "edge"
    mas_ms: float = 0.0
    correct: bool = False

    def busy_ms(self, resource: str) -> float:
        return sum(ms for stages in (self.prefix, *self.branches, self.suffix) for r, ms in stages if r == resource)


def draw_requests(n: int, seed: int, pmf, image_mean: float, image_sigma: float, edge_cv: float, cloud_cv: float) -> list[Draws]:
    """``n`` requests' draws from one seeded generator, in a fixed order."""
    rng = np.random.default_rng(seed)
    tokens = np.array([t for t, _ in pmf])
    shares = np.array([p for _, p in pmf], float)

    def lognormal(sigma: float, size: int) -> np.ndarray:
        return np.exp(rng.normal(-sigma * sigma / 2, sigma, size)) if sigma > 0 else np.ones(size)

    # stratified: over n requests each plan's share of right answers (and of committed drafts) is its table value within 1/n
    u, v = (rng.permutation(n) + rng.random(n)) / n, (rng.permutation(n) + rng.random(n)) / n
    answer = rng.choice(tokens, size=n, p=shares / shares.sum())
    e, c, img = lognormal(edge_cv, n), lognormal(cloud_cv, n), lognormal(image_sigma, n)
    jitter = rng.uniform(-1.0, 1.0, (n, JITTER_SLOTS))
    return [
        Draws(
            i,
            float(u[i]),
            float(v[i]),
            int(answer[i]),
            float(e[i]),
            float(c[i]),
            max(1, round(image_mean * img[i])),
            tuple(float(j) for j in jitter[i]),
        )
        for i in range(n)
    ]


def mean_draws(mean_answer_tokens: float, image_bytes: int, v: float = 0.5) -> Draws:
    """Every draw at its mean (answer tokens may be fractional): a job then takes exactly its plan's estimate.

    ``v`` decides draft commits: with 0.5 a plan that commits always (share 1) commits and one that
    never commits (share 0) does not, which is exact for the two thresholds profiles publish.
    """
    return Draws(-1, 0.0, v, mean_answer_tokens, 1.0, 1.0, image_bytes, (0.0,) * JITTER_SLOTS)  # type: ignore[arg-type]


class _Transfers:
    """The link's stages for one request, drawing one-way delays in order."""

    def __init__(self, link: Link, d: Draws):
        self.link, self.d, self.k = link, d, 0

    def _delay(self) -> float:
        j = self.d.jitter[self.k % JITTER_SLOTS]
        self.k += 1
        return max(0.0, self.link.delay_ms + self.link.jitter_ms * j)

    def around(self, up_bytes: float, down_bytes: float, remote: list[Stage]) -> list[Stage]:
        """Upload, one-way delay, ``remote`` stages, download, one-way delay: LinkSnapshot.transfer_ms + remote time."""
        bw = self.link.bandwidth_bps
        return [
            ("uplink", 8e3 * up_bytes / bw),
            ("net", self._delay()),
            *remote,
            ("downlink", 8e3 * down_bytes / bw),
            ("net", self._delay()),
        ]


class _Times:
    """Segment times of one model on one side, from its clock (the scheduler's formulas, per phase)."""

    def __init__(self, m: Manifest, clock: SegmentClock):
        self.m, self.c = m, clock

    def vision(self) -> float:
        return self.c.ms("vision_encoder")

    def prefill(self, t: int) -> float:
        return self.c.ms("text_embed", t, 0) + sum(self.c.ms(s.name, t, 0) for s in self.m.decoder_chunks()) + self.c.ms("lm_head", 1, 0)

    def step(self, t: int) -> float:
        return self.c.ms("text_embed", 1, 0) + sum(self.c.ms(s.name, 1, t) for s in self.m.decoder_chunks()) + self.c.ms("lm_head", 1, 0)

    def answer(self, t: int, n: float) -> float:
        return self.vision() + self.prefill(t) + (n - 1) * self.step(t)


def job_from_plan(s: Scheduler, plan: Plan, link: Link, d: Draws, mas_ms: float, commit_share: float = 0.0) -> Job:
    """What ``plan`` costs for this request (its draws) on this link; see the module docstring.

    ``commit_share``: the calibrated P(commit) of a draft/verify plan at its threshold.
    """
    e, c, n, r = d.edge_factor, d.cloud_factor, d.answer_tokens, plan.keep_ratio
    net = _Transfers(link, d)
    edge_t = _Times(s.edge, s.edge_clock)
    correct = d.u < plan.est_accuracy

    def edge_answer() -> float:
        return e * (edge_t.answer(s.prompt_tokens(s.edge, r), n) + (mas_ms if r < 1 else 0.0))

    if plan.kind == "edge":
        return Job((("edge", edge_answer()),), answered_by="edge", mas_ms=mas_ms if r < 1 else 0.0, correct=correct)
    m = s.large
    assert m is not None and s.large_clock is not None and s.cloud_clock is not None
    large_edge, large_cloud = _Times(m, s.large_clock), _Times(m, s.cloud_clock)
    t = s.prompt_tokens(m, r)
    if plan.kind == "local_large":
        ms = e * (large_edge.answer(t, n) + (mas_ms if r < 1 else 0.0))
        return Job((("edge", ms),), answered_by="edge", mas_ms=mas_ms if r < 1 else 0.0, correct=correct)
    keep_bytes = 8 * round(r * m.model.image_tokens)
    image_bytes, build_ms = _upload(s, plan, d)

    def cloud_after_pre(send_keep: bool) -> tuple[list[Stage], float]:
        up = image_bytes + (keep_bytes if send_keep else 0) + 600
        build = [("edge", build_ms)] if build_ms > 0 else []
        return build + net.around(up, 600, [("cloud", c * large_cloud.answer(t, n))]), up

    pre = e * (edge_t.vision() + mas_ms)
    if plan.kind == "cloud":
        stages, up = cloud_after_pre(plan.send_keep)
        first = [("edge", pre)] if plan.send_keep else []
        return Job(tuple(first + stages), bytes_up=up, bytes_down=600, answered_by="cloud", mas_ms=mas_ms if plan.send_keep else 0.0,
                   correct=correct)  # fmt: skip
    if plan.kind == "split":
        k, layers, dim, vocab = plan.split_layer, m.model.num_layers, m.model.hidden_size, m.model.vocab_size
        lc, cc = s.large_clock, s.cloud_clock
        edge_prefill = lc.ms("vision_encoder") + mas_ms + lc.ms("text_embed", t) + lc.decoder_ms(0, k, t)
        up = t * dim * 2 + 16 * t + 600
        stages = [
            ("edge", e * edge_prefill),
            *net.around(up, 4 * vocab + 300, [("cloud", c * (cc.decoder_ms(k, layers, t) + cc.ms("lm_head", 1)))]),
        ]
        up_total, down_total = float(up), float(4 * vocab + 300)
        steps = n - 1
        whole = int(math.floor(steps))
        for i in range(math.ceil(steps)):
            w = 1.0 if i < whole else steps - whole  # a fractional last step only for mean draws
            stages.append(("edge", w * e * (lc.ms("text_embed", 1) + lc.decoder_ms(0, k, 1, t))))
            remote = [("cloud", c * (cc.decoder_ms(k, layers, 1, t) + cc.ms("lm_head", 1)))]
            stages += [(res, w * ms) for res, ms in net.around(2 * dim + 600, 4 * vocab + 300, remote)]
            up_total += w * (2 * dim + 600)
            down_total += w * (4 * vocab + 300)
        return Job(tuple(stages), bytes_up=up_total, bytes_down=down_total, answered_by="cloud", mas_ms=mas_ms, correct=correct)
    if plan.kind == "speculative":
        return _speculative_job(s, plan, net, d, pre, t, correct, mas_ms)
    # draft_verify: the edge answers; the cloud's answer (with the edge's keep-set) replaces it unless committed
    committed = d.v < commit_share
    edge_ms = edge_answer()
    by = "edge" if committed else "cloud"
    if plan.speculate:  # the cloud job leaves once the edge has encoded + run MAS: latency max(edge, pre + cloud)
        cloud_stages, up = cloud_after_pre(True)
        return Job(
            (("edge", pre),), ((("edge", max(0.0, edge_ms - pre)),), tuple(cloud_stages)), (0,) if committed else (0, 1), bytes_up=up,
            bytes_down=600, answered_by=by, mas_ms=mas_ms, correct=correct,
        )  # fmt: skip
    if committed:
        return Job((("edge", edge_ms),), answered_by=by, mas_ms=mas_ms if r < 1 else 0.0, correct=correct)
    cloud_stages, up = cloud_after_pre(True)
    return Job(
        (("edge", edge_ms), *cloud_stages), bytes_up=up, bytes_down=600, answered_by=by, mas_ms=mas_ms if r < 1 else 0.0, correct=correct
    )


def _upload(s: Scheduler, plan: Plan, d: Draws) -> tuple[float, float]:
    """(image bytes, edge build ms) of the plan's upload form: the request's file, or the form's profile figures.

    A form's bytes are its mean (no per-request spread): the estimate and the world then agree
    on them, and the simulation tests what the form saves, not its size model.
    """
    u = s.pair.upload(plan.upload) if s.pair is not None and plan.upload != "file" else None
    if u is None:
        return float(d.image_bytes), 0.0
    row = u.row(plan.keep_ratio)
    assert row is not None, f"upload {plan.upload} has no figure at keep ratio {plan.keep_ratio}"
    return u.image_bytes[row], d.edge_factor * u.build_ms[row]


def _speculative_job(s: Scheduler, plan: Plan, net: _Transfers, d: Draws, pre: float, t: int, correct: bool, mas_ms: float) -> Job:
    """Token-level speculation: the cloud's prefill beside the edge's, then blocks of ``plan.block`` drafts.

    Each block is a round trip with one cloud pass over k + 1 tokens; the edge drafts the next block
    meanwhile and holds the edge only for what drafting takes beyond the round trip. The number of
    blocks is the scheduler's expectation at the prior acceptance (not drawn per token), so the
    simulation tests the plan's timing, not the acceptance model. Each verdict (the prompt's
    included) also carries ``plan.decode_ahead`` of the cloud's own decode steps; where the
    prompt's verdict reaches the (default) budget the edge does nothing, as in the daemon.
    """
    m, e, c, n, r, k = s.large, d.edge_factor, d.cloud_factor, d.answer_tokens, plan.keep_ratio, plan.block
    assert m is not None and s.cloud_clock is not None and k is not None
    cc, large_cloud, edge_t = s.cloud_clock, _Times(m, s.cloud_clock), _Times(s.edge, s.edge_clock)
    image_bytes, build_ms = _upload(s, plan, d)
    up = image_bytes + (8 * round(r * m.model.image_tokens) if plan.send_keep else 0) + 600
    layers, ahead = m.model.num_layers, plan.decode_ahead
    step = c * (cc.ms("text_embed", 1) + cc.decoder_ms(0, layers, 1, t) + cc.ms("lm_head", 1))
    cloud_first = (
        ([("edge", pre)] if plan.send_keep else [])
        + ([("edge", build_ms)] if build_ms > 0 else [])
        + net.around(up, 600, [("cloud", c * (large_cloud.vision() + large_cloud.prefill(t)) + min(ahead, max(0.0, n - 1)) * step)])
    )
    if ahead >= DEFAULT_MAX_NEW_TOKENS - 1:  # the simulated requests ask for the default budget
        return Job(tuple(cloud_first), bytes_up=up, bytes_down=600, answered_by="cloud", mas_ms=mas_ms if plan.send_keep else 0.0,
                   correct=correct)  # fmt: skip
    t_edge = s.prompt_tokens(s.edge, r)
    edge_first = [("edge", e * (edge_t.vision() + edge_t.prefill(t_edge)))]
    a = PRIOR_ACCEPTANCE
    blocks = math.ceil(max(0.0, n - 1 - ahead) / ((1 - a ** (k + 1)) / (1 - a) + ahead))
    suffix, down = [], 600
    for _ in range(blocks):
        cloud_pass = c * (cc.ms("text_embed", k + 1) + cc.decoder_ms(0, layers, k + 1, t) + cc.ms("lm_head", k + 1)) + ahead * step
        trip = net.around(700, 700, [("cloud", cloud_pass)])
        drafting = e * k * edge_t.step(t_edge)
        suffix += [*trip, ("edge", max(0.0, drafting - sum(ms for _, ms in trip)))]
        up, down = up + 700, down + 700
    return Job(
        (), (tuple(cloud_first), tuple(edge_first)), (0, 1), suffix=tuple(suffix), bytes_up=up, bytes_down=down, answered_by="cloud",
        mas_ms=mas_ms if plan.send_keep else 0.0, correct=correct,
    )  # fmt: skip


def closed_loop_ms(job: Job) -> float:
    """The job alone on idle resources (one request at a time)."""
    head = sum(ms for _, ms in job.prefix)
    tail = sum(ms for _, ms in job.suffix)
    if not job.branches:
        return head + tail
    return head + max(sum(ms for _, ms in job.branches[i]) for i in job.wait_for) + tail


@dataclass
class _Resource:
    free_at: list[float]

    def wait_ms(self, now: float) -> float:
        return max(0.0, min(self.free_at) - now)


def run_open_loop(arrivals_ms: list[float], make_job, servers: dict[str, int]) -> list[float]:
    """Jobs arriving at ``arrivals_ms``, FIFO per resource; each job's latency (ms).

    ``make_job(i, now_ms, state)`` chooses and builds job ``i`` at its arrival, where ``state``
    offers ``edge_users()`` (jobs in the system that use the edge) and ``cloud_wait_ms()`` (what a
    new cloud stage would wait): the load the scheduler's ``CostInputs`` carry.
    """
    res = {name: _Resource([0.0] * k) for name, k in servers.items()}
    events: list[tuple[float, int, int, int, int]] = []  # (time, seq, job, chain, stage)
    jobs: dict[int, Job] = {}
    chain_done: dict[int, dict[int, float]] = {}
    uses_edge: set[int] = set()
    done_at: dict[int, float] = {}
    seq = 0
    for i, t in enumerate(arrivals_ms):
        heapq.heappush(events, (t, seq, i, -1, 0))  # chain -1: the arrival
        seq += 1

    class State:
        now = 0.0

        @staticmethod
        def edge_users() -> int:
            return len(uses_edge)

        @staticmethod
        def cloud_wait_ms() -> float:
            return res["cloud"].wait_ms(State.now)

    def chain(job: Job, c: int) -> tuple[Stage, ...]:
        if c == 0:
            return job.prefix
        return job.branches[c - 1] if c <= len(job.branches) else job.suffix

    def then(i: int, job: Job, t: float) -> None:
        """Chain 0 (and the waited branches) are done at ``t``: the suffix runs, or the job is done."""
        nonlocal seq
        if job.suffix:
            heapq.heappush(events, (t, seq, i, len(job.branches) + 1, 0))
            seq += 1
        else:
            finish(i, t)

    def finish(i: int, t: float) -> None:
        done_at[i] = t
        uses_edge.discard(i)

    while events:
        t, _, i, c, k = heapq.heappop(events)
        State.now = t
        if c == -1:
            jobs[i] = job = make_job(i, t, State)
            chain_done[i] = {}
            if job.busy_ms("edge") > 0:
                uses_edge.add(i)
            c, k = 0, 0
        job = jobs[i]
        stages = chain(job, c)
        if k < len(stages):
            r, ms = stages[k]
            if r == "net" or r not in res:
                end = t + ms
            else:
                slots = res[r].free_at
                j = min(range(len(slots)), key=slots.__getitem__)
                end = max(t, slots[j]) + ms
                slots[j] = end
            heapq.heappush(events, (end, seq, i, c, k + 1))
            seq += 1
            continue
        chain_done[i][c] = t  # chain c of job i is done at t
        if c == 0:
            if not job.branches:
                then(i, job, t)
            for b in range(len(job.branches)):
                heapq.heappush(events, (t, seq, i, b + 1, 0))
                seq += 1
        elif c > len(job.branches):
            finish(i, t)
        elif i not in done_at and not job.suffix and all(w + 1 in chain_done[i] for w in job.wait_for):
            finish(i, max(chain_done[i][w + 1] for w in job.wait_for))
        elif job.suffix and len(job.branches) + 1 not in chain_done[i] and all(w + 1 in chain_done[i] for w in job.wait_for):
            chain_done[i][len(job.branches) + 1] = -1.0  # started
            then(i, job, max(chain_done[i][w + 1] for w in job.wait_for))
    return [done_at[i] - a for i, a in enumerate(arrivals_ms)]
