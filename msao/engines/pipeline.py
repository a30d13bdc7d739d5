"""The one request pipeline: decode an image, encode it, pick the keep-set with MAS, generate.

Why it exists: the edge daemon (``LocalModel``), the cloud worker's answer jobs
(``ModelServer``) and ``msao eval`` / ``msao calibrate`` all answer a question about an image
with the same steps. With one copy of them, the accuracy and latency evaluation measures are
those of the code the daemon serves. Knows bundles and segments; knows nothing of MQTT,
scheduling or streams (the stream token cache lives in ``edge_runtime/local_model.py``).

    image bytes ─decode─► RGB (H, W, 3) ─preprocess─► pixels (3, h, w) ─vision_encoder─► tokens (N, D), features (N, Dv)
    tokens, features, question ─keep policy (MAS)─► keep-set (K of N), MAS values
    kept tokens (K, D) + prompt ─decoder (all layers here, or [0:k) here + a tail runner)─► answer

A text-only turn skips the first two lines: ``text_only`` gives an encoding of zero tokens,
no keep policy runs on it (MAS has nothing to score: image necessity 0, keep-set empty), and
the decoder reads the question alone.

Threads: the runners are opened once and shared by every thread (ONNX Runtime sessions may
run concurrently); each thread gets its own ``Generator`` (its KV cache), question embedder
(its row cache) and keep policies, built on its first call. The pipeline owns the runners:
``close`` frees them, after which every step that runs a segment refuses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from msao.engines.backend import Backend, Runner
from msao.engines.bundle import Bundle
from msao.engines.generation import DEFAULT_MAX_NEW_TOKENS, Answer, Generator, ImageEncoding, PromptEncoder, text_only_encoding
from msao.engines.images import MAX_IMAGE_PIXELS, decode_image, pixels_from_image
from msao.engines.keep_policy import KeepDecision, KeepPolicy, keep_policy_from_name
from msao.engines.manifest import LatencyProfile, SegmentSpec
from msao.engines.mas import MasOptions, MasResult
from msao.engines.mas_text import QuestionEmbedder
from msao.engines.profile import profile_bundle
from msao.errors import MsaoError

__all__ = ["Prepared", "RequestPipeline"]


@dataclass(frozen=True)
class Prepared:
    """An image made ready for prefill: its tokens, the keep-set and what MAS said.

    Attributes:
        encoding: image tokens (N, D) and MAS features (N, Dv).
        keep: sorted indices of the kept tokens (None = all N).
        mas: the MAS analysis (None when every token is kept and MAS was not asked for, or the
            keep policy runs no MAS).
        skipped_encoder: the encoder did not run: a stream frame close enough to the previous
            one, or an image whose tokens were cached; the tokens were reused.
        decode_ms / vision_ms / mas_ms: stage times.
        cached: the tokens came from the image cache (an image asked about before).
    """

    encoding: ImageEncoding
    keep: np.ndarray | None
    mas: MasResult | None
    skipped_encoder: bool
    decode_ms: float
    vision_ms: float
    mas_ms: float
    cached: bool = False

    @property
    def kept_tokens(self) -> int:
        return self.encoding.tokens.shape[0] if self.keep is None else int(self.keep.shape[0])

    @property
    def text_only(self) -> bool:
        """No image: zero image tokens, no encoder ran, no keep-set."""
        return self.encoding.tokens.shape[0] == 0

    @property
    def encoder_ran(self) -> bool:
        """The vision encoder ran for this request (what its edge FLOPs count)."""
        return not (self.skipped_encoder or self.text_only)


class _SharedRunners(Backend):
    """Hands out the pipeline's open runners, so the generators of every thread share the sessions."""

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

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._runner.infer(feeds)

    def run_chunk(self, feeds: dict[str, np.ndarray], cache) -> dict[str, np.ndarray]:
        return self._runner.run_chunk(feeds, cache)


class _Lending(_SharedRunners):
    def open(self, bundle: Bundle, spec: SegmentSpec) -> Runner:
        return _Borrowed(self._runners[spec.name])


@dataclass
class _ThreadState:
    """What one thread builds on its first request and reuses after."""

    generator: Generator
    embed: QuestionEmbedder
    policies: dict[float, KeepPolicy] = field(default_factory=dict)  # keep ratio -> the pipeline's policy at that budget


class RequestPipeline:
    """A verified bundle's runners and the steps of one request, safe to share between threads.

    Args:
        bundle: from ``load_bundle``.
        backend: opens one runner per segment, once; the pipeline closes them.
        mas: MAS settings of the keep policy (the keep ratio is chosen per request).
        keep_policy: a name from ``KEEP_POLICIES``; the daemon prunes with ``mas``, ``msao eval``
            may measure the others.
        resident: open the segments (False: the manifest and tokenizer only, for a model that
            runs elsewhere: an edge that names the cloud's model but holds none of its weights;
            every step that would run a segment raises ``MsaoError``).

    Raises:
        ConfigError: unknown keep policy (before any session opens).
    """

    def __init__(self, bundle: Bundle, backend: Backend, mas: MasOptions = MasOptions(), keep_policy: str = "mas", resident: bool = True):
        keep_policy_from_name(keep_policy, mas)  # an unknown name fails here, not at the first request
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.name = bundle.manifest.name
        self.resident = resident
        self.runners: dict[str, Runner] = {s.name: backend.open(bundle, s) for s in bundle.manifest.segments} if resident else {}
        self.prompt_encoder = PromptEncoder(bundle)
        self.backend_description = backend.describe()
        self.mas_options = mas
        self.keep_policy = keep_policy
        self._local = threading.local()
        self._closed = False

    def close(self) -> None:
        """Free the runners (idempotent); every later step that runs a segment raises ``MsaoError``."""
        self._closed = True
        for r in self.runners.values():
            r.close()

    @property
    def n_tokens(self) -> int:
        return self.manifest.model.image_tokens

    def profile(self, repeats: int = 5, warmup: int = 2) -> LatencyProfile:
        """Time every segment on this device now (about a second for the built-ins).

        The bundle's own profile was measured where it was exported; the scheduler needs this
        device's times (a Jetson, a throttled container) before the first request runs.
        """
        self._check_open()
        return profile_bundle(self.bundle, _Lending(self.runners, self.backend_description), repeats=repeats, warmup=warmup)

    def generator(self) -> Generator:
        """This thread's generator (its own KV cache) over the shared runners."""
        return self._thread().generator

    def prompt_ids(self, question: str) -> tuple[np.ndarray, np.ndarray]:
        """The prompt's token ids before and after the image placeholder (no segment runs)."""
        return self.prompt_encoder.ids(question)

    def _check_open(self) -> None:
        if not self.resident:
            raise MsaoError(
                f"model {self.name} is not held on this device (edge.large_on_edge = false): it runs in the cloud only; "
                "set large_on_edge = true to run it here"
            )
        if self._closed:
            raise MsaoError(f"the pipeline of model {self.name} is closed (its runners are freed); open a new one to answer requests")

    def _thread(self) -> _ThreadState:
        self._check_open()
        state: _ThreadState | None = getattr(self._local, "state", None)
        if state is None:
            gen = Generator(self.bundle, _SharedRunners(self.runners))
            state = self._local.state = _ThreadState(gen, QuestionEmbedder(gen))
        return state

    # -- the steps ------------------------------------------------------------------------------

    def decode(self, image: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, float]:
        """RGB uint8 (H, W, 3) and the decode time in ms; ``ImageError`` for anything not an image."""
        t0 = time.perf_counter()
        rgb = decode_image(image, max_pixels=max_pixels)
        return rgb, (time.perf_counter() - t0) * 1e3

    def encode(self, rgb: np.ndarray) -> ImageEncoding:
        """Preprocess RGB uint8 (H, W, 3) and run the vision encoder: tokens (N, D), features (N, Dv)."""
        return self.generator().encode_image(pixels_from_image(rgb, self.manifest.preprocess))

    def decide_keep(self, encoding: ImageEncoding, question: str, keep_ratio: float, *, request_id: int = 0) -> KeepDecision:
        """The keep policy's keep-set (and MAS analysis) for ``encoding`` and ``question``.

        The question is embedded only for policies that read it.

        Args:
            keep_ratio: share of image tokens the policy keeps, in (0, 1].
            request_id: seeds the ``random`` policy, so runs repeat exactly.

        Raises:
            ConfigError: a keep ratio outside (0, 1].
            MasInputError: the question or the tokens cannot be analysed.
        """
        state = self._thread()
        chosen = state.policies.get(keep_ratio)
        if chosen is None:
            chosen = state.policies[keep_ratio] = keep_policy_from_name(self.keep_policy, replace(self.mas_options, keep_ratio=keep_ratio))
        asked = state.embed(question) if chosen.needs_question else None
        return chosen.decide(encoding.tokens, encoding.mas_features, asked, request_id=request_id)

    def text_only(self, decode_ms: float = 0.0) -> Prepared:
        """A turn without an image: zero image tokens, nothing encoded, no keep policy run."""
        return Prepared(text_only_encoding(self.manifest.model.hidden_size), None, None, False, decode_ms, 0.0, 0.0)

    def prepare(
        self, rgb: np.ndarray, question: str, keep_ratio: float = 1.0, *, analyse: bool = True, request_id: int = 0, decode_ms: float = 0.0
    ) -> Prepared:
        """Encode ``rgb`` and pick the keep-set (``prepared_from_encoding``), timing both."""
        self.generator()  # a thread's first call builds its generator: not vision time
        t0 = time.perf_counter()
        encoding = self.encode(rgb)
        vision_ms = (time.perf_counter() - t0) * 1e3
        return self.prepared_from_encoding(
            encoding, question, keep_ratio, analyse=analyse, request_id=request_id, decode_ms=decode_ms, vision_ms=vision_ms
        )

    def prepared_from_encoding(
        self,
        encoding: ImageEncoding,
        question: str,
        keep_ratio: float = 1.0,
        *,
        analyse: bool = True,
        request_id: int = 0,
        skipped_encoder: bool = False,
        decode_ms: float = 0.0,
        vision_ms: float = 0.0,
    ) -> Prepared:
        """Pick the keep-set of an encoded image with the keep policy, timed as ``mas_ms``.

        Args:
            keep_ratio: share of image tokens kept; 1 keeps all N (the policy still runs when ``analyse``).
            analyse: run the policy even at ratio 1 (MAS values go into the daemon's response;
                evaluation reports the policy's cost).
            skipped_encoder / decode_ms / vision_ms: carried into the ``Prepared``.
        """
        keep, mas, mas_ms = None, None, 0.0
        if encoding.tokens.shape[0] and (keep_ratio < 1.0 or analyse):  # zero tokens (text-only): nothing to keep or score
            t0 = time.perf_counter()
            decision = self.decide_keep(encoding, question, keep_ratio, request_id=request_id)
            mas = decision.mas
            if keep_ratio < 1.0:
                keep = decision.keep.indices
            mas_ms = (time.perf_counter() - t0) * 1e3
        return Prepared(encoding, keep, mas, skipped_encoder, decode_ms, vision_ms, mas_ms)

    def answer(
        self,
        prepared: Prepared,
        question: str,
        *,
        keep: np.ndarray | None = None,
        exit_layer: int | None = None,
        tail: tuple[int, Runner] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        signals: bool = False,
    ) -> Answer:
        """Greedy answer from prepared tokens with this thread's generator (``Generator.generate``).

        ``keep`` overrides the prepared keep-set; ``exit_layer`` answers from that exit head; ``tail`` splits;
        ``max_new_tokens`` bounds the answer (the end token included); ``signals`` records what a commit verifier reads.
        """
        keep = prepared.keep if keep is None else keep
        return self.generator().generate(
            prepared.encoding, question, keep=keep, exit_layer=exit_layer, tail=tail, max_new_tokens=max_new_tokens, signals=signals
        )
