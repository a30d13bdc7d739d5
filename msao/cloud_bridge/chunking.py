"""Chunking of payloads larger than the broker's Maximum Packet Size, and bounded reassembly.

Knows bytes and limits, not MQTT: the client decides the chunk size from the broker's
CONNACK and carries each ``ChunkHeader`` in a user property (``msao-chunk``). Every chunk is
a normal message on the same topic with the same properties, so a broker never sees a packet
above its limit (an oversize packet makes Mosquitto 2.1 / EMQX disconnect the client, and
paho then re-sends it forever).

    payload (total bytes) ──► [0, c) [c, 2c) ... [(n-1)c, total)     c = chunk_bytes
    header "<message_id>:<index>:<count>:<total>:<c>"  on every chunk

Reassembly is bounded three ways: bytes per message (checked before allocating), messages
being reassembled at once, and time since a message's first chunk (stale ones are dropped
with a warning). Duplicate chunks (QoS 1 re-sends) are ignored, also after their message completed.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from msao.errors import CodecError, PayloadTooLarge

__all__ = ["CHUNK_PROPERTY", "ChunkHeader", "Reassembler", "split_payload"]

log = logging.getLogger(__name__)

CHUNK_PROPERTY = "msao-chunk"
MAX_CHUNKS = 65536
_HEADER = re.compile(r"^([A-Za-z0-9_-]{1,64}):(\d{1,5}):(\d{1,5}):(\d{1,12}):(\d{1,10})\Z")


@dataclass(frozen=True)
class ChunkHeader:
    """Where one chunk sits in its message."""

    message_id: str
    index: int
    count: int
    total_bytes: int
    chunk_bytes: int

    def __post_init__(self) -> None:
        if not (0 <= self.index < self.count <= MAX_CHUNKS) or self.chunk_bytes <= 0 or self.total_bytes < 0:
            raise CodecError(f"chunk header {self.to_property()!r}: index/count/sizes out of range")
        if self.count != max(1, -(-self.total_bytes // self.chunk_bytes)):
            raise CodecError(
                f"chunk header {self.to_property()!r}: {self.count} chunks cannot hold {self.total_bytes} bytes in {self.chunk_bytes}-byte chunks"
            )

    @property
    def begin(self) -> int:
        return self.index * self.chunk_bytes

    @property
    def size(self) -> int:
        return max(0, min(self.chunk_bytes, self.total_bytes - self.begin))

    def to_property(self) -> str:
        return f"{self.message_id}:{self.index}:{self.count}:{self.total_bytes}:{self.chunk_bytes}"

    @classmethod
    def from_property(cls, value: str) -> ChunkHeader:
        m = _HEADER.match(value)
        if not m:
            raise CodecError(f"chunk property {value[:80]!r} is not '<id>:<index>:<count>:<total>:<chunk_bytes>'")
        return cls(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5)))


def split_payload(payload: bytes, chunk_bytes: int, message_id: str) -> Iterator[tuple[ChunkHeader, memoryview]]:
    """Yield (header, bytes) for each chunk of ``payload``, in order, without copying."""
    if chunk_bytes <= 0:
        raise PayloadTooLarge(
            f"no room for payload bytes in a packet (chunk size {chunk_bytes}); the broker's maximum packet size is too small"
        )
    count = max(1, -(-len(payload) // chunk_bytes))
    if count > MAX_CHUNKS:
        raise PayloadTooLarge(
            f"{len(payload)} bytes would need {count} chunks of {chunk_bytes} bytes, over {MAX_CHUNKS}; raise the broker's max_packet_size"
        )
    view = memoryview(payload)
    for i in range(count):
        yield ChunkHeader(message_id, i, count, len(payload), chunk_bytes), view[i * chunk_bytes : (i + 1) * chunk_bytes]


@dataclass
class _Partial:
    header: ChunkHeader
    buffer: bytearray
    seen: set[int] = field(default_factory=set)
    started: float = 0.0


class Reassembler:
    """Collects chunks into whole messages. Not thread-safe: call it from one thread (the MQTT loop).

    Args:
        max_message_bytes: largest message accepted (checked from the first chunk's header).
        max_partial_messages: messages being reassembled at once; a new one beyond this is refused.
        max_buffered_bytes: bytes held in partial messages at once.
        timeout_s: a message not complete this long after its first chunk is dropped.
    """

    def __init__(
        self, max_message_bytes: int, max_partial_messages: int = 16, max_buffered_bytes: int | None = None, timeout_s: float = 30.0
    ):
        self.max_message_bytes = max_message_bytes
        self.max_partial_messages = max_partial_messages
        self.max_buffered_bytes = max_buffered_bytes if max_buffered_bytes is not None else 4 * max_message_bytes
        self.timeout_s = timeout_s
        self._partials: dict[tuple[str, str], _Partial] = {}
        self._completed: deque[tuple[str, str]] = deque(maxlen=256)  # late QoS 1 duplicates of finished messages
        self.dropped_total = 0

    @property
    def buffered_bytes(self) -> int:
        return sum(len(p.buffer) for p in self._partials.values())

    def __len__(self) -> int:
        return len(self._partials)

    def add(self, key: str, header: ChunkHeader, data: bytes | memoryview, now: float | None = None) -> bytearray | None:
        """Add one chunk; return the whole message when this chunk completes it, else None.

        Args:
            key: where the chunks come from (the topic); ids are only unique per key.

        Raises:
            PayloadTooLarge: the message, or all partial messages together, would exceed the limits.
            CodecError: the chunk's size or header disagrees with the message's first chunk.
        """
        now = time.monotonic() if now is None else now
        self.expire(now)
        if header.total_bytes > self.max_message_bytes:
            raise PayloadTooLarge(
                f"chunked message {header.message_id} announces {header.total_bytes} bytes, over the limit {self.max_message_bytes}"
            )
        if len(data) != header.size:
            raise CodecError(
                f"chunk {header.index}/{header.count} of {header.message_id} has {len(data)} bytes, its header says {header.size}"
            )
        slot = (key, header.message_id)
        part = self._partials.get(slot)
        if part is None:
            if header.count == 1:
                return bytearray(data)
            if slot in self._completed:
                return None
            if len(self._partials) >= self.max_partial_messages:
                raise PayloadTooLarge(
                    f"{len(self._partials)} chunked messages already in reassembly (limit {self.max_partial_messages}); dropping {header.message_id}"
                )
            if self.buffered_bytes + header.total_bytes > self.max_buffered_bytes:
                raise PayloadTooLarge(
                    f"reassembly buffers would hold {self.buffered_bytes + header.total_bytes} bytes (limit {self.max_buffered_bytes}); dropping {header.message_id}"
                )
            part = self._partials[slot] = _Partial(header, bytearray(header.total_bytes), started=now)
        elif (part.header.count, part.header.total_bytes, part.header.chunk_bytes) != (
            header.count,
            header.total_bytes,
            header.chunk_bytes,
        ):
            raise CodecError(f"chunk {header.to_property()!r} disagrees with the first chunk {part.header.to_property()!r} of its message")
        if header.index in part.seen:
            return None
        part.buffer[header.begin : header.begin + header.size] = data
        part.seen.add(header.index)
        if len(part.seen) < header.count:
            return None
        del self._partials[slot]
        self._completed.append(slot)
        return part.buffer

    def expire(self, now: float | None = None) -> list[str]:
        """Drop messages whose first chunk is older than ``timeout_s``; return their ids."""
        now = time.monotonic() if now is None else now
        stale = [slot for slot, p in self._partials.items() if now - p.started > self.timeout_s]
        for slot in stale:
            p = self._partials.pop(slot)
            self.dropped_total += 1
            log.warning(
                "dropped chunked message %s on %s: %d of %d chunks after %.1f s (sender gone or chunks lost)",
                p.header.message_id, slot[0], len(p.seen), p.header.count, now - p.started,
            )  # fmt: skip
        return [s[1] for s in stale]
