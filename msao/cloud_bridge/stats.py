"""Typed records of real transfers, for the scheduler's live bandwidth and RTT estimates.

Knows nothing of MQTT; the edge-side link fills one ``TransferStats`` per job. The worker
reports its queue wait and compute time in each result, so the edge can take them out of
the round trip and keep only what the network (and the broker) cost.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TransferLog", "TransferStats"]


@dataclass(frozen=True)
class TransferStats:
    """One job's cost on the wire, as measured on the edge.

    Attributes:
        job_id / kind / worker_id: which job went where ("" when no worker answered).
        outcome: ``ok``, ``busy``, ``timeout``, ``error`` or ``cancelled`` (the edge stopped waiting).
        attempts: dispatches made (1, or 2 after one re-dispatch).
        bytes_up: payload bytes published, over all chunks and attempts.
        bytes_down: payload bytes of the result as received.
        chunks_up: MQTT messages published for the job (> attempts when chunked).
        body_bytes_up: uncompressed size of the job payload (``bytes_up`` per attempt is
            smaller when zstd helped).
        rtt_ms: last dispatch -> result received.
        queue_wait_ms / compute_ms / worker_codec_ms: the worker's share, from the result.
        encode_ms / decode_ms: edge codec time for the job and the result.
    """

    job_id: str
    kind: str
    worker_id: str
    outcome: str
    attempts: int
    bytes_up: int
    bytes_down: int
    chunks_up: int
    body_bytes_up: int
    rtt_ms: float
    queue_wait_ms: float = 0.0
    compute_ms: float = 0.0
    worker_codec_ms: float = 0.0
    encode_ms: float = 0.0
    decode_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.outcome not in ("ok", "busy", "timeout", "error", "cancelled"):
            raise ValueError(f"outcome {self.outcome!r} not ok/busy/timeout/error/cancelled")
        if min(self.attempts, self.bytes_up, self.bytes_down, self.chunks_up) < 0:
            raise ValueError(f"negative count in {self}")

    @property
    def network_ms(self) -> float:
        """Round trip minus the worker's queue, compute and codec time: the link + broker share."""
        return max(0.0, self.rtt_ms - self.queue_wait_ms - self.compute_ms - self.worker_codec_ms)


class TransferLog:
    """The last ``capacity`` transfers (thread-safe); the scheduler reads it for EWMA estimates."""

    def __init__(self, capacity: int = 256):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._items: deque[TransferStats] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[TransferStats], None]] = []

    def subscribe(self, listener: Callable[[TransferStats], None]) -> None:
        """Call ``listener`` with every transfer added from now on (on the adding thread; keep it quick)."""
        with self._lock:
            self._listeners.append(listener)

    def add(self, stats: TransferStats) -> None:
        with self._lock:
            self._items.append(stats)
            listeners = list(self._listeners)
        for fn in listeners:
            fn(stats)

    def recent(self) -> tuple[TransferStats, ...]:
        with self._lock:
            return tuple(self._items)

    def find(self, job_id: str) -> TransferStats | None:
        """The most recent transfer of ``job_id`` still in the log, or None."""
        with self._lock:
            return next((t for t in reversed(self._items) if t.job_id == job_id), None)

    @property
    def last(self) -> TransferStats | None:
        with self._lock:
            return self._items[-1] if self._items else None
