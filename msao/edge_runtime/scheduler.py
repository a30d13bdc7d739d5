"""The scheduler: per request, a cost model over candidate plans, and the plan with the lowest expected latency.

Plans (``Plan.kind``), each with a MAS keep ratio r (share of image tokens that enter prefill):

    edge          the edge model answers alone
    local_large   the large model answers alone, on the edge (no link needed)
    cloud         the large model answers in the cloud from the image (+ the edge's keep-set)
    split@k       the edge runs the large model's encoder and layers [0, k); the cloud runs [k, L)
                  and the head, keeping its half of the KV cache for decode steps
    draft_verify  the edge model answers; its answer is committed when its confidence >= θ,
                  otherwise the cloud's; with speculation the cloud job starts as soon as the
                  edge's keep-set is known, before the edge answer
    speculative   token-level: the cloud prefills the prompt while the edge drafts; then blocks of
                  k drafted tokens, each checked in one cloud pass (the large model's answer)

Expected latency (ms), from ``CostInputs``; E = edge model, C = large model, T = prompt tokens
(text + kept image tokens), n = answer tokens (calibrated), f = edge load factor:

    edge         f·[vision_E + mas + prefill_E(T) + (n-1)·step_E]
    local_large  f·[vision_C + mas + prefill_C(T) + (n-1)·step_C]
    cloud        f·[vision_E + mas + build_u] + link(upload_u + keep, answer) + queue + σ·[vision_C + prefill_C(T) + (n-1)·step_C]
    split@k      f·[vision_C + mas + prefill_C[0:k](T)] + link(T·D·2 B) + queue + σ·prefill_C[k:L](T)
                 + (n-1)·(f·step_C[0:k] + link(D·2 B) + σ·step_C[k:L])
    draft_verify p·edge + (1-p)·(speculate ? max(edge, pre_E + cloud') : edge + cloud')
                 (p = calibrated commit share at θ; cloud' = cloud without the edge encoder it shares)
    speculative  max(first, f·[vision_E + prefill_E(T)]) + B·max(rtt + σ·pass_C(k+1), f·k·step_E)
                 (first = the cloud answer's upload, queue and prefill; B = ceil((n-1) / E_k) blocks,
                 E_k = (1 - a^(k+1)) / (1 - a) tokens per block at per-token acceptance a; k from ``block_size``)

u is the upload form (``uploads.py``): the request's file (build 0, its own size), or a
calibrated form (``jpeg@q``, ``region@q``, ``tokens@int8``...) with its calibrated mean bytes,
build time and large-model accuracy; a tokens form also drops vision_C. Every cloud,
draft/verify and speculative candidate is priced once per form that applies (region needs the
keep-set; tokens a shared encoder), and a form's accuracy decides like any plan's: a form that
costs more than the slack is never taken; among plans within ``latency_tolerance`` of the
fastest the fewest uplink bytes win.
σ is the cloud's live scale (its reported compute time / its profile). Expected accuracy comes
from the calibration tables (train data). The scheduler keeps plans whose accuracy is within
``accuracy_slack`` of the most accurate available plan, then takes the lowest latency; when no
plan meets the deadline, the fastest plan within the slack. Every choice carries its reason.

Fixed policies (the benchmark's baselines) go through the same ``choose`` and the same cost
model, so their estimates and logs are comparable: ``edge_only``, ``cloud_only`` (raw image,
no keep-set), ``static_split`` (one k), ``prune_only`` (edge model at a fixed ratio),
``draft_verify_static`` (always verify, speculative).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from msao.edge_runtime.calibration import Calibration, UploadCalibration
from msao.edge_runtime.estimates import LinkSnapshot, SegmentClock
from msao.edge_runtime.plans import ALWAYS_VERIFY, MAX_DECODE_AHEAD, PLAN_KINDS, POLICIES, Plan, PlanKind, sends_tokens
from msao.edge_runtime.token_speculation import PRIOR_ACCEPTANCE, block_size
from msao.engines.generation import DEFAULT_MAX_NEW_TOKENS
from msao.engines.manifest import Manifest
from msao.errors import ConfigError

__all__ = ["ALWAYS_VERIFY", "CostInputs", "PLAN_KINDS", "POLICIES", "Plan", "PlanKind", "Scheduler", "SchedulerOptions"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SchedulerOptions:
    """How the scheduler trades accuracy for latency.

    Attributes:
        policy: ``msao`` (adaptive) or one of the fixed baselines in ``POLICIES``.
        accuracy_slack: keep plans whose expected accuracy is at most this far below the best
            available plan's (0.01 = one point).
        keep_ratios: ratios the adaptive policy considers (must be calibrated).
        split_layer: ``static_split``'s k. prune_ratio: ``prune_only``'s keep ratio.
        allow_local_large: let the adaptive policy run the large model on the edge.
        speculate: let draft/verify start the cloud job before the edge answer is known.
        latency_tolerance: among eligible plans within this share of the fastest one's expected
            latency (0.1 = 10 %), take the one that sends the fewest bytes: a little latency for
            a lot of uplink (a speculative upload of every image saves little over a sequential one).
        decode_ahead: speculative plans: tokens the cloud decodes after each verdict; -1 = the
            faster, by the estimate, of as many as it decodes within the link's round trip (from
            the cloud clock) and the request's whole budget; 0 = verdicts only, every block a round
            trip (what a streamed answer shows verdict by verdict).
    """

    policy: str = "msao"
    accuracy_slack: float = 0.01
    keep_ratios: tuple[float, ...] = (1.0, 0.5, 0.25)
    split_layer: int = 1
    prune_ratio: float = 0.25
    allow_local_large: bool = True
    speculate: bool = True
    latency_tolerance: float = 0.1
    decode_ahead: int = -1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"policy {self.policy!r} is not one of {list(POLICIES)}")
        if not 0 <= self.accuracy_slack <= 1:
            raise ConfigError(f"accuracy_slack must be in [0, 1], got {self.accuracy_slack}")
        if not self.keep_ratios or not all(0 < r <= 1 for r in self.keep_ratios):
            raise ConfigError(f"keep_ratios must be values in (0, 1], got {self.keep_ratios}")
        if not 0 < self.prune_ratio <= 1:
            raise ConfigError(f"prune_ratio must be in (0, 1], got {self.prune_ratio}")
        if not 0 <= self.latency_tolerance <= 1:
            raise ConfigError(f"latency_tolerance must be in [0, 1], got {self.latency_tolerance}")
        if isinstance(self.decode_ahead, bool) or not -1 <= self.decode_ahead <= MAX_DECODE_AHEAD:
            raise ConfigError(f"decode_ahead must be -1 (auto) or 0..{MAX_DECODE_AHEAD} tokens, got {self.decode_ahead!r}")


@dataclass(frozen=True)
class CostInputs:
    """The live state one decision reads (a snapshot: the scheduler itself keeps no state).

    Attributes:
        cloud_ok: a broker connection and at least one online worker serving the large model.
        cloud_queue_ms: expected wait in the cloud worker's queue (from its retained status).
        edge_load: multiplier on local compute (``LoadEstimate.local_wait_factor``).
        mas_ms: live MAS time per request.
        image_bytes: size of this request's image file.
        deadline_ms: this request's remaining budget.
        token_budget: this request's answer budget in tokens (``EdgeRequest.token_budget``).
        local_residuals: per local (kind, keep ratio), how far that plan's runs were from its
            estimate on this device (``Estimator``); 1 where nothing was learned.
    """

    link: LinkSnapshot
    cloud_ok: bool
    cloud_queue_ms: float
    edge_load: float
    mas_ms: float
    image_bytes: int
    deadline_ms: float
    local_residuals: Mapping[tuple[str, float], float] = field(default_factory=dict)
    token_budget: int = DEFAULT_MAX_NEW_TOKENS

    def local_residual(self, kind: str, r: float) -> float:
        return self.local_residuals.get((str(kind), r), 1.0)


class Scheduler:
    """Chooses a ``Plan`` per request from a ``CostInputs`` snapshot; keeps no state of its own (thread-safe).

    Args:
        edge / large: manifests of the edge model and the large model (the latter may be
            None: then only edge plans exist).
        edge_clock / large_clock: local segment times of each model on this device.
        cloud_clock: the large model's segment times on the cloud worker.
        calibration: accuracy tables (None: accuracies from each manifest's export check, and
            draft/verify always verifies, since no threshold was calibrated).
    """

    def __init__(
        self,
        options: SchedulerOptions,
        edge: Manifest,
        edge_clock: SegmentClock,
        large: Manifest | None = None,
        large_clock: SegmentClock | None = None,
        cloud_clock: SegmentClock | None = None,
        calibration: Calibration | None = None,
    ):
        self.options = options
        self.edge, self.large = edge, large
        self.edge_clock, self.large_clock, self.cloud_clock = edge_clock, large_clock, cloud_clock
        self.calibration = calibration
        self.edge_cal = calibration.model(edge.model_hash) if calibration else None
        self.large_cal = calibration.model(large.model_hash) if calibration and large else None
        self.pair = calibration.pair(edge.model_hash, large.model_hash) if calibration and large else None
        self._frontiers: dict[tuple[str, float], tuple[int, ...]] = {}
        if calibration is not None and (self.edge_cal is None or (large is not None and (self.large_cal is None or self.pair is None))):
            log.warning("the calibration file does not cover these bundles (model hashes differ); re-run `msao calibrate`")
        if options.policy == "static_split" and large is not None and options.split_layer not in large.split_points:
            raise ConfigError(f"static split at layer {options.split_layer}: {large.name} splits at {list(large.split_points)}")

    # -- accuracy (calibrated on train) -----------------------------------------------------

    def _accuracy(self, model: Manifest, r: float) -> float:
        cal = self.edge_cal if model is self.edge else self.large_cal
        if cal is not None:
            return cal.accuracy_at(r)
        return model.checks.accuracy_onnx if model.checks else 0.0

    def _answer_tokens(self, model: Manifest) -> float:
        cal = self.edge_cal if model is self.edge else self.large_cal
        return cal.answer_tokens if cal else 2.0

    # -- latency ----------------------------------------------------------------------------

    def prompt_tokens(self, m: Manifest, r: float) -> int:
        """Tokens model ``m`` prefills when it keeps a share ``r`` of its image tokens (what the cost model charges; the simulation uses it too)."""
        from msao.engines.profile import TEXT_TOKENS

        return TEXT_TOKENS + max(1, round(r * m.model.image_tokens))

    def _answer_ms(self, m: Manifest, ms: Callable[[str, int, int], float], r: float) -> float:
        """One whole answer of model ``m``: vision, prompt embedding, prefill, head, then (n-1) decode steps.

        ``ms(segment, new_tokens, past)`` gives segment times (a clock, scaled or profiled).
        """
        t = self.prompt_tokens(m, r)
        n = self._answer_tokens(m)
        chunks = m.decoder_chunks()
        head = ms("lm_head", 1, 0)
        prefill = ms("text_embed", t, 0) + sum(ms(c.name, t, 0) for c in chunks) + head
        step = ms("text_embed", 1, 0) + sum(ms(c.name, 1, t) for c in chunks) + head
        return ms("vision_encoder", 0, 0) + prefill + (n - 1) * step

    def _local_ms(self, m: Manifest, clock: SegmentClock, r: float, x: CostInputs, with_mas: bool) -> float:
        return x.edge_load * (self._answer_ms(m, clock.ms, r) + (x.mas_ms if with_mas else 0.0))

    def edge_fallback_ms(self, x: CostInputs) -> float:
        """Expected time of the edge-only answer that replaces a failed cloud path."""
        return self._local_ms(self.edge, self.edge_clock, 1.0, x, False)

    def profiled_local_ms(self, kind: str, r: float) -> float:
        """A local plan's compute at keep ratio ``r`` from the profile alone (no live scale, no load, no MAS).

        ``kind`` is ``edge`` (the edge model) or ``local_large``: what a live observation of that
        plan is compared with.
        """
        if kind == "local_large":
            assert self.large is not None and self.large_clock is not None
            return self._answer_ms(self.large, self.large_clock.profiled_ms, r)
        return self._answer_ms(self.edge, self.edge_clock.profiled_ms, r)

    def cloud_compute_ms(self, r: float) -> float:
        """The large model's compute for one answer at keep ratio ``r`` on the cloud worker (live scale included)."""
        assert self.large is not None and self.cloud_clock is not None
        return self._answer_ms(self.large, self.cloud_clock.ms, r)

    def _forms(self, r: float, x: CostInputs, send_keep: bool) -> list[UploadCalibration | None]:
        """The upload forms a cloud job at keep ratio ``r`` may take: the file (None), then each calibrated one that applies."""
        if self.pair is None or x.image_bytes <= 0:  # uncalibrated forms cannot be priced; a text-only turn uploads nothing
            return [None]
        return [None] + [u for u in self.pair.uploads if u.row(r) is not None and (send_keep or not u.form.startswith("region"))]

    def _cloud_up_bytes(self, r: float, x: CostInputs, send_keep: bool, form: UploadCalibration | None = None) -> int:
        """What a cloud answer job uploads: the image (the file, or its calibrated size in ``form``), the keep indices, the header."""
        assert self.large is not None
        image = x.image_bytes if form is None else round(form.image_bytes[form.row(r)])
        keep = send_keep or (form is not None and sends_tokens(form.form))
        return image + (8 * round(r * self.large.model.image_tokens) if keep else 0) + 600

    def _build_ms(self, r: float, x: CostInputs, form: UploadCalibration | None) -> float:
        """Edge time to make the upload (resize and re-encode, flatten, quantise): none for the file."""
        return 0.0 if form is None else x.edge_load * form.build_ms[form.row(r)]

    def _cloud_ms(self, r: float, x: CostInputs, send_keep: bool, form: UploadCalibration | None = None) -> float:
        """Cloud answer after the edge has what it sends: build the upload, upload, queue, compute, result.

        A tokens form replaces the cloud's vision encoder, so its time is not charged.
        """
        compute = self.cloud_compute_ms(r)
        if form is not None and sends_tokens(form.form):
            assert self.cloud_clock is not None
            compute -= self.cloud_clock.ms("vision_encoder")
        up = self._cloud_up_bytes(r, x, send_keep, form)
        return self._build_ms(r, x, form) + x.link.transfer_ms(up, 600) + x.cloud_queue_ms + compute

    def _split_up_bytes(self, k: int, r: float) -> float:
        """fp16 hidden states of the prompt (+ position ids and mask), then one hidden vector per decode step."""
        assert self.large is not None
        t, d = self.prompt_tokens(self.large, r), self.large.model.hidden_size
        return t * d * 2 + 16 * t + 600 + (self._answer_tokens(self.large) - 1) * (2 * d + 600)

    def _split_ms(self, k: int, r: float, x: CostInputs) -> float:
        m, lc, cc = self.large, self.large_clock, self.cloud_clock
        assert m is not None and lc is not None and cc is not None
        t = self.prompt_tokens(m, r)
        n = self._answer_tokens(m)
        d, layers = m.model.hidden_size, m.model.num_layers
        edge_prefill = lc.ms("vision_encoder") + x.mas_ms + lc.ms("text_embed", t) + lc.decoder_ms(0, k, t)
        cloud_prefill = cc.decoder_ms(k, layers, t) + cc.ms("lm_head", 1)
        step = x.edge_load * (lc.ms("text_embed", 1) + lc.decoder_ms(0, k, 1, t)) + x.link.transfer_ms(
            2 * d + 600, 4 * m.model.vocab_size + 300
        )
        step += cc.decoder_ms(k, layers, 1, t) + cc.ms("lm_head", 1)
        up = t * d * 2 + 16 * t + 600  # fp16 hidden states + position ids and mask
        return (
            x.edge_load * edge_prefill
            + x.link.transfer_ms(up, 4 * m.model.vocab_size + 300)
            + x.cloud_queue_ms
            + cloud_prefill
            + (n - 1) * step
        )

    # -- candidates -------------------------------------------------------------------------

    def _edge_plan(self, r: float, x: CostInputs, reason: str = "") -> Plan:
        ms = self._local_ms(self.edge, self.edge_clock, r, x, r < 1) * x.local_residual("edge", r)
        return Plan("edge", r, est_latency_ms=ms, est_accuracy=self._accuracy(self.edge, r), reason=reason)

    def _cloud_accuracy(self, r: float, send_keep: bool, form: UploadCalibration | None) -> float:
        """The large model's accuracy in the cloud fed ``form``: the same plan's with the file, less what the form costs."""
        with_file = self._cloud_file_accuracy(r, send_keep)
        return with_file if form is None else min(1.0, max(0.0, with_file + form.charged(r)))

    def _cloud_file_accuracy(self, r: float, send_keep: bool) -> float:
        """The large model's accuracy in the cloud given the file, pruned to the edge's keep-set at ``r`` (or every token)."""
        assert self.large is not None
        if send_keep and self.pair is not None and r in self.pair.keep_ratios:
            return self.pair.large_accuracy[self.pair.row(r)]  # the large model fed the edge's keep-set
        return self._accuracy(self.large, r if send_keep else 1.0)

    def _cloud_plan(self, r: float, x: CostInputs, send_keep: bool, form: UploadCalibration | None = None) -> Plan:
        """The large model in the cloud; with ``send_keep`` (or a tokens form) the edge first encodes + runs MAS for the keep-set."""
        pre = self._edge_pre_ms(x) if send_keep or (form is not None and sends_tokens(form.form)) else 0.0
        return Plan(
            "cloud", r, send_keep=send_keep, upload=form.form if form else "file", est_latency_ms=pre + self._cloud_ms(r, x, send_keep, form),
            est_accuracy=self._cloud_accuracy(r, send_keep, form), est_uplink_bytes=self._cloud_up_bytes(r, x, send_keep, form),
        )  # fmt: skip

    def _edge_pre_ms(self, x: CostInputs) -> float:
        """What the edge does before a cloud job can carry its keep-set: encode + MAS with the edge model."""
        return x.edge_load * (self.edge_clock.ms("vision_encoder") + x.mas_ms)

    def _draft_verify_plans(
        self, r: float, x: CostInputs, speculate: bool, always_verify: bool = False, form: UploadCalibration | None = None
    ) -> list[Plan]:
        """One plan per calibrated threshold (only "always verify" without a calibration), the verify job in ``form``."""
        return [make() for _, make in self._draft_verify_options(r, x, speculate, always_verify, form)]

    def _draft_verify_options(
        self, r: float, x: CostInputs, speculate: bool, always_verify: bool = False, form: UploadCalibration | None = None
    ) -> list[tuple[float, Callable[[], Plan]]]:
        """(expected accuracy, the plan) per threshold and speculation; the row is priced once, on the first plan asked for."""
        assert self.large is not None
        row: list[tuple[Plan, float, float, float]] = []

        def priced() -> tuple[Plan, float, float, float]:
            if not row:
                row.append((self._edge_plan(r, x), self._cloud_ms(r, x, True, form), self._edge_pre_ms(x), self._cloud_up_bytes(r, x, True, form)))
            return row[0]

        def make(th: float, p: float, acc: float, spec: bool) -> Plan:
            edge, cloud, pre, up = priced()
            slow = max(edge.est_latency_ms, pre + cloud) if spec else edge.est_latency_ms + cloud
            return Plan(
                PlanKind.DRAFT_VERIFY, r, commit_threshold=th, speculate=spec, upload=form.form if form else "file",
                est_latency_ms=p * edge.est_latency_ms + (1 - p) * slow, est_accuracy=acc, est_uplink_bytes=up if spec else (1 - p) * up,
            )  # fmt: skip

        out = []
        pair = self.pair if (self.pair is not None and r in self.pair.keep_ratios) else None
        grid = pair.thresholds if pair and not always_verify else (ALWAYS_VERIFY,)
        if pair is not None and not always_verify:
            grid = tuple(pair.thresholds[j] for j in self._frontier(r, form))
        for th in grid:
            if pair is not None and th in pair.thresholds:
                j = pair.thresholds.index(th)
                p = pair.commit_share[pair.row(r)][j]
                acc = form.accuracy[form.row(r)][j] if form is not None else pair.accuracy[pair.row(r)][j]
            else:  # never commits the draft: the large model's accuracy with the edge's keep-set
                p, acc = 0.0, self._cloud_accuracy(r, True, form)
            for spec in (True, False) if speculate else (False,):
                out.append((acc, functools.partial(make, th, p, acc, spec)))
        return out

    def _frontier(self, r: float, form: UploadCalibration | None) -> tuple[int, ...]:
        """The thresholds of one calibrated row that no other threshold beats on both commit share and accuracy.

        A draft/verify plan gets faster and sends fewer bytes as its commit share grows (its
        fallback is never faster than the draft), so a threshold that commits less without
        being more accurate can never be chosen: it is not priced. Static per calibration.
        """
        key = (form.form if form is not None else "file", r)
        hit = self._frontiers.get(key)
        if hit is None:
            assert self.pair is not None
            a = self.pair.row(r)
            shares = self.pair.commit_share[a]
            accs = form.accuracy[form.row(r)] if form is not None else self.pair.accuracy[a]
            best, keep = -1.0, []
            for j in sorted(range(len(shares)), key=lambda j: (-shares[j], -accs[j])):
                if accs[j] > best + 1e-12:
                    keep.append(j)
                    best = accs[j]
            hit = self._frontiers[key] = tuple(sorted(keep))
        return hit

    def _speculative_plan(self, r: float, x: CostInputs, send_keep: bool, form: UploadCalibration | None = None) -> Plan:
        """Token-level speculation; the per-token acceptance is the prior until calibrated per pair."""
        m, cc = self.large, self.cloud_clock
        assert m is not None and cc is not None
        t = self.prompt_tokens(m, r)
        n = self._answer_tokens(m)
        layers = m.model.num_layers
        tokens_form = form is not None and sends_tokens(form.form)
        pre = self._edge_pre_ms(x) if send_keep or tokens_form else 0.0
        first = pre + self._build_ms(r, x, form) + x.link.transfer_ms(self._cloud_up_bytes(r, x, send_keep, form), 600) + x.cloud_queue_ms
        first += (0.0 if tokens_form else cc.ms("vision_encoder")) + cc.ms("text_embed", t) + cc.decoder_ms(0, layers, t) + cc.ms("lm_head", 1)
        ec = self.edge_clock
        t_edge = self.prompt_tokens(self.edge, r)
        edge_ready = x.edge_load * (ec.ms("vision_encoder") + ec.ms("text_embed", t_edge) + ec.decoder_ms(0, self.edge.model.num_layers, t_edge) + ec.ms("lm_head", 1))
        edge_step = x.edge_load * (ec.ms("text_embed", 1) + ec.decoder_ms(0, self.edge.model.num_layers, 1, t_edge) + ec.ms("lm_head", 1))
        rtt = x.link.transfer_ms(700, 700)
        a = PRIOR_ACCEPTANCE
        cloud_step = cc.ms("text_embed", 1) + cc.decoder_ms(0, layers, 1, t) + cc.ms("lm_head", 1)
        k = block_size(a, rtt + cc.decoder_ms(0, layers, 1, t), edge_step)
        cloud_pass = cc.ms("text_embed", k + 1) + cc.decoder_ms(0, layers, k + 1, t) + cc.ms("lm_head", k + 1)

        def cost(ahead: int) -> tuple[float, int]:
            """(latency, blocks after the prompt's) when every verdict carries ``ahead`` of the cloud's own tokens."""
            head = first + min(ahead, max(0.0, n - 1)) * cloud_step  # the prompt's verdict: its own token, then those
            blocks = math.ceil(max(0.0, n - 1 - ahead) / ((1 - a ** (k + 1)) / (1 - a) + ahead))
            if ahead >= x.token_budget - 1:  # the prompt's verdict reaches the budget: the edge prefills only on a fault
                return head, blocks
            return max(head, edge_ready) + blocks * max(rtt + cloud_pass + ahead * cloud_step, k * edge_step), blocks

        ahead = self.options.decode_ahead
        if ahead < 0:  # auto: what the cloud decodes within a round trip, or the whole budget where the edge is slower still
            within = min(MAX_DECODE_AHEAD, int(rtt // cloud_step) if cloud_step > 0 else MAX_DECODE_AHEAD)
            whole = min(MAX_DECODE_AHEAD, max(0, x.token_budget - 1))
            ahead = min((within, whole), key=lambda h: (cost(h)[0], h))
        ms, blocks = cost(ahead)
        return Plan(
            "speculative", r, send_keep=send_keep, block=k, decode_ahead=ahead, upload=form.form if form else "file", est_latency_ms=ms,
            est_accuracy=self._cloud_accuracy(r, send_keep, form), est_uplink_bytes=self._cloud_up_bytes(r, x, send_keep, form) + blocks * 700,
        )  # fmt: skip

    def candidates(self, x: CostInputs, min_accuracy: float = 0.0) -> list[Plan]:
        """Every plan the adaptive policy may take now, with its estimates (only those expected at least ``min_accuracy``)."""
        return [make() for acc, make in self._options(x) if acc >= min_accuracy - 1e-9]

    def _options(self, x: CostInputs) -> list[tuple[float, Callable[[], Plan]]]:
        """(expected accuracy, the plan) of every candidate: accuracies come from the tables, so ``choose`` prices only
        the plans above its floor (a few dozen of the hundreds a calibration with upload forms allows)."""
        o = self.options
        out: list[tuple[float, Callable[[], Plan]]] = [(self._accuracy(self.edge, r), functools.partial(self._edge_plan, r, x)) for r in o.keep_ratios]
        if self.large is not None and self.large_clock is not None and o.allow_local_large:
            out += [(self._accuracy(self.large, r), functools.partial(self._local_large_plan, r, x)) for r in o.keep_ratios]
        if x.cloud_ok and self.large is not None and self.cloud_clock is not None:
            same_grid = self.large.model.image_tokens == self.edge.model.image_tokens
            for r in o.keep_ratios:
                if r < 1 and not same_grid:
                    continue
                for form in self._forms(r, x, send_keep=r < 1):
                    acc = self._cloud_accuracy(r, r < 1, form)
                    out.append((acc, functools.partial(self._cloud_plan, r, x, r < 1, form)))
                    out.append((acc, functools.partial(self._speculative_plan, r, x, r < 1, form)))
                for form in self._forms(r, x, send_keep=True):
                    out += self._draft_verify_options(r, x, o.speculate, form=form)
            if self.large_clock is not None:
                out += [
                    (self._accuracy(self.large, r), functools.partial(self._split_plan, k, r, x)) for k in self.large.split_points for r in o.keep_ratios
                ]
        return out

    def _local_large_plan(self, r: float, x: CostInputs) -> Plan:
        assert self.large is not None and self.large_clock is not None
        return Plan(
            PlanKind.LOCAL_LARGE, r, est_latency_ms=self._local_ms(self.large, self.large_clock, r, x, r < 1) * x.local_residual("local_large", r),
            est_accuracy=self._accuracy(self.large, r),
        )  # fmt: skip

    def _split_plan(self, k: int, r: float, x: CostInputs, reason: str = "") -> Plan:
        assert self.large is not None
        return Plan(
            PlanKind.SPLIT, r, split_layer=k, est_latency_ms=self._split_ms(k, r, x), est_accuracy=self._accuracy(self.large, r),
            est_uplink_bytes=self._split_up_bytes(k, r), reason=reason,
        )  # fmt: skip

    # -- the decision -----------------------------------------------------------------------

    def choose(self, x: CostInputs, policy: str | None = None, split_layer: int | None = None, keep_ratio: float | None = None) -> Plan:
        """The plan for one request. ``policy`` overrides the configured one (per request)."""
        policy = policy or self.options.policy
        if policy != "msao":
            plan = self._fixed(policy, x, split_layer, keep_ratio)
            return replace(plan, fallback_reserve_ms=self.fallback_reserve_ms(plan, x))
        options = self._options(x)
        floor = max(acc for acc, _ in options) - self.options.accuracy_slack
        eligible = [make() for acc, make in options if acc >= floor - 1e-9]  # only these are priced
        in_time = [p for p in eligible if p.est_latency_ms <= x.deadline_ms]
        pool = in_time or eligible
        fastest = min(pool, key=lambda p: (round(p.est_latency_ms, 6), -p.est_accuracy))
        band = [p for p in pool if p.est_latency_ms <= fastest.est_latency_ms * (1 + self.options.latency_tolerance) + 1e-9]
        pick = min(band, key=lambda p: (round(p.est_uplink_bytes), round(p.est_latency_ms, 6), -p.est_accuracy))
        runner_up = min((p for p in pool if p is not pick), key=lambda p: p.est_latency_ms, default=None)
        lead = (
            f"lowest expected latency {pick.est_latency_ms:.1f} ms"
            if pick is fastest
            else f"fewest uplink bytes ({pick.est_uplink_bytes:.0f}) within {100 * self.options.latency_tolerance:.0f} % of the fastest "
            f"({fastest.describe()} {fastest.est_latency_ms:.1f} ms), {pick.est_latency_ms:.1f} ms"
        )
        why = [
            f"{lead} among {len(pool)} plans with expected accuracy >= {floor:.3f}"
            + ("" if in_time else f" (none fits the {x.deadline_ms:.0f} ms deadline)"),
            f"accuracy {pick.est_accuracy:.3f}",
        ]
        if runner_up is not None:
            why.append(f"next: {runner_up.describe()} {runner_up.est_latency_ms:.1f} ms")
        why.append(
            f"link rtt {x.link.rtt_ms:.1f} ms, {x.link.bandwidth_bps / 1e6:.0f} Mbit/s{'' if x.link.measured else ' (prior)'}"
            if x.cloud_ok
            else "cloud unavailable"
        )
        if x.cloud_ok:
            why.append(f"cloud queue {x.cloud_queue_ms:.0f} ms")
        why.append(f"edge load x{x.edge_load:.2f}")
        return replace(pick, reason="; ".join(why), fallback_reserve_ms=self.fallback_reserve_ms(pick, x))

    def fallback_reserve_ms(self, plan: Plan, x: CostInputs) -> float:
        """Time kept back from a cloud or split plan for the edge-only answer that replaces a failed cloud path.

        Three times the edge answer's estimate (estimates err under load), at least a tenth of
        the budget, never more than half of it. Local plans need none; neither does
        draft/verify, whose fallback (the draft) is computed anyway.
        """
        if plan.kind not in (PlanKind.CLOUD, PlanKind.SPLIT, PlanKind.SPECULATIVE):
            return 0.0
        budget = max(0.0, x.deadline_ms)
        return min(0.5 * budget, max(3.0 * self.edge_fallback_ms(x), 0.1 * budget))

    def _fixed(self, policy: str, x: CostInputs, split_layer: int | None, keep_ratio: float | None) -> Plan:
        o = self.options
        if policy == "edge_only":
            return self._edge_plan(1.0, x, "policy edge_only")
        if policy == "prune_only":
            return self._edge_plan(keep_ratio or o.prune_ratio, x, f"policy prune_only at keep ratio {keep_ratio or o.prune_ratio:g}")
        if self.large is None or self.cloud_clock is None:
            raise ConfigError(f"policy {policy} needs the large model's bundle on the edge and a cloud; start with --large-bundle")
        if policy == "cloud_only":
            return replace(self._cloud_plan(1.0, x, send_keep=False), reason="policy cloud_only: raw image uploaded")
        if policy == "static_split":
            if self.large_clock is None:
                raise ConfigError(
                    f"policy static_split runs {self.large.name}'s first layers on this edge, which holds only its manifest "
                    "(edge.large_on_edge = false); use cloud_only or speculative, or set large_on_edge = true"
                )
            k = o.split_layer if split_layer is None else split_layer
            if k not in self.large.split_points:
                raise ConfigError(f"split layer {k} is not one of {self.large.name}'s split points {list(self.large.split_points)}")
            return self._split_plan(k, 1.0, x, reason=f"policy static_split at layer {k}")
        if policy == "speculative":
            return replace(self._speculative_plan(1.0, x, send_keep=False), reason="policy speculative: token-level, raw image uploaded")
        # draft_verify_static: the edge always drafts, the cloud always verifies (its answer wins)
        plan = self._draft_verify_plans(1.0, x, speculate=True, always_verify=True)[0]
        return replace(plan, reason="policy draft_verify_static: the edge drafts, the cloud always verifies")
