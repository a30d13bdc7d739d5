"""One bundle as the edge runs it: decode, encode (or reuse a stream's tokens), MAS, generate.

The daemon holds one ``LocalModel`` per bundle (the small edge model, and the large model whose
first layers a split plan runs here). Runners (ONNX Runtime sessions) are opened once and
shared by every worker thread; each thread gets its own ``Generator`` (KV cache) and question
embedder. Calibration (``calibration.py``) runs requests through this same class, so the
thresholds it measures are those of the path the daemon serves.

    image bytes ─decode─► RGB ─preprocess─► pixels ─vision_encoder (or stream cache)─► tokens (N, D), features (N, Dv)
    tokens, features, question embeddings ─MAS─► keep-set (K of N), MAS values
    kept tokens + prompt ─decoder (local, or [0:k) here + remote tail)─► answer
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from msao.engines.backend import Backend, Runner
from msao.engines.bundle import Bundle
from msao.engines.generation import Answer, Generator, ImageEncoding
from msao.engines.images import decode_image, pixels_from_image
from msao.engines.keep_policy import KeepPolicy, keep_policy_from_name
from msao.engines.manifest import LatencyProfile, SegmentSpec
from msao.engines.mas import MasOptions, MasResult
from msao.engines.mas_text import QuestionEmbedder
from msao.engines.profile import profile_bundle
from msao.engines.token_cache import StreamTokenCache, TokenCacheOptions
from msao.errors import StreamError

__all__ = ["LocalModel", "Prepared"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """An image made ready for prefill: its tokens, the keep-set and what MAS said.

    Attributes:
        encoding: image tokens (N, D) and MAS features (N, Dv).
        keep: sorted indices of the kept tokens (None = all N).
        mas: the MAS analysis (None when every token is kept and MAS was not asked for).
        skipped_encoder: a stream frame close enough to the previous one: tokens reused.
        decode_ms / vision_ms / mas_ms: stage times.
    """

    encoding: ImageEncoding
    keep: np.ndarray | None
    mas: MasResult | None
    skipped_encoder: bool
    decode_ms: float
    vision_ms: float
    mas_ms: float

    @property
    def kept_tokens(self) -> int:
        return self.encoding.tokens.shape[0] if self.keep is None else int(self.keep.shape[0])


class _SharedRunners(Backend):
    """Hands out the model's open runners (generators of every thread share the sessions)."""

    name = "shared"

    def __init__(self, runners: Mapping[str, Runner], describe: str = "shared"):
        self._runners = runners
        self._describe = describe

    def open(self, bundle: Bundle, spec: SegmentSpec) -> Runner:
        return self._runners[spec.name]

    def describe(self) -> str:
        return self._describe


class _Borrowed(Runner):
    """A shared runner lent to code that closes what it opens (the profiler): closing it is a no-op."""

    def __init__(self, runner: Runner):
        super().__init__(runner.spec)
        self._runner = runner

    def _infer(self, feeds):
        return self._runner.infer(feeds)


class _Lending(_SharedRunners):
    def open(self, bundle: Bundle, spec: SegmentSpec) -> Runner:
        return _Borrowed(self._runners[spec.name])


class LocalModel:
    """A verified bundle on this device, shared by the daemon's worker threads.

    Args:
        bundle: from ``load_bundle``.
        backend: opens one runner per segment, once.
        mas: MAS settings (the keep ratio is chosen per request).
        cache: stream token cache thresholds.
        max_streams: streams whose tokens are kept (least recently used dropped first).
    """

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        mas: MasOptions = MasOptions(),
        cache: TokenCacheOptions = TokenCacheOptions(),
        max_streams: int = 64,
    ):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.name = bundle.manifest.name
        self.runners: dict[str, Runner] = {s.name: backend.open(bundle, s) for s in bundle.manifest.segments}
        self.backend_description = backend.describe()
        self.mas_options = mas
        self.cache_options = cache
        self.max_streams = max_streams
        self._local = threading.local()
        self._streams: OrderedDict[str, tuple[threading.Lock, StreamTokenCache]] = OrderedDict()
        self._streams_lock = threading.Lock()

    def close(self) -> None:
        for r in self.runners.values():
            r.close()

    def profile(self, repeats: int = 5, warmup: int = 2) -> LatencyProfile:
        """Time every segment on this device now (about a second for the built-ins).

        The bundle's own profile was measured where it was exported; the scheduler needs this
        device's times (a Jetson, a throttled container) before the first request runs.
        """
        return profile_bundle(self.bundle, _Lending(self.runners, self.backend_description), repeats=repeats, warmup=warmup)

    @property
    def n_tokens(self) -> int:
        return self.manifest.model.image_tokens

    def generator(self) -> Generator:
        """This thread's generator (its own KV cache) over the shared runners."""
        gen = getattr(self._local, "generator", None)
        if gen is None:
            gen = self._local.generator = Generator(self.bundle, _SharedRunners(self.runners))
            self._local.embed = QuestionEmbedder(gen)
            self._local.policies = {}
        return gen

    def warm_up(self) -> None:
        """Run one request on a blank image in this thread, so the first real one pays no first-call costs."""
        rgb, _ = self.decode(self._blank_png(), 1 << 30)
        self.answer(self.prepare(rgb, "what color is the shape?", 0.5), "what color is the shape?")

    def timed_request(self) -> float:
        """Milliseconds of one whole local request (encoder + prefill + decode, every token kept) on a blank image."""
        rgb, _ = self.decode(self._blank_png(), 1 << 30)
        t0 = time.perf_counter()
        self.answer(self.prepare(rgb, "what color is the shape?", 1.0, analyse=False), "what color is the shape?")
        return (time.perf_counter() - t0) * 1e3

    def _blank_png(self) -> bytes:
        import io

        from PIL import Image

        h, w = self.manifest.preprocess.crop_height, self.manifest.preprocess.crop_width
        png = io.BytesIO()
        Image.new("RGB", (w, h), (128, 128, 128)).save(png, format="PNG")
        return png.getvalue()

    def _policy(self, keep_ratio: float) -> KeepPolicy:
        self.generator()
        policies: dict[float, KeepPolicy] = self._local.policies
        if keep_ratio not in policies:
            from dataclasses import replace

            policies[keep_ratio] = keep_policy_from_name("mas", replace(self.mas_options, keep_ratio=keep_ratio))
        return policies[keep_ratio]

    def decode(self, image: bytes, max_pixels: int) -> tuple[np.ndarray, float]:
        """RGB uint8 (H, W, 3) and the decode time; ``ImageError`` for anything not an image."""
        t0 = time.perf_counter()
        rgb = decode_image(image, max_pixels=max_pixels)
        return rgb, (time.perf_counter() - t0) * 1e3

    def prepare(
        self,
        rgb: np.ndarray,
        question: str,
        keep_ratio: float = 1.0,
        *,
        stream_id: str | None = None,
        analyse: bool = True,
        decode_ms: float = 0.0,
    ) -> Prepared:
        """Encode ``rgb`` (or reuse the stream's tokens) and pick the keep-set with MAS.

        Args:
            keep_ratio: share of image tokens kept (1 = all; MAS still runs when ``analyse``).
            stream_id: reuse this stream's tokens when the frame did not change.
            analyse: run MAS even at ratio 1 (its values go into the response).
        """
        gen = self.generator()
        t0 = time.perf_counter()
        skipped = False
        if stream_id is None:
            enc = gen.encode_image(pixels_from_image(rgb, self.manifest.preprocess))
        else:
            lock, cache = self._stream(stream_id, gen)
            with lock:
                try:
                    step = cache.step(rgb)
                except StreamError as exc:  # the camera changed resolution: the stream starts again
                    log.warning("stream %s: %s; starting the stream again", stream_id, exc)
                    cache.reset()
                    step = cache.step(rgb)
            enc, skipped = step.encoding, step.skipped_encoder
        vision_ms = (time.perf_counter() - t0) * 1e3
        keep, mas, mas_ms = None, None, 0.0
        if keep_ratio < 1.0 or analyse:
            t0 = time.perf_counter()
            decision = self._policy(keep_ratio).decide(enc.tokens, enc.mas_features, self._local.embed(question))
            mas = decision.mas
            if keep_ratio < 1.0:
                keep = decision.keep.indices
            mas_ms = (time.perf_counter() - t0) * 1e3
        return Prepared(enc, keep, mas, skipped, decode_ms, vision_ms, mas_ms)

    def answer(
        self, prepared: Prepared, question: str, *, keep: np.ndarray | None = None, tail: tuple[int, Runner] | None = None
    ) -> Answer:
        """Greedy answer from prepared tokens; ``keep`` overrides the prepared keep-set; ``tail`` splits."""
        return self.generator().generate(prepared.encoding, question, keep=prepared.keep if keep is None else keep, tail=tail)

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
