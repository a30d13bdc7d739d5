"""Runs decoded jobs on one verified bundle: split ranges with cloud-side KV sessions, whole answers, draft blocks.

Knows jobs and segments, not MQTT: the worker hands it a ``JobHeader`` and tensors, and gets
tensors back or a ``CloudJobFailed`` whose ``code`` goes into the error result. The bundle's
runners are those of one ``RequestPipeline``, opened once and shared by all worker threads;
answer jobs run that pipeline's steps (the edge's and ``msao eval``'s), split jobs run its
decoder chunks with a KV cache per session.

    split:  hidden (B, T, D) at layer k ─decoder[k:L] (+ KV of session)─► (B, T, D) ─head─► logits (B, 1|T, V)
    answer: image bytes [+ keep] | kept tokens (K, D) fp32/fp16, or int8 + scales (K,), + keep (K,) | nothing ─Generator─► ids, probs, text
    verify: [prompt as for answer, first block only] + draft (k,) ─VerifySession (+ KV of session)─► committed ids, probs
    probe:  anything ─(decoded, discarded)─► reply_bytes zeros
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from msao.cloud_bridge.codec import dequantize_rows
from msao.cloud_bridge.messages import JobHeader, ServedModel, parse_decoder_range
from msao.cloud_bridge.sessions import SessionTable
from msao.engines.backend import Backend, Runner
from msao.engines.bundle import Bundle
from msao.engines.generation import DecoderStack, ImageEncoding, text_only_encoding
from msao.engines.manifest import exit_segment_name
from msao.engines.pipeline import RequestPipeline
from msao.engines.speculation import VerifySession
from msao.errors import CloudJobFailed, CodecError

__all__ = ["JobOutput", "ModelServer", "SPLIT_INPUTS"]

log = logging.getLogger(__name__)

SPLIT_INPUTS = ("attention_mask", "hidden_states", "position_ids")
PROMPT_INPUTS = (
    (),
    ("image",),
    ("image", "keep"),
    ("image_tokens", "keep"),
    ("image_token_scales", "image_tokens", "keep"),
)  # an answer job's, or a first verify block's


@dataclass(frozen=True)
class JobOutput:
    """What a job produced, before it is encoded into a result."""

    tensors: dict[str, np.ndarray]
    compute_ms: float
    session_id: str = ""
    past_length: int = 0
    text: str = ""
    confidence: float = -1.0
    finish_reason: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class _SplitSession:
    stack: DecoderStack
    segment: str
    head: str


class ModelServer:
    """One bundle, its request pipeline (the open runners), and the jobs it can run.

    Args:
        bundle: a verified bundle (``load_bundle``).
        backend: opens one runner per segment (e.g. ``OnnxRuntimeBackend``).
        sessions: the worker's KV session table (shared by all models; ids are random).
    """

    def __init__(self, bundle: Bundle, backend: Backend, sessions: SessionTable):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.sessions = sessions
        self.pipeline = RequestPipeline(bundle, backend)
        self.providers: dict[str, tuple[str, ...]] = {
            n: tuple(getattr(r, "providers", (backend.name,))) for n, r in self.pipeline.runners.items()
        }
        for name, providers in self.providers.items():
            log.info("model %s: segment %s runs on %s", self.manifest.name, name, ", ".join(providers))

    @property
    def model_hash(self) -> str:
        return self.manifest.model_hash

    def served(self) -> ServedModel:
        used = sorted({p for ps in self.providers.values() for p in ps[:1]})
        return ServedModel(self.manifest.name, self.model_hash, self.manifest.model.num_layers, self.manifest.split_points, tuple(used))

    def close(self) -> None:
        self.pipeline.close()

    def run(self, header: JobHeader, tensors: Mapping[str, np.ndarray]) -> JobOutput:
        """Run one job. Raises CloudJobFailed (code for the result) or FeedError/ImageError (bad input)."""
        if header.kind == "split":
            return self._split(header, tensors)
        if header.kind == "probe":  # link measurement: the tensors were decoded (checked), nothing runs
            return JobOutput({"reply": np.zeros(header.reply_bytes, np.uint8)} if header.reply_bytes else {}, 0.0)
        if header.kind == "verify":
            return self._verify(header, tensors)
        return self._answer(header, tensors)

    # -- split --------------------------------------------------------------------------------

    def _chunk_runners(self, segment: str) -> list[Runner]:
        start, end = parse_decoder_range(segment)
        chunks = [s for s in self.manifest.decoder_chunks() if s.layers and start <= s.layers[0] and s.layers[1] <= end]
        if not chunks or chunks[0].layers[0] != start or chunks[-1].layers[1] != end:  # type: ignore[index]
            bounds = sorted({0, *(s.layers[1] for s in self.manifest.decoder_chunks() if s.layers)})
            raise CloudJobFailed(
                f"model {self.manifest.name} cannot run {segment}: its decoder chunks end at layers {bounds}; "
                f"split at one of {list(self.manifest.split_points)}",
                "unknown_segment",
            )
        return [self.pipeline.runners[s.name] for s in chunks]

    def _head_runner(self, head: str, end: int) -> Runner | None:
        if head == "none":
            return None
        if head != "lm_head" and head != exit_segment_name(end):
            raise CloudJobFailed(f"head {head} cannot follow layer {end}: use lm_head, none or {exit_segment_name(end)}", "unknown_segment")
        if head not in self.pipeline.runners:
            raise CloudJobFailed(
                f"model {self.manifest.name} has no segment {head}; exit heads: {list(self.manifest.exit_layers)}", "unknown_segment"
            )
        return self.pipeline.runners[head]

    def _split(self, header: JobHeader, tensors: Mapping[str, np.ndarray]) -> JobOutput:
        if tuple(sorted(tensors)) != SPLIT_INPUTS:
            raise CloudJobFailed(f"split job needs exactly the tensors {list(SPLIT_INPUTS)}, got {sorted(tensors)}", "bad_input")
        runners = self._chunk_runners(header.segment)
        head = self._head_runner(header.head, parse_decoder_range(header.segment)[1])
        hidden = tensors["hidden_states"]
        if hidden.dtype == np.float16:  # fp16 transport; the segments compute in float32
            hidden = hidden.astype(np.float32)
        sid = header.session_id
        if header.past_length == 0:
            info = self.manifest.model
            state = _SplitSession(DecoderStack(runners, info.num_kv_heads, info.head_dim), header.segment, header.head)
            state.stack.reset(hidden.shape[0] if hidden.ndim == 3 else 1)
            lock = self.sessions.put(sid, state) if sid else threading.Lock()
        else:
            state, lock = self._held(
                sid, _SplitSession,
                f"this worker holds no KV session {sid} (idle-expired after {self.sessions.idle_s:.0f} s, evicted, "
                "or it lives on another worker); run prefill again or fall back to the edge",
            )  # fmt: skip
            if (state.segment, state.head) != (header.segment, header.head):
                raise CloudJobFailed(
                    f"session {sid} runs {state.segment}+{state.head}, this step asks {header.segment}+{header.head}", "session_mismatch"
                )
        with lock:
            if state.stack.past_length != header.past_length:
                raise CloudJobFailed(
                    f"session {sid} holds {state.stack.past_length} past tokens, the step expects {header.past_length}; "
                    "steps were lost or re-ordered: run prefill again",
                    "session_mismatch",
                )
            t0 = time.perf_counter()
            try:
                h = state.stack.run(hidden, tensors["position_ids"], tensors["attention_mask"])  # (B, T, D)
                if header.logits == "last":
                    h = h[:, -1:]  # (B, T, D) -> (B, 1, D)
                out = h if head is None else head.infer({"hidden_states": np.ascontiguousarray(h)})["logits"]
            except Exception:
                if sid:  # a step that failed half-way leaves the KV inconsistent
                    self.sessions.drop(sid)
                raise
            compute_ms = (time.perf_counter() - t0) * 1e3
            past = state.stack.past_length
        name = "hidden_states_out" if head is None else "logits"
        return JobOutput({name: out.astype(header.result_dtype, copy=False)}, compute_ms, session_id=sid, past_length=past)

    def _held(self, sid: str, kind: type, unknown: str):
        """The session ``sid`` of ``kind`` (a split or a speculation session) and its lock; ``unknown``: the message when none is held."""
        found = self.sessions.get(sid)
        if found is None:
            raise CloudJobFailed(unknown, "session_unknown")
        state, lock = found
        if not isinstance(state, kind):
            names = {_SplitSession: "split", VerifySession: "speculation"}
            raise CloudJobFailed(f"session {sid} is a {names[type(state)]} session, not a {names[kind]} session", "session_mismatch")
        return state, lock

    # -- answer -------------------------------------------------------------------------------

    def _prompt(self, tensors: Mapping[str, np.ndarray], what: str) -> tuple[ImageEncoding, np.ndarray | None]:
        """The image encoding and keep-set of an answer job or a first verify block."""
        names = tuple(sorted(tensors))
        if names not in PROMPT_INPUTS:
            raise CloudJobFailed(
                f"{what} takes image [+ keep], image_tokens [+ image_token_scales] + keep, or no tensor (text-only), got {list(names)}",
                "bad_input",
            )
        keep = tensors.get("keep")
        if "image" in tensors:
            img = tensors["image"]
            if img.dtype != np.uint8 or img.ndim != 1:
                raise CloudJobFailed(f"image must be the file's bytes as uint8 (n,), got {img.dtype} {img.shape}", "bad_input")
            return self.pipeline.encode(self.pipeline.decode(img.tobytes())[0]), keep
        if not names:  # a text-only turn: the question alone, no image tokens
            return text_only_encoding(self.manifest.model.hidden_size), None
        return self._encoding_from_kept(tensors["image_tokens"], keep, tensors.get("image_token_scales")), keep

    def _answer(self, header: JobHeader, tensors: Mapping[str, np.ndarray]) -> JobOutput:
        exit_layer = None if header.exit_layer == -1 else header.exit_layer
        if exit_layer is not None and exit_layer not in self.manifest.exit_layers:
            raise CloudJobFailed(
                f"model {self.manifest.name} has exit heads after layers {list(self.manifest.exit_layers)}, not {exit_layer}",
                "unknown_segment",
            )
        t0 = time.perf_counter()
        enc, keep = self._prompt(tensors, "answer job")
        ans = self.pipeline.generator().generate(
            enc, header.question, keep=keep, exit_layer=exit_layer, max_new_tokens=header.max_new_tokens
        )
        compute_ms = (time.perf_counter() - t0) * 1e3
        out = {"token_ids": np.asarray(ans.token_ids, np.int64), "token_probs": np.asarray(ans.token_probs, np.float32)}
        return JobOutput(out, compute_ms, text=ans.text, confidence=ans.confidence)

    def _encoding_from_kept(self, tokens: np.ndarray, keep: np.ndarray, scales: np.ndarray | None = None) -> ImageEncoding:
        """Kept image tokens (float32 or float16, or int8 with a float32 scale per row) in place of the vision encoder."""
        info = self.manifest.model
        n, d = info.image_tokens, info.hidden_size
        if (scales is None) != (tokens.dtype != np.int8) or (scales is None and tokens.dtype not in (np.float32, np.float16)):
            raise CloudJobFailed(
                f"image_tokens must be float32 or float16, or int8 with image_token_scales; got {tokens.dtype}"
                + ("" if scales is None else " with scales"),
                "bad_input",
            )
        if scales is not None:
            try:
                tokens = dequantize_rows(tokens, scales)
            except CodecError as exc:
                raise CloudJobFailed(f"image_tokens: {exc}", "bad_input") from None
        elif not np.isfinite(tokens).all():
            raise CloudJobFailed("image_tokens hold NaN or infinite values", "bad_input")
        if tokens.ndim != 2 or tokens.shape[1] != d or keep.ndim != 1 or len(keep) != tokens.shape[0] or keep.dtype.kind not in "iu":
            raise CloudJobFailed(
                f"image_tokens must be (K, {d}) with keep (K,) integer indices; got {tokens.shape} and {keep.dtype} {keep.shape}",
                "bad_input",
            )
        if len(keep) and (keep.min() < 0 or keep.max() >= n):
            raise CloudJobFailed(f"keep indices must lie in [0, {n})", "bad_input")
        full = np.zeros((n, d), np.float32)  # rows not kept are never read: generate() takes only keep
        full[keep] = tokens
        return ImageEncoding(full, np.zeros((n, 0), np.float32), 0.0)

    # -- verify (token-level speculation) -----------------------------------------------------

    def _kv_bytes(self, enc: ImageEncoding, keep: np.ndarray | None, question: str, budget: int) -> int:
        """A speculation session's KV cache at its full budget (float32 keys and values of every layer)."""
        m = self.manifest.model
        prefix, suffix = self.pipeline.prompt_ids(question)
        positions = len(prefix) + len(suffix) + (len(keep) if keep is not None else enc.tokens.shape[0]) + budget
        return min(positions, m.max_positions) * m.num_layers * 2 * m.num_kv_heads * m.head_dim * 4

    def _verify(self, header: JobHeader, tensors: Mapping[str, np.ndarray]) -> JobOutput:
        """One block of drafts for a speculation session; the first block (past_length 0) starts it from its prompt."""
        sid = header.session_id
        draft = tensors.get("draft")
        if draft is None:
            raise CloudJobFailed(f"verify job needs a draft tensor (int64 (k,)), got {sorted(tensors)}", "bad_input")
        t0 = time.perf_counter()
        if header.past_length == 0:
            enc, keep = self._prompt({k: v for k, v in tensors.items() if k != "draft"}, "first verify block")
            session = VerifySession(self.pipeline.generator(), enc, header.question, keep=keep, max_new_tokens=header.max_new_tokens)
            nbytes = self._kv_bytes(enc, keep, header.question, header.max_new_tokens)
            try:
                lock = self.sessions.put(sid, session, expires_in_s=max(0.0, header.deadline_unix_s - time.time()), nbytes=nbytes)
            except ValueError as exc:
                raise CloudJobFailed(f"{exc}: ask for fewer max_new_tokens or fewer image tokens, or start the worker with more "
                                     "--max-session-mb", "too_large") from None  # fmt: skip
        else:
            if len(tensors) != 1:
                raise CloudJobFailed(f"a verify block after the first carries only draft, got {sorted(tensors)}", "bad_input")
            session, lock = self._held(
                sid, VerifySession,
                f"this worker holds no speculation session {sid} (its answer ended, its deadline or idle time passed, it was "
                "evicted, or it lives on another worker); start again with the prompt and the committed tokens as drafts",
            )  # fmt: skip
        with lock:
            if len(session.committed) != header.past_length:
                raise CloudJobFailed(
                    f"session {sid} has committed {len(session.committed)} answer tokens, the block expects {header.past_length}; "
                    "blocks were lost or re-ordered: start again with the prompt",
                    "session_mismatch",
                )
            try:
                verdict = session.verify(draft, header.decode_ahead)
            except Exception:
                if header.past_length == 0:  # a first block that failed leaves no session behind
                    self.sessions.drop(sid)
                raise
        if verdict.finish_reason:
            self.sessions.drop(sid)
        compute_ms = (time.perf_counter() - t0) * 1e3
        out = {"token_ids": np.asarray(verdict.token_ids, np.int64), "token_probs": np.asarray(verdict.token_probs, np.float32)}
        return JobOutput(
            out, compute_ms, session_id=sid, past_length=verdict.committed, confidence=min(verdict.token_probs),
            finish_reason=verdict.finish_reason,
        )  # fmt: skip
