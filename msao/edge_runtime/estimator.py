"""The one owner of what the edge daemon learns while it serves: clocks, link, MAS time, residuals, load.

The scheduler keeps no state: per request it reads a ``CostInputs`` snapshot made here, and
after the request the runtime hands the plan and its outcome back through ``observe``. Every
correction the daemon makes to its cost model therefore happens in this one class:

    start        profile_local(kind, model): this device's segment times + whole-request scale
    per request  snapshot(...) ─► Scheduler.choose ─► Executor.run ─► observe(plan, outcome)
    per transfer observe_transfer(stats): link RTT/bandwidth, the cloud's live scale

Thread-safe (each piece has its own lock); knows nothing of MQTT or of how plans run.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from msao.cloud_bridge.stats import TransferStats
from msao.edge_runtime.estimates import EwmaOptions, LinkEstimate, LoadEstimate, SegmentClock
from msao.edge_runtime.plans import Plan, PlanKind
from msao.edge_runtime.scheduler import CostInputs, Scheduler, SchedulerOptions
from msao.engines.generation import DEFAULT_MAX_NEW_TOKENS
from msao.engines.manifest import LatencyProfile, Manifest

__all__ = ["Estimator", "Observation"]

log = logging.getLogger(__name__)

MAS_PRIOR_MS = 0.3  # until the first MAS run is timed
RESIDUAL_BOUNDS = (0.25, 4.0)


@dataclass(frozen=True)
class Observation:
    """What one served request tells the estimator (the executor's outcome, reduced to what is learned).

    Attributes:
        answered_by: ``edge`` or ``cloud``.
        local_observed_ms: local compute of the answer that was committed (0: none ran here).
        mas_ms: MAS time of the request (0: MAS did not run).
        fallback: the cloud path failed and the edge answered.
    """

    answered_by: str
    local_observed_ms: float
    mas_ms: float
    fallback: bool


class Estimator:
    """Live estimates for one daemon, and the scheduler that reads them.

    Args:
        edge / large: manifests of the edge model and of the large model (None: edge-only).
        calibration: accuracy tables for the scheduler (``msao calibrate``), or None.
        options: EWMA smoothing and link priors.
        workers: the runtime's worker threads (the edge load's denominator).
        large_on_edge: the large model's weights are on this device too (False: no local-large
            or split plan is a candidate; the paper's regime).
    """

    def __init__(
        self,
        scheduler_options: SchedulerOptions,
        edge: Manifest,
        large: Manifest | None = None,
        calibration=None,
        options: EwmaOptions = EwmaOptions(),
        workers: int = 1,
        large_on_edge: bool = True,
    ):
        self.options = options
        self.edge_clock = SegmentClock(edge, options.alpha)
        self.large_clock = SegmentClock(large, options.alpha) if large is not None and large_on_edge else None
        self.cloud_clock = SegmentClock(large, options.alpha) if large is not None else None
        self.scheduler = Scheduler(scheduler_options, edge, self.edge_clock, large, self.large_clock, self.cloud_clock, calibration)
        self.link = LinkEstimate(options)
        self.load = LoadEstimate(workers)
        self._lock = threading.Lock()
        self._mas_ms = float("nan")
        self._residuals: dict[tuple[str, float], float] = {}
        self.last_transfer = 0.0  # time.monotonic() of the last real transfer (the probe loop reads it)

    # -- start ------------------------------------------------------------------------------

    def profile_local(self, kind: PlanKind, profile: LatencyProfile, timed_request: Callable[[], float], repeats: int = 4) -> None:
        """This device's segment times, then its whole-request speed against them.

        Per-segment medians miss what a CPU quota (or a busy GPU) does to a whole request: calls
        shorter than the quota period run at full speed and the stall lands between them. So a
        few whole synthetic requests set the clock's starting scale as well.
        """
        clock = self.large_clock if kind is PlanKind.LOCAL_LARGE else self.edge_clock
        assert clock is not None
        t0 = time.perf_counter()
        clock.use_profile(profile)
        observed = [timed_request() for _ in range(repeats)][1:]  # the first pays first-call costs
        predicted = self.scheduler.profiled_local_ms(kind, 1.0)
        clock.seed_scale(float(np.median(observed)) / predicted if predicted > 0 else 1.0)
        log.info(
            "profiled %s on this device in %.1f s: a request takes %.1f ms, %.2fx its segments' sum",
            clock.manifest.name, time.perf_counter() - t0, float(np.median(observed)), clock.scale,
        )  # fmt: skip

    # -- the snapshot the scheduler reads ---------------------------------------------------

    def snapshot(
        self, *, cloud_ok: bool, cloud_queue_depth: float, image_bytes: int, deadline_ms: float, token_budget: int = DEFAULT_MAX_NEW_TOKENS
    ) -> CostInputs:
        """The live state for one decision.

        Args:
            cloud_queue_depth: jobs waiting per worker thread on the least loaded worker
                serving the large model (from its retained status).
        """
        with self._lock:
            mas = MAS_PRIOR_MS if math.isnan(self._mas_ms) else self._mas_ms
            residuals = dict(self._residuals)
        queue_ms = cloud_queue_depth * self.scheduler.cloud_compute_ms(1.0) if cloud_ok and self.cloud_clock is not None else 0.0
        return CostInputs(
            link=self.link.snapshot(), cloud_ok=cloud_ok, cloud_queue_ms=queue_ms, edge_load=self.load.local_wait_factor(),
            mas_ms=mas, image_bytes=image_bytes, deadline_ms=max(0.0, deadline_ms), local_residuals=residuals,
            token_budget=token_budget,
        )  # fmt: skip

    def residual(self, kind: str, r: float) -> float:
        with self._lock:
            return self._residuals.get((str(kind), r), 1.0)

    @property
    def mas_ms(self) -> float:
        with self._lock:
            return MAS_PRIOR_MS if math.isnan(self._mas_ms) else self._mas_ms

    # -- learning ---------------------------------------------------------------------------

    def observe(self, plan: Plan, seen: Observation, inputs: CostInputs) -> None:
        """Learn from one served request: MAS time, the local plan's residual, the local clock's scale."""
        a = self.options.alpha
        if seen.mas_ms > 0:
            with self._lock:
                self._mas_ms = seen.mas_ms if math.isnan(self._mas_ms) else (1 - a) * self._mas_ms + a * seen.mas_ms
        if seen.local_observed_ms <= 0 or seen.fallback or seen.answered_by != "edge":
            return
        if plan.kind.is_local:  # the estimate's terms: MAS (when pruning) + vision + decoder
            self.observe_local(plan, seen.local_observed_ms + seen.mas_ms)
        kind = PlanKind.LOCAL_LARGE if plan.kind is PlanKind.LOCAL_LARGE else PlanKind.EDGE  # committed drafts ran the edge model
        clock = self.large_clock if kind is PlanKind.LOCAL_LARGE else self.edge_clock
        if clock is not None:
            clock.observe(self.scheduler.profiled_local_ms(kind, plan.keep_ratio) * inputs.edge_load, seen.local_observed_ms)

    def observe_local(self, plan: Plan, observed_ms: float) -> None:
        """Learn how far a local plan's estimate was from its run (same terms: MAS + vision + decoder).

        The clocks scale every segment of a side by one live factor; what one factor cannot
        follow is how plans differ from their profile *relative to each other* on this device
        (on a CPU-quota-throttled edge a short plan finishes inside one quota slice, a long one
        waits out several). So each local (kind, keep ratio) carries a residual factor on top
        of the clock, moved multiplicatively so that estimate == observation is its fixed point.
        """
        if not plan.kind.is_local or plan.est_latency_ms <= 0 or observed_ms <= 0:
            return
        a = self.options.alpha
        key = (plan.kind.value, plan.keep_ratio)
        lo, hi = RESIDUAL_BOUNDS
        with self._lock:
            c = self._residuals.get(key, 1.0)
            self._residuals[key] = min(hi, max(lo, c * ((1 - a) + a * observed_ms / plan.est_latency_ms)))

    def observe_transfer(self, t: TransferStats) -> None:
        """A real transfer: the link's RTT and bandwidth, and (for answers) the cloud's live scale."""
        self.last_transfer = time.monotonic()
        self.link.observe(t)
        if t.outcome == "ok" and t.kind == "answer" and t.compute_ms > 0 and self.cloud_clock is not None:
            self.cloud_clock.observe(self.scheduler.cloud_compute_ms(1.0) / self.cloud_clock.scale, t.compute_ms)
