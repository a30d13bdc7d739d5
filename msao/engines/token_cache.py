"""Image-token cache for camera streams: skip the encoder for unchanged frames, re-send only changed tokens.

Owns the edge side (``StreamTokenCache``) and a small cloud-side mirror (``TokenMirror``) of
the versioned token table that the two keep in step; knows nothing of MQTT (the wire format
of a ``TokenDelta`` is cloud_bridge's job). The protocol, also in docs/mas.md:

    edge                                              cloud
    frame 1 ─encode─► tokens v1 ── delta(base 0 → v1, all N rows) ──► table[stream] = v1
    frame 2 (noise only: every patch within skip_threshold) ─► encoder skipped, nothing sent
    frame 3 (shifted) ─encode─► rows whose relative change > change_threshold
                                ── delta(base v1 → v2, K rows) ──► table[stream][rows] = new, v2
    request ─► refers to (stream, v2) and a keep-set; the cloud gathers its own copy

Both sides hold exactly the tokens that were sent ("as-sent" tokens), never the edge's fresh
encoder output, so the edge can compute what the cloud holds bit for bit. Changes are measured
against the last *encoded* frame and the as-sent tokens, so slow drift cannot accumulate
unseen. A delta whose base version is not the cloud's current version is refused
(``StreamError``); the edge then resets and sends a full table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from msao.engines.generation import ImageEncoding
from msao.engines.mas import patch_change, patch_grid, token_change
from msao.errors import ConfigError, StreamError

__all__ = ["CacheStep", "StreamTokenCache", "TokenCacheOptions", "TokenDelta", "TokenMirror"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenCacheOptions:
    """Thresholds of the cache.

    Attributes:
        skip_threshold: the encoder is skipped when every patch's mean absolute pixel change
            against the last encoded frame is at most this (preprocessed pixel units, i.e.
            after CLIP normalisation; 0.1 is about 7 uint8 levels, above sensor noise).
        change_threshold: after encoding, a token is re-sent when ||T - T_sent|| / ||T_sent||
            exceeds this; the others stay as the cloud holds them.
    """

    skip_threshold: float = 0.1
    change_threshold: float = 0.05

    def __post_init__(self) -> None:
        if not (self.skip_threshold >= 0.0 and self.change_threshold >= 0.0):
            raise ConfigError(f"cache thresholds must be >= 0, got skip {self.skip_threshold}, change {self.change_threshold}")


@dataclass(frozen=True)
class TokenDelta:
    """Rows of a stream's token table that changed, from ``base_version`` to ``version``.

    A full table has ``base_version == 0`` and every row. Indices are sorted and unique.
    """

    stream_id: str
    base_version: int
    version: int
    n_tokens: int
    indices: np.ndarray  # int64 (K,)
    tokens: np.ndarray  # float32 (K, D)

    def __post_init__(self) -> None:
        idx, tok = self.indices, self.tokens
        problems = []
        if not self.stream_id:
            problems.append("stream_id is empty")
        if not 0 <= self.base_version < self.version:
            problems.append(f"versions must satisfy 0 <= base < version, got {self.base_version} -> {self.version}")
        if idx.ndim != 1 or idx.dtype != np.int64 or tok.ndim != 2 or tok.dtype != np.float32 or tok.shape[0] != idx.shape[0]:
            problems.append(f"need int64 (K,) indices and float32 (K, D) tokens, got {idx.dtype}{idx.shape}, {tok.dtype}{tok.shape}")
        elif idx.size and (idx[0] < 0 or idx[-1] >= self.n_tokens or np.any(np.diff(idx) <= 0)):
            problems.append(f"indices must be sorted, unique, in [0, {self.n_tokens})")
        if self.base_version == 0 and idx.shape[0] != self.n_tokens:
            problems.append(f"a full table (base 0) must carry all {self.n_tokens} rows, got {idx.shape[0]}")
        if problems:
            raise StreamError(f"token delta for stream {self.stream_id!r}: " + "; ".join(problems))

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data this delta puts on the wire (headers excluded)."""
        return int(self.indices.nbytes + self.tokens.nbytes)


@dataclass(frozen=True)
class CacheStep:
    """What the cache did with one frame.

    Attributes:
        encoding: tokens as the cloud holds them after this frame (use these for MAS and
            prefill), with the fresh MAS features (or the cached ones when skipped).
        skipped_encoder: True when the frame was close enough to the last encoded one.
        delta: rows to send, or None when nothing needs to cross the network.
        max_patch_change: largest per-patch mean absolute pixel change against the last encoded frame.
    """

    encoding: ImageEncoding
    skipped_encoder: bool
    delta: TokenDelta | None
    max_patch_change: float

    @property
    def sent_tokens(self) -> int:
        return 0 if self.delta is None else int(self.delta.indices.shape[0])


class StreamTokenCache:
    """Edge side of one stream: decides per frame whether to encode and which tokens to send.

    Args:
        stream_id: the stream's id on the wire.
        pixels_from_rgb: uint8 (H, W, 3) frame -> float32 (3, h, w) preprocessed pixels.
        encode: preprocessed pixels -> ``ImageEncoding`` (e.g. ``Generator.encode_image``).
        n_tokens: image tokens per frame (the bundle's ``model.image_tokens``).
    """

    def __init__(
        self,
        stream_id: str,
        pixels_from_rgb: Callable[[np.ndarray], np.ndarray],
        encode: Callable[[np.ndarray], ImageEncoding],
        n_tokens: int,
        options: TokenCacheOptions = TokenCacheOptions(),
    ):
        self.stream_id = stream_id
        self._pixels = pixels_from_rgb
        self._encode = encode
        self.n_tokens = n_tokens
        self.options = options
        self.reset()

    @classmethod
    def for_generator(cls, generator, stream_id: str, options: TokenCacheOptions = TokenCacheOptions()) -> StreamTokenCache:
        """A cache that preprocesses and encodes with ``generator`` (a ``Generator``)."""
        from msao.engines.images import pixels_from_image

        pre = generator.bundle.manifest.preprocess
        return cls(stream_id, lambda rgb: pixels_from_image(rgb, pre), generator.encode_image, generator.info.image_tokens, options)

    def reset(self) -> None:
        """Forget the stream; the next frame is encoded and sent in full (a new base)."""
        self.version = 0
        self._frame_shape: tuple[int, ...] | None = None
        self._ref_pixels: np.ndarray | None = None
        self._sent: ImageEncoding | None = None

    def step(self, rgb: np.ndarray) -> CacheStep:
        """Process the next frame of the stream.

        Raises:
            StreamError: the frame's size differs from the stream's previous frame (tokens
                would not correspond); call ``reset()`` to start a new stream at the new size.
        """
        if self._frame_shape is not None and rgb.shape != self._frame_shape:
            raise StreamError(
                f"stream {self.stream_id!r}: frame of shape {rgb.shape}, the stream's previous frame was {self._frame_shape}; "
                "call reset() (or open a new stream) when the camera changes resolution"
            )
        pixels = self._pixels(rgb)  # (3, H, W)
        if self._sent is None or self._ref_pixels is None:
            return self._full(rgb, pixels)
        _, _, patch = patch_grid(self.n_tokens, pixels.shape[1], pixels.shape[2])
        max_change = float(patch_change(pixels, self._ref_pixels, patch).max())
        if max_change <= self.options.skip_threshold:
            cached = ImageEncoding(self._sent.tokens, self._sent.mas_features, 0.0)
            return CacheStep(cached, True, None, max_change)
        fresh = self._encode(pixels)
        self._ref_pixels = pixels
        changed = np.nonzero(token_change(fresh.tokens, self._sent.tokens) > self.options.change_threshold**2)[0].astype(np.int64)
        tokens = self._sent.tokens.copy()
        tokens[changed] = fresh.tokens[changed]  # (N, D): as-sent rows, changed ones replaced
        delta = None
        if changed.size:
            delta = TokenDelta(
                self.stream_id, self.version, self.version + 1, self.n_tokens, changed, fresh.tokens[changed].astype(np.float32)
            )
            self.version += 1
        self._sent = ImageEncoding(tokens, fresh.mas_features, fresh.vision_ms)
        return CacheStep(self._sent, False, delta, max_change)

    def _full(self, rgb: np.ndarray, pixels: np.ndarray) -> CacheStep:
        fresh = self._encode(pixels)
        if fresh.tokens.shape[0] != self.n_tokens:
            raise StreamError(f"encoder gave {fresh.tokens.shape[0]} tokens, the stream expects {self.n_tokens}")
        self._frame_shape = rgb.shape
        self._ref_pixels = pixels
        self._sent = fresh
        self.version = 1
        all_rows = np.arange(self.n_tokens, dtype=np.int64)
        delta = TokenDelta(self.stream_id, 0, self.version, self.n_tokens, all_rows, fresh.tokens.astype(np.float32))
        log.debug("stream %s: full table sent (%d tokens)", self.stream_id, self.n_tokens)
        return CacheStep(fresh, False, delta, float("inf"))


class TokenMirror:
    """Cloud side: the as-sent token table of every stream, updated by deltas."""

    def __init__(self) -> None:
        self._tables: dict[str, tuple[int, np.ndarray]] = {}

    def apply(self, delta: TokenDelta) -> np.ndarray:
        """Apply ``delta``; returns the stream's table (N, D) at ``delta.version``.

        Raises:
            StreamError: the delta's base is not the version held here (a lost or reordered
                delta); the edge must ``reset()`` and send a full table.
        """
        held = self._tables.get(delta.stream_id)
        if delta.base_version == 0:
            self._tables[delta.stream_id] = (delta.version, delta.tokens.copy())
            return self._tables[delta.stream_id][1]
        if held is None or held[0] != delta.base_version:
            have = "nothing" if held is None else f"version {held[0]}"
            raise StreamError(
                f"stream {delta.stream_id!r}: delta from version {delta.base_version} but the cloud holds {have}; "
                "reset the edge cache and send a full table"
            )
        version, table = held
        if table.shape != (delta.n_tokens, delta.tokens.shape[1]):
            raise StreamError(f"stream {delta.stream_id!r}: delta rows of width {delta.tokens.shape[1]} for a table of shape {table.shape}")
        table = table.copy()
        table[delta.indices] = delta.tokens
        self._tables[delta.stream_id] = (delta.version, table)
        return table

    def tokens(self, stream_id: str, version: int) -> np.ndarray:
        """The table of ``stream_id``, which must be at ``version`` (a request names the version it used)."""
        held = self._tables.get(stream_id)
        if held is None or held[0] != version:
            raise StreamError(f"stream {stream_id!r}: version {version} asked, held {'nothing' if held is None else held[0]}")
        return held[1]

    def drop(self, stream_id: str) -> None:
        self._tables.pop(stream_id, None)
