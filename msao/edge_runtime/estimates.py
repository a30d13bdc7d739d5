"""Live estimates the scheduler's cost model reads: segment times, the link, the cloud queue, edge load.

Every number starts from something measured (a bundle's latency profile, a configured prior
for the link) and is then pulled towards what this daemon observes, by an exponentially
weighted moving average (EWMA) over real requests and real transfers:

- ``SegmentClock``: per-segment latency from the bundle's profile (interpolated in new tokens),
  times a live scale factor = EWMA(observed / profiled) per side (edge, cloud). One factor per
  side, not per segment: a throttled or busy device slows every segment alike, and one factor
  converges after a handful of requests.
- ``LinkEstimate``: RTT from the network share of small transfers, bandwidth from larger ones
  (bytes / (network time - RTT)), both EWMA, both seeded with priors until measured.
- ``LoadEstimate``: the edge's own queue and running requests.

Thread-safe; knows nothing of MQTT (it reads ``TransferStats`` records) or of plans.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from msao.cloud_bridge.stats import TransferStats
from msao.engines.manifest import LatencyProfile, Manifest

__all__ = ["EwmaOptions", "LinkEstimate", "LinkSnapshot", "LoadEstimate", "SegmentClock"]


@dataclass(frozen=True)
class EwmaOptions:
    """Smoothing of the live estimates.

    Attributes:
        alpha: weight of a new observation (0.2: about the last 10 observations matter).
        small_bytes: transfers at most this large measure RTT only.
        large_bytes: transfers at least this large also measure bandwidth.
        prior_rtt_ms / prior_bandwidth_bps: assumed until measured (the paper's 20 ms, 200 Mbit/s).
    """

    alpha: float = 0.2
    small_bytes: int = 4096
    large_bytes: int = 32 * 1024
    prior_rtt_ms: float = 20.0
    prior_bandwidth_bps: float = 200e6


def _ewma(old: float, new: float, alpha: float) -> float:
    return new if math.isnan(old) else (1 - alpha) * old + alpha * new


class SegmentClock:
    """Predicted milliseconds of a bundle's segments on one side, from its profile and live scale."""

    def __init__(self, manifest: Manifest, alpha: float = 0.2, profile: LatencyProfile | None = None):
        self.manifest = manifest
        self.alpha = alpha
        self._lock = threading.Lock()
        self._points: dict[str, list[tuple[int, int, float]]] = {}
        self._scale = float("nan")
        self.use_profile(profile or (manifest.profiles[0] if manifest.profiles else None))

    def use_profile(self, profile: LatencyProfile | None) -> None:
        """Predict from ``profile`` from now on (e.g. one measured on this device at start); resets the live scale."""
        points: dict[str, list[tuple[int, int, float]]] = {}
        if profile is not None:
            for p in profile.points:
                points.setdefault(p.segment, []).append((p.tokens, p.past, p.ms_p50))
        with self._lock:
            self._points = points
            self._profiled: dict[tuple[str, int, int], float] = {}  # profiled_ms per (segment, tokens, past): the profile is fixed
            self._scale = float("nan")
            self.observations = 0
            self.device = profile.device if profile is not None else "unprofiled"

    @property
    def scale(self) -> float:
        """observed / profiled, EWMA; 1 until something was observed."""
        return 1.0 if math.isnan(self._scale) else self._scale

    def observe(self, predicted_ms: float, observed_ms: float) -> None:
        """Feed one real run (a stage or a whole local path) against its prediction.

        The first observation after a profile is skipped: it carries first-call costs (lazy
        initialisation in the runtime and the image decoder) that later requests do not pay.
        """
        if predicted_ms <= 0 or observed_ms <= 0:
            return
        with self._lock:
            self.observations += 1
            if self.observations > 1:
                self._scale = _ewma(self._scale, min(100.0, observed_ms / predicted_ms), self.alpha)

    def seed_scale(self, value: float) -> None:
        """Start the live scale at ``value`` (e.g. whole requests timed at start) instead of 1."""
        with self._lock:
            self._scale = min(100.0, max(0.01, value))
            self.observations = 1  # seeded: the next observation counts

    def profiled_ms(self, segment: str, tokens: int = 0, past: int = 0) -> float:
        """The profile's time of ``segment`` for ``tokens`` new tokens after ``past`` (no live scale).

        Decode steps (tokens == 1 with a past) use the profiled decode point; prefill lengths
        interpolate linearly between profiled lengths and extrapolate from the two nearest.
        A segment the profile lacks costs 0 (and the bundle should be re-exported). Memoised: the
        scheduler asks for the same few hundred points on every request.
        """
        key = (segment, tokens, past)
        hit = self._profiled.get(key)
        if hit is None:
            hit = self._profiled[key] = self._interpolate(segment, tokens, past)
        return hit

    def _interpolate(self, segment: str, tokens: int, past: int) -> float:
        pts = self._points.get(segment)
        if not pts:
            return 0.0
        if tokens == 1 and past > 0:
            decode = [ms for t, p, ms in pts if t == 1 and p > 0]
            if decode:
                return decode[0]
        line = sorted((t, ms) for t, p, ms in pts if p == 0)
        if not line:
            return pts[0][2]
        if len(line) == 1:
            return line[0][1]
        for (t0, m0), (t1, m1) in zip(line, line[1:]):
            if tokens <= t1 or (t1, m1) == line[-1]:
                if t1 == t0:
                    return m1
                return max(0.0, m0 + (m1 - m0) * (tokens - t0) / (t1 - t0))
        return line[-1][1]

    def ms(self, segment: str, tokens: int = 0, past: int = 0) -> float:
        return self.profiled_ms(segment, tokens, past) * self.scale

    def decoder_ms(self, start: int, end: int, tokens: int, past: int = 0) -> float:
        """Layers [start, end) of the decoder for ``tokens`` new tokens (sum over the chunks)."""
        return sum(
            self.ms(s.name, tokens, past)
            for s in self.manifest.decoder_chunks()
            if s.layers and start <= s.layers[0] and s.layers[1] <= end
        )


@dataclass(frozen=True)
class LinkSnapshot:
    """The link as the cost model sees it at one moment."""

    rtt_ms: float
    bandwidth_bps: float
    measured: bool  # False: still the priors

    def transfer_ms(self, up_bytes: int, down_bytes: int = 0) -> float:
        """One request/response over the link: RTT plus both payloads at the bandwidth."""
        return self.rtt_ms + 8e3 * (up_bytes + down_bytes) / self.bandwidth_bps


class LinkEstimate:
    """EWMA of RTT and bandwidth from real transfers (``TransferStats`` of ok jobs)."""

    def __init__(self, options: EwmaOptions = EwmaOptions()):
        self.options = options
        self._rtt = float("nan")
        self._bw = float("nan")
        self._lock = threading.Lock()
        self.observations = 0

    def observe(self, t: TransferStats) -> None:
        if t.outcome != "ok":
            return
        net = t.network_ms
        size = t.bytes_up + t.bytes_down
        o = self.options
        with self._lock:
            self.observations += 1
            if size <= o.small_bytes:
                self._rtt = _ewma(self._rtt, net, o.alpha)
            elif size >= o.large_bytes:
                rtt = o.prior_rtt_ms if math.isnan(self._rtt) else self._rtt
                seconds = max(net - rtt, 0.05 * net, 1e-3) / 1e3
                self._bw = _ewma(self._bw, 8 * size / seconds, o.alpha)

    def snapshot(self) -> LinkSnapshot:
        with self._lock:
            rtt, bw = self._rtt, self._bw
        measured = not (math.isnan(rtt) and math.isnan(bw))
        return LinkSnapshot(
            rtt_ms=self.options.prior_rtt_ms if math.isnan(rtt) else rtt,
            bandwidth_bps=self.options.prior_bandwidth_bps if math.isnan(bw) else bw,
            measured=measured,
        )


class LoadEstimate:
    """Requests waiting and running on this edge; the cost model adds their share of local time."""

    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self.queued = 0
        self.running = 0
        self._lock = threading.Lock()

    def enqueue(self) -> None:
        with self._lock:
            self.queued += 1

    def start(self) -> None:
        with self._lock:
            self.queued -= 1
            self.running += 1

    def finish(self) -> None:
        with self._lock:
            self.running -= 1

    def local_wait_factor(self) -> float:
        """Multiplier on local compute time: 1 when this request runs alone; more when others share the cores."""
        with self._lock:
            others = max(0, self.running - 1) + self.queued
        return 1.0 + others / self.workers
