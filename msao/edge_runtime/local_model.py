"""One bundle as the edge runs it: the request pipeline plus the stream token cache.

The daemon holds one ``LocalModel`` per bundle (the small edge model, and the large model whose
first layers a split plan runs here). The steps of a request — decode, encode, MAS, generate —
are ``msao.engines.pipeline.RequestPipeline``'s, shared with the cloud worker and ``msao eval``;
this class adds what only the edge does: reuse a stream's image tokens when the frame did not
change, reuse the tokens of an image asked about before (``image_cache.py``), and warm-up /
timing requests on a blank image. Calibration (``calibration.py``) runs
requests through this same class, so the thresholds it measures are those of the path the
daemon serves.

    image bytes ─decode─► RGB ─vision_encoder (or stream / image cache)─► tokens (N, D), features (N, Dv)
    tokens, features, question embeddings ─MAS─► keep-set (K of N), MAS values
    kept tokens + prompt ─decoder (local, or [0:k) here + remote tail)─► answer
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import replace

import numpy as np

from msao.edge_runtime.image_cache import ImageTokenCache
from msao.engines.backend import Backend
from msao.engines.bundle import Bundle
from msao.engines.generation import Generator
from msao.engines.mas import MasOptions
from msao.engines.pipeline import Prepared, RequestPipeline
from msao.engines.token_cache import StreamTokenCache, TokenCacheOptions
from msao.errors import StreamError

__all__ = ["LocalModel"]

log = logging.getLogger(__name__)

_WARM_QUESTION = "what color is the shape?"


class LocalModel(RequestPipeline):
    """A verified bundle on this device, shared by the daemon's worker threads.

    Args:
        bundle: from ``load_bundle``.
        backend: opens one runner per segment, once.
        mas: MAS settings (the keep ratio is chosen per request).
        cache: stream token cache thresholds.
        max_streams: streams whose tokens are kept (least recently used dropped first).
        image_cache_bytes: budget of the image cache (tokens of images asked about before);
            0 turns it off.
        resident: open its segments here (``RequestPipeline``); False for the large model of an
            edge that holds only the edge model (``edge.large_on_edge = false``).
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        mas: MasOptions = MasOptions(),
        cache: TokenCacheOptions = TokenCacheOptions(),
        max_streams: int = 64,
        image_cache_bytes: int = 64 << 20,
        resident: bool = True,
    ):
        super().__init__(bundle, backend, mas, resident=resident)
        self.cache_options = cache
        self.max_streams = max_streams
        self._streams: OrderedDict[str, tuple[threading.Lock, StreamTokenCache]] = OrderedDict()
        self._streams_lock = threading.Lock()
        self.images = ImageTokenCache(image_cache_bytes)

    def warm_up(self) -> None:
        """Run one request on a blank image in this thread, so the first real one pays no first-call costs."""
        rgb, _ = self.decode(self._blank_png(), 1 << 30)
        self.answer(self.prepare(rgb, _WARM_QUESTION, 0.5), _WARM_QUESTION)

    def timed_request(self) -> float:
        """Milliseconds of one whole local request (encoder + prefill + decode, every token kept) on a blank image."""
        rgb, _ = self.decode(self._blank_png(), 1 << 30)
        t0 = time.perf_counter()
        self.answer(self.prepare(rgb, _WARM_QUESTION, 1.0, analyse=False), _WARM_QUESTION)
        return (time.perf_counter() - t0) * 1e3

    def _blank_png(self) -> bytes:
        from PIL import Image

        h, w = self.manifest.preprocess.crop_height, self.manifest.preprocess.crop_width
        png = io.BytesIO()
        Image.new("RGB", (w, h), (128, 128, 128)).save(png, format="PNG")
        return png.getvalue()

    def prepare(
        self,
        rgb: np.ndarray,
        question: str,
        keep_ratio: float = 1.0,
        *,
        analyse: bool = True,
        request_id: int = 0,
        decode_ms: float = 0.0,
        stream_id: str | None = None,
        image_key: bytes | None = None,
    ) -> Prepared:
        """Encode ``rgb`` (or reuse the stream's or the image cache's tokens) and pick the keep-set with MAS.

        Args:
            keep_ratio: share of image tokens kept (1 = all; MAS still runs when ``analyse``).
            analyse: run MAS even at ratio 1 (its values go into the response).
            stream_id: reuse this stream's tokens when the frame did not change.
            image_key: ``image_key(file bytes)`` of a still image: its tokens are cached and
                reused when the same image comes again (a stream frame uses the stream's cache).
        """
        if stream_id is None:
            if image_key is None or not self.images.max_bytes:
                return super().prepare(rgb, question, keep_ratio, analyse=analyse, request_id=request_id, decode_ms=decode_ms)
            t0 = time.perf_counter()
            encoding = self.images.get(image_key)
            cached = encoding is not None
            if encoding is None:
                encoding = self.encode(rgb)
                self.images.put(image_key, encoding)
            vision_ms = (time.perf_counter() - t0) * 1e3
            p = self.prepared_from_encoding(
                encoding, question, keep_ratio, analyse=analyse, request_id=request_id,
                skipped_encoder=cached, decode_ms=decode_ms, vision_ms=vision_ms,
            )  # fmt: skip
            return replace(p, cached=cached)
        gen = self.generator()
        t0 = time.perf_counter()
        lock, cache = self._stream(stream_id, gen)
        with lock:
            try:
                step = cache.step(rgb)
            except StreamError as exc:  # the camera changed resolution: the stream starts again
                log.warning("stream %s: %s; starting the stream again", stream_id, exc)
                cache.reset()
                step = cache.step(rgb)
        vision_ms = (time.perf_counter() - t0) * 1e3
        return self.prepared_from_encoding(
            step.encoding, question, keep_ratio, analyse=analyse, request_id=request_id,
            skipped_encoder=step.skipped_encoder, decode_ms=decode_ms, vision_ms=vision_ms,
        )  # fmt: skip

    def _stream(self, stream_id: str, gen: Generator) -> tuple[threading.Lock, StreamTokenCache]:
        with self._streams_lock:
            found = self._streams.get(stream_id)
            if found is None:
                found = (threading.Lock(), StreamTokenCache.for_generator(gen, stream_id, self.cache_options))
                self._streams[stream_id] = found
                while len(self._streams) > self.max_streams:
                    self._streams.popitem(last=False)
            self._streams.move_to_end(stream_id)
            return found
