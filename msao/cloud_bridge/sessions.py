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


@dataclass
class _Session(Generic[T]):
    state: T
    lock: threading.Lock
    used: float  # time.monotonic() of the last put/get
    expiry: float  # time.monotonic() after which it is dropped, used or not
    nbytes: int  # what its owner said it may hold at most (0 = not counted)


class SessionTable(Generic[T]):
    """session id -> state (e.g. a ``DecoderStack`` holding the cloud half of a KV cache).

    Each entry carries a lock; hold it while running a step so two steps of one session
    never interleave. Thread-safe.

    Args:
        max_sessions: entries kept; adding one more evicts the least recently used.
        idle_s: an entry unused this long is dropped at the next ``put``/``get``/``sweep``
            (or sooner: at the expiry given to ``put``).
        max_bytes: bound on the sum of the entries' declared sizes (``put(nbytes=)``, e.g. a
            speculation session's KV cache at its full budget); adding one evicts the least
            recently used until it fits. None = bounded by count only.
    """

    def __init__(self, max_sessions: int = 64, idle_s: float = 60.0, max_bytes: int | None = None):
        if max_sessions <= 0 or idle_s <= 0 or (max_bytes is not None and max_bytes <= 0):
            raise ValueError(f"max_sessions, idle_s and max_bytes must be positive, got {max_sessions}, {idle_s}, {max_bytes}")
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, _Session[T]] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted_total = 0
        self.expired_total = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        """The sum of the sizes the sessions were declared with."""
        with self._lock:
            return sum(e.nbytes for e in self._items.values())

    def put(self, session_id: str, state: T, expires_in_s: float | None = None, nbytes: int = 0) -> threading.Lock:
        """Store (or replace) a session; return its step lock. ``expires_in_s``: drop it then, used or not.

        Raises:
            ValueError: ``nbytes`` alone is over ``max_bytes`` (nothing is evicted for it).
        """
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise ValueError(f"a session of {nbytes} bytes is over the table's bound of {self.max_bytes} bytes")
        with self._lock:
            self._sweep(time.monotonic())
            self._items.pop(session_id, None)
            held = sum(e.nbytes for e in self._items.values())
            while self._items and (
                len(self._items) >= self.max_sessions or (self.max_bytes is not None and held + nbytes > self.max_bytes)
            ):
                old, entry = self._items.popitem(last=False)
                held -= entry.nbytes
                self.evicted_total += 1
                log.info(
                    "evicted KV session %s (table full: %d sessions at most, %s bytes at most); its next step gets session_unknown",
                    old, self.max_sessions, self.max_bytes,
                )  # fmt: skip
            lock = threading.Lock()
            now = time.monotonic()
            expiry = now + expires_in_s if expires_in_s is not None else float("inf")
            self._items[session_id] = _Session(state, lock, now, expiry, nbytes)
            return lock

    def get(self, session_id: str) -> tuple[T, threading.Lock] | None:
        with self._lock:
            self._sweep(time.monotonic())
            entry = self._items.get(session_id)
            if entry is None:
                return None
            entry.used = time.monotonic()
            self._items.move_to_end(session_id)
            return entry.state, entry.lock

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._items.pop(session_id, None)

    def sweep(self) -> None:
        with self._lock:
            self._sweep(time.monotonic())

    def _sweep(self, now: float) -> None:
        stale = [sid for sid, e in self._items.items() if now - e.used > self.idle_s or now > e.expiry]
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
