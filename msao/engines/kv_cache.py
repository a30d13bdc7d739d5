"""One decoder chunk's KV cache in preallocated host buffers: append, mask, grow, truncate.

Why: a chunk that returned its whole present cache made every decode step copy every past key
and value once inside the graph and allocate a new cache outside it, so a step cost grew with
the context, not only its attention. Bundles of format 3 return only the new tokens' key and
value (``DecoderChunk``); this cache writes them into buffers sized once per request (the
prompt plus the answer budget) and hands the runner the whole buffer as the past, the unused
slots hidden by the attention mask, so a step copies only its own T new slots.

    past_key_i  (B, Hkv, capacity, d)  slots [0, length) hold the sequence, the rest are masked
    key mask    (B, S + T)             S = capacity, or 0 while the cache is empty (prefill reads no buffer)

Growing past the capacity reallocates at twice the size (a split session on the cloud does not
know its length in advance); ``truncate`` drops the last slots (a rejected speculative block).
Bundles of format 1 and 2 return ``present_*`` (the whole cache): ``replace`` keeps those
working, without the saving.
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["KvCache"]

_EPOCHS = itertools.count(1)


class KvCache:
    """Key/value buffers of the layers of one decoder chunk, for one batch of sequences.

    Args:
        names: the chunk's ``past_*`` input names (``past_key_3``, ``past_value_3``, …).
        batch / kv_heads / head_dim: the buffer geometry (B, Hkv, ·, d).
    """

    def __init__(self, names: list[str], batch: int, kv_heads: int, head_dim: int):
        if not names or not all(n.startswith("past_") for n in names):
            raise ValueError(f"a KV cache holds past_* inputs, got {names}")
        self.names = tuple(names)
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.length = 0
        self._whole = False  # holds a format 1/2 chunk's present_* outputs
        self.epoch = next(_EPOCHS)  # new buffers, new epoch: a device copy of an older epoch is stale (``TrtRunner``)
        self._buffers = {n: self._alloc(0) for n in self.names}

    def _alloc(self, capacity: int) -> np.ndarray:
        return np.zeros((self.batch, self.kv_heads, capacity, self.head_dim), np.float32)  # zero pages: free until written

    @property
    def capacity(self) -> int:
        return self._buffers[self.names[0]].shape[2]

    @property
    def whole(self) -> bool:
        """Holds the ``present_*`` outputs of a format 1/2 chunk (the whole cache per call)."""
        return self._whole

    def buffer(self, name: str) -> np.ndarray:
        """The buffer behind past input ``name`` (B, Hkv, capacity, d); slots from ``length`` on are unused."""
        return self._buffers[name]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers.values())

    def reserve(self, total: int) -> None:
        """Make room for ``total`` slots; a too-small buffer grows to max(total, 2 × capacity), keeping its slots."""
        if total <= self.capacity:
            return
        grown = max(total, 2 * self.capacity)
        for n, old in self._buffers.items():
            new = self._alloc(grown)
            new[:, :, : self.length] = old[:, :, : self.length]
            self._buffers[n] = new
        self.epoch = next(_EPOCHS)

    def past_feeds(self) -> dict[str, np.ndarray]:
        """The past inputs of the next call: the whole buffers, or empty ones while nothing is cached."""
        if self.length == 0:
            return {n: b[:, :, :0] for n, b in self._buffers.items()}
        return dict(self._buffers)

    def key_mask(self, attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
        """The chunk's 0/1 key mask (B, S + T) from the caller's mask over the sequence (B, length + T)."""
        if attention_mask.shape != (self.batch, self.length + new_tokens):
            raise ValueError(f"attention_mask {attention_mask.shape}: the cache holds {self.length} slots and {new_tokens} come")
        if self.length == 0:
            return attention_mask
        mask = np.zeros((self.batch, self.capacity + new_tokens), attention_mask.dtype)
        mask[:, : self.length] = attention_mask[:, : self.length]
        mask[:, self.capacity :] = attention_mask[:, self.length :]
        return mask

    def append(self, new_kv: dict[str, np.ndarray], new_tokens: int) -> None:
        """Write the chunk's ``new_*`` outputs (B, Hkv, T, d) into slots [length, length + T)."""
        self.reserve(self.length + new_tokens)
        end = self.length + new_tokens
        for n in self.names:
            self._buffers[n][:, :, self.length : end] = new_kv["new_" + n[len("past_") :]]
        self.length = end

    def replace(self, present: dict[str, np.ndarray]) -> None:
        """Format 1/2 chunks: their ``present_*`` outputs are the whole cache; hold them as full buffers."""
        for n in self.names:
            self._buffers[n] = present["present_" + n[len("past_") :]]
        self.length = self.capacity
        self._whole = True
        self.epoch = next(_EPOCHS)

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (their contents stay, masked out until overwritten)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        if self._whole and length < self.length:
            raise ValueError("a format 1/2 chunk returns its whole cache and cannot drop slots; re-export the bundle (format 3)")
        self.length = length
