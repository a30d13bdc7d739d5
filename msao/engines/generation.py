"""Greedy generation over bundle segments on any backend: prefill + KV-cached decode.

Knows nothing of MQTT or placement. The pieces are separable on purpose — ``DecoderStack``
runs any contiguous range of decoder chunks and keeps that range's KV cache — so that a split
plan can run layers [0:k) here and [k:L) elsewhere with the same code.

    question ─tokenize─► prefix ids | <image> | suffix ids
    pixels ─vision_encoder─► image tokens (N, D) ─keep-set─► (K, D), original positions kept
    [embed(prefix), kept tokens, embed(suffix)] ─decoder[0:L]─► hidden ─lm_head─► next token

A text-only turn is an image of zero tokens (``text_only_encoding``): the prompt is the prefix
and suffix with nothing between them, and the same code path answers it.

The answer budget is counted in generated tokens, the end token included: with a budget of
``n`` an answer has at most ``n`` answer tokens, and ``finish_reason`` says why it ended
(``stop``: the model's end token; ``length``: the budget or the model's context ran out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from msao.engines.backend import Backend, Runner
from msao.engines.bundle import Bundle
from msao.engines.images import decode_image, pixels_from_image
from msao.engines.kv_cache import KvCache
from msao.engines.manifest import exit_segment_name
from msao.engines.positions import decode_positions, prefill_positions
from msao.errors import FeedError, MsaoError

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "FINISH_REASONS",
    "MAX_NEW_TOKENS",
    "Answer",
    "DecoderStack",
    "DraftSignals",
    "Generator",
    "ImageEncoding",
    "PromptEncoder",
    "StageTimings",
    "finish_reason_from_ids",
    "softmax",
    "text_only_encoding",
]

DEFAULT_MAX_NEW_TOKENS = 16  # the answer budget when a request names none (edge, cloud jobs, eval)
MAX_NEW_TOKENS = 1024  # the largest budget a request or a cloud job may ask for
FINISH_REASONS = ("stop", "length")  # the model ended the answer / the budget (or the context) ran out


@dataclass(frozen=True)
class StageTimings:
    """Wall time per stage of one request, in milliseconds."""

    vision_ms: float = 0.0
    embed_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class ImageEncoding:
    """Output of the vision encoder for one image.

    Attributes:
        tokens: float32 (N, D) projected image tokens, what the decoder reads.
        mas_features: float32 (N, Dv) early vision features, what the MAS probe reads.
        vision_ms: encoder wall time.
    """

    tokens: np.ndarray
    mas_features: np.ndarray
    vision_ms: float

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + self.mas_features.nbytes)


def text_only_encoding(hidden_size: int) -> ImageEncoding:
    """No image: zero tokens (0, D), so the prompt is the question alone and no encoder runs."""
    return ImageEncoding(np.zeros((0, hidden_size), np.float32), np.zeros((0, 0), np.float32), 0.0)


def finish_reason_from_ids(token_ids: tuple[int, ...] | list[int], eos_token_ids) -> str:
    """``stop`` when the last generated token is an end token, else ``length`` (the budget ran out)."""
    return "stop" if token_ids and token_ids[-1] in set(eos_token_ids) else "length"


@dataclass(frozen=True)
class DraftSignals:
    """What a commit verifier reads about an answer besides its tokens: signals every VLM has.

    Attributes:
        token_margins: per generated token, the head's top-1 minus top-2 probability.
        token_entropies: per generated token, the head's entropy over the vocabulary divided
            by log(vocabulary size) (0 = certain, 1 = uniform).
        exit_probs: per exit head at a chunk boundary below the answering depth (layer, its
            probability of the first answer token, whether its own top token is that token),
            read from the prefill's last position: cheap early opinions of the same model.
        final_hidden: the last layer's hidden state at the prefill's last position (D,), the
            input of a linear probe.
    """

    token_margins: tuple[float, ...]
    token_entropies: tuple[float, ...]
    exit_probs: tuple[tuple[int, float, bool], ...]
    final_hidden: np.ndarray = field(repr=False)


def _margin_and_entropy(probs: np.ndarray) -> tuple[float, float]:
    top2 = np.partition(probs, -2)[-2:] if probs.shape[0] > 1 else np.asarray([0.0, probs[0]])
    p = probs[probs > 0]
    return float(top2[1] - top2[0]), float(-(p * np.log(p)).sum() / np.log(max(2, probs.shape[0])))


@dataclass(frozen=True)
class Answer:
    """A generated answer.

    Attributes:
        confidence: the lowest per-token probability among generated tokens (EOS included);
            a single unsure token makes the answer unsure.
        exit_layer: decoder layer whose exit head produced the tokens; None = full depth.
        kept_tokens: image tokens that entered prefill (0 for a text-only turn).
        text_tokens: prompt tokens other than image tokens.
        finish_reason: ``stop`` (the model's end token) or ``length`` (the budget or the
            model's context ran out first).
        signals: what a commit verifier reads (``generate(signals=True)``), else None.
    """

    text: str
    token_ids: tuple[int, ...]
    token_probs: tuple[float, ...]
    confidence: float
    exit_layer: int | None
    kept_tokens: int
    text_tokens: int
    timings: StageTimings = field(default_factory=StageTimings)
    finish_reason: str = "stop"
    signals: DraftSignals | None = None

    @property
    def prompt_tokens(self) -> int:
        """Tokens the prefill processed: the prompt's text and the kept image tokens."""
        return self.kept_tokens + self.text_tokens

    @property
    def completion_tokens(self) -> int:
        """Answer tokens generated, the end token not counted."""
        return len(self.token_ids) - (self.finish_reason == "stop")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class DecoderStack:
    """Decoder chunks covering layers [start, end) and their KV cache for one sequence batch.

    Each chunk's cache is a ``KvCache`` of preallocated buffers; ``reset(capacity=…)`` sizes
    them for a whole request at once (they grow if a sequence runs past it).
    """

    def __init__(self, runners: list[Runner], num_kv_heads: int, head_dim: int):
        if not runners:
            raise ValueError("a decoder stack needs at least one chunk")
        self.runners = runners
        self.start = runners[0].spec.layers[0]  # type: ignore[index]
        self.end = runners[-1].spec.layers[1]  # type: ignore[index]
        self.kv_shape = (num_kv_heads, head_dim)
        self.caches: list[KvCache] = []

    def reset(self, batch: int = 1, capacity: int = 0) -> None:
        """Forget the sequence; room for ``capacity`` tokens (prompt + answer budget) up front."""
        self.caches = []
        for r in self.runners:
            cache = KvCache([t.name for t in r.spec.inputs if t.name.startswith("past_")], batch, *self.kv_shape)
            cache.reserve(capacity)
            self.caches.append(cache)

    @property
    def past_length(self) -> int:
        return self.caches[0].length if self.caches else 0

    def truncate(self, length: int) -> None:
        """Drop every cached token from ``length`` on (e.g. drafted tokens a verifier rejected)."""
        for cache in self.caches:
            cache.truncate(length)

    def run(
        self, hidden: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray, taps: dict[int, np.ndarray] | None = None
    ) -> np.ndarray:
        """hidden (B, T, D) at ``position_ids`` (B, T) → hidden after layer ``end``; KV appended.

        ``attention_mask``: 0/1 over the cached tokens and the T new ones (B, past_length + T).
        ``taps``: filled with the hidden states after every chunk that ends below ``end``, by layer.
        """
        if not self.caches:
            self.reset(hidden.shape[0])
        for r, cache in zip(self.runners, self.caches):
            out = r.run_chunk({"hidden_states": hidden, "position_ids": position_ids, "attention_mask": attention_mask}, cache)
            hidden = out["hidden_states_out"]
            if taps is not None and r.spec.layers[1] < self.end:  # type: ignore[index]
                taps[r.spec.layers[1]] = hidden  # type: ignore[index]
        return hidden


class PromptEncoder:
    """A bundle's tokenizer and prompt template, without any segment: what counting a prompt's tokens needs.

    (The edge holds the large model's bundle this way when its weights stay in the cloud.)
    """

    def __init__(self, bundle: Bundle):
        from tokenizers import Tokenizer

        m = bundle.manifest
        self.prompt = m.prompt
        self.tokenizer = Tokenizer.from_str(bundle.read_verified(m.tokenizer).decode("utf-8"))
        self.placeholder_id = self.tokenizer.token_to_id(m.prompt.image_placeholder)
        if self.placeholder_id is None:
            raise MsaoError(f"tokenizer of {m.name} has no token {m.prompt.image_placeholder!r}; re-export the bundle")

    def ids(self, question: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids before and after the image placeholder of the prompt template."""
        ids = self.tokenizer.encode(self.prompt.template.format(question=question)).ids
        if ids.count(self.placeholder_id) != 1:
            raise FeedError(f"the question must not contain the image placeholder {self.prompt.image_placeholder!r}")
        cut = ids.index(self.placeholder_id)
        return np.asarray(ids[:cut], np.int64), np.asarray(ids[cut + 1 :], np.int64)


class Generator:
    """Answers questions about images with one bundle on one backend (batch 1).

    Opens a runner per segment once; reuse the generator across requests. Not thread-safe:
    one request at a time per generator (the KV cache lives in its ``DecoderStack``).
    """

    def __init__(self, bundle: Bundle, backend: Backend):
        self.bundle = bundle
        m = bundle.manifest
        self.info = m.model
        self.runners: dict[str, Runner] = {s.name: backend.open(bundle, s) for s in m.segments}
        self.prompt_encoder = PromptEncoder(bundle)
        self.tokenizer, self.placeholder_id = self.prompt_encoder.tokenizer, self.prompt_encoder.placeholder_id
        self.eos = set(m.model.eos_token_ids)
        self._stacks: dict[int, DecoderStack] = {}

    def close(self) -> None:
        for r in self.runners.values():
            r.close()

    def stack(self, end: int) -> DecoderStack:
        """The decoder stack for layers [0, end), built once per ``end``."""
        if end not in self._stacks:
            chunks = [self.runners[s.name] for s in self.bundle.manifest.decoder_chunks() if s.layers and s.layers[1] <= end]
            if not chunks or chunks[-1].spec.layers[1] != end:  # type: ignore[index]
                raise MsaoError(f"{self.bundle.manifest.name}: no chunk boundary at layer {end}; exits: {self.bundle.manifest.exit_layers}")
            self._stacks[end] = DecoderStack(chunks, self.info.num_kv_heads, self.info.head_dim)
        return self._stacks[end]

    # -- inputs -----------------------------------------------------------------------------

    def pixels_from_bytes(self, data: bytes) -> np.ndarray:
        """Decode an image file and preprocess it: float32 (3, H, W)."""
        return pixels_from_image(decode_image(data), self.bundle.manifest.preprocess)

    def encode_image(self, pixels: np.ndarray) -> ImageEncoding:
        """Run the vision encoder on float32 pixels (3, H, W)."""
        if pixels.ndim != 3:
            raise FeedError(f"encode_image takes one image (3, H, W), got shape {pixels.shape}")
        r = self.runners["vision_encoder"]
        out = r.infer({"pixel_values": pixels[None]})
        return ImageEncoding(out["image_tokens"][0], out["mas_features"][0], r.last_latency_ms)

    def prompt_ids(self, question: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids before and after the image placeholder of the bundle's prompt template."""
        return self.prompt_encoder.ids(question)

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        image: ImageEncoding,
        question: str,
        *,
        keep: np.ndarray | None = None,
        exit_layer: int | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        tail: tuple[int, Runner] | None = None,
        signals: bool = False,
    ) -> Answer:
        """Greedy answer to ``question`` about ``image``.

        Args:
            image: the encoder's output; ``text_only_encoding`` (N = 0) for a turn without an image.
            keep: indices of image tokens to feed (sorted, unique, within N); None = all.
                Kept tokens keep their original position ids.
            exit_layer: answer from the exit head after this layer (fewer layers run); None = full.
            max_new_tokens: upper bound on generated tokens, the end token included (it usually
                stops sooner); the answer also ends at the model's ``max_positions``.
            tail: ``(k, runner)``: run layers [0, k) here and hand their hidden states to
                ``runner`` (e.g. a remote ``decoder[k:L]`` + head), which takes hidden states,
                position ids and the attention mask and returns logits. It keeps its own KV.
            signals: also record ``DraftSignals`` (margins, entropies, the exit heads' first
                token opinions, the final hidden state) for a commit verifier; one exit-head
                run per exit below the answering depth, at prefill only.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise FeedError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {max_new_tokens!r}")
        t_start = time.perf_counter()
        n = image.tokens.shape[0]
        keep_idx = np.arange(n) if keep is None else _check_keep(keep, n)
        if tail is not None:
            if exit_layer is not None:
                raise FeedError("a split (tail) and an exit head exclude each other: the tail answers from its own head")
            end, tail_runner = tail

            def head_logits(h: np.ndarray, pos: np.ndarray, mask: np.ndarray) -> np.ndarray:
                return tail_runner.infer({"hidden_states": h, "position_ids": pos, "attention_mask": mask})["logits"]
        else:
            end = self.info.num_layers if exit_layer is None else exit_layer
            head = self.runners["lm_head" if exit_layer is None else exit_segment_name(exit_layer)]

            def head_logits(h: np.ndarray, pos: np.ndarray, mask: np.ndarray) -> np.ndarray:
                return head.infer({"hidden_states": h[:, -1:]})["logits"]

        stack = self.stack(end)
        prefix, suffix = self.prompt_ids(question)
        stack.reset(capacity=len(prefix) + len(keep_idx) + len(suffix) + max_new_tokens)
        t0 = time.perf_counter()
        emb = self.runners["text_embed"].infer({"input_ids": np.concatenate([prefix, suffix])[None]})["embeddings"]
        embed_ms = (time.perf_counter() - t0) * 1e3
        lp = len(prefix)
        hidden = np.concatenate([emb[:, :lp], image.tokens[keep_idx][None], emb[:, lp:]], axis=1)  # (1, T, D)
        positions, next_pos = prefill_positions(self.info, lp, n, keep_idx, len(suffix))  # (1, T), or (3, 1, T) for M-RoPE

        t0 = time.perf_counter()
        mask = np.ones((1, hidden.shape[1]), np.int64)
        taps: dict[int, np.ndarray] | None = {} if signals and tail is None else None
        h = stack.run(hidden, positions, mask, taps)
        probs = softmax(head_logits(h, positions, mask)[0, -1])
        first_hidden = h[0, -1].astype(np.float32, copy=True) if signals else None
        prefill_ms = (time.perf_counter() - t0) * 1e3

        ids: list[int] = []
        token_probs: list[float] = []
        margins: list[float] = []
        entropies: list[float] = []
        t0 = time.perf_counter()
        while True:
            tok = int(probs.argmax())
            ids.append(tok)
            token_probs.append(float(probs[tok]))
            if signals:
                margin, entropy = _margin_and_entropy(probs)
                margins.append(margin)
                entropies.append(entropy)
            if tok in self.eos or len(ids) >= max_new_tokens or next_pos >= self.info.max_positions:
                break
            e = self.runners["text_embed"].infer({"input_ids": np.asarray([[tok]], np.int64)})["embeddings"]
            mask = np.ones((1, stack.past_length + 1), np.int64)
            pos = decode_positions(self.info, next_pos)
            h = stack.run(e, pos, mask)
            next_pos += 1
            probs = softmax(head_logits(h, pos, mask)[0, -1])
        decode_ms = (time.perf_counter() - t0) * 1e3
        draft = None
        if signals:
            exits = []
            for k, tapped in sorted((taps or {}).items()):
                name = exit_segment_name(k)
                if name in self.runners:
                    p_exit = softmax(self.runners[name].infer({"hidden_states": tapped[:, -1:]})["logits"][0, -1])
                    exits.append((k, float(p_exit[ids[0]]), int(p_exit.argmax()) == ids[0]))
            draft = DraftSignals(tuple(margins), tuple(entropies), tuple(exits), first_hidden)  # type: ignore[arg-type]
        text_ids = [t for t in ids if t not in self.eos]
        total_ms = (time.perf_counter() - t_start) * 1e3 + image.vision_ms
        return Answer(
            text=self.tokenizer.decode(text_ids, skip_special_tokens=True).strip(),
            token_ids=tuple(ids),
            token_probs=tuple(token_probs),
            confidence=min(token_probs),
            exit_layer=exit_layer,
            kept_tokens=len(keep_idx),
            text_tokens=len(prefix) + len(suffix),
            timings=StageTimings(image.vision_ms, embed_ms, prefill_ms, decode_ms, total_ms),
            finish_reason=finish_reason_from_ids(ids, self.eos),
            signals=draft,
        )

    def answer(self, image_bytes: bytes, question: str, **kwargs) -> Answer:
        """Decode, encode and answer in one call (the simple Python API)."""
        return self.generate(self.encode_image(self.pixels_from_bytes(image_bytes)), question, **kwargs)


def _check_keep(keep: np.ndarray, n: int) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.ndim != 1 or keep.dtype.kind not in "iu" or len(keep) == 0:
        raise FeedError(f"keep must be a non-empty 1-D integer array of token indices, got {keep.dtype} {keep.shape}")
    if keep.min() < 0 or keep.max() >= n or np.any(np.diff(keep) <= 0):
        raise FeedError(f"keep must be sorted, unique indices in [0, {n}); got {keep.tolist()[:8]}…")
    return keep.astype(np.int64)
