"""Image tokens of images asked about before, so a follow-up question skips the vision encoder.

A chat client sends the whole conversation on every turn, the earlier image included; a
camera dashboard asks several questions about one snapshot. The encoder's output depends on
the image alone, so the tokens of an image seen before are taken from here (token
re-hydration) and only the question-dependent steps run again: MAS and its keep-set, prefill
and decode. Keys are the SHA-256 of the image file's bytes, so a re-encoded or resized copy
of a picture is a new image; entries are dropped least recently used first once their tokens
pass the byte budget. Streams have their own cache (``engines/token_cache.py``): a stream
frame changes a little each time, a cached image not at all.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from msao.engines.generation import ImageEncoding
from msao.errors import ConfigError

__all__ = ["ImageTokenCache", "image_key"]


def image_key(image: bytes) -> bytes:
    """The cache key of an image file: its SHA-256 digest (about 2 ms per MB here)."""
    return hashlib.sha256(image).digest()


class ImageTokenCache:
    """LRU of ``ImageEncoding`` by image key, bounded by the bytes of the tokens it holds. Thread-safe.

    Args:
        max_bytes: budget for tokens and MAS features together; 0 disables the cache.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ConfigError(f"image cache size must be >= 0 bytes (0 = off), got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, ImageEncoding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: bytes) -> ImageEncoding | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: bytes, encoding: ImageEncoding) -> None:
        """Keep ``encoding`` (not when it alone is over the budget); older entries go first."""
        size = encoding.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = encoding
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
