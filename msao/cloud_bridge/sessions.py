"""Worker-side memory with bounds: KV sessions (split decode steps, speculation), and recent results by job id.

Knows nothing of MQTT or models beyond an opaque value per session. Both tables are bounded
in entries (and results in bytes), least recently used first out, and sessions also expire
after an idle time, or at their request's deadline when they have one, so a fleet of edges
that vanish mid-conversation cannot fill a worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["RecentResults", "SessionTable", "StoredResult"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class SessionTable(Generic[T]):
    """session id -> state (e.g. a ``DecoderStack`` holding the cloud half of a KV cache).

    Each entry carries a lock; hold it while running a step so two steps of one session
    never interleave. Thread-safe.

    Args:
        max_sessions: entries kept; adding one more evicts the least recently used.
        idle_s: an entry unused this long is dropped at the next ``put``/``get``/``sweep``
            (or sooner: at the expiry given to ``put``).
    """

    def __init__(self, max_sessions: int = 64, idle_s: float = 60.0):
        if max_sessions <= 0 or idle_s <= 0:
            raise ValueError(f"max_sessions and idle_s must be positive, got {max_sessions}, {idle_s}")
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self._items: OrderedDict[str, tuple[T, threading.Lock, float, float]] = OrderedDict()  # state, lock, last use, expiry
        self._lock = threading.Lock()
        self.evicted_total = 0
        self.expired_total = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def put(self, session_id: str, state: T, expires_in_s: float | None = None) -> threading.Lock:
        """Store (or replace) a session; return its step lock. ``expires_in_s``: drop it then, used or not."""
        with self._lock:
            self._sweep(time.monotonic())
            self._items.pop(session_id, None)
            while len(self._items) >= self.max_sessions:
                old, _ = self._items.popitem(last=False)
                self.evicted_total += 1
                log.info(
                    "evicted KV session %s (table full, %d sessions); its next decode step gets session_unknown", old, self.max_sessions
                )
            lock = threading.Lock()
            now = time.monotonic()
            self._items[session_id] = (state, lock, now, now + expires_in_s if expires_in_s is not None else float("inf"))
            return lock

    def get(self, session_id: str) -> tuple[T, threading.Lock] | None:
        with self._lock:
            self._sweep(time.monotonic())
            item = self._items.get(session_id)
            if item is None:
                return None
            self._items[session_id] = (item[0], item[1], time.monotonic(), item[3])
            self._items.move_to_end(session_id)
            return item[0], item[1]

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._items.pop(session_id, None)

    def sweep(self) -> None:
        with self._lock:
            self._sweep(time.monotonic())

    def _sweep(self, now: float) -> None:
        stale = [sid for sid, (_, _, used, expiry) in self._items.items() if now - used > self.idle_s or now > expiry]
        for sid in stale:
            del self._items[sid]
            self.expired_total += 1
            log.debug("KV session %s idle for more than %.0f s or past its request's deadline; dropped", sid, self.idle_s)


@dataclass(frozen=True)
class StoredResult:
    """A result already sent, kept to answer a re-sent job without running it again."""

    response_topic: str
    payload: bytes
    deadline_unix_s: float


class RecentResults:
    """job id -> the result sent for it: jobs are idempotent by id (paho re-sends after reconnects).

    Bounded by entries and by total payload bytes, least recently stored first out. Thread-safe.
    """

    def __init__(self, max_entries: int = 256, max_bytes: int = 64 * 1024 * 1024):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredResult] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, job_id: str) -> StoredResult | None:
        with self._lock:
            return self._items.get(job_id)

    def put(self, job_id: str, result: StoredResult) -> None:
        if len(result.payload) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(job_id, None)
            if old is not None:
                self._bytes -= len(old.payload)
            self._items[job_id] = result
            self._bytes += len(result.payload)
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, gone = self._items.popitem(last=False)
                self._bytes -= len(gone.payload)
