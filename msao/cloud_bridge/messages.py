"""What a job, a result and a worker status say: frozen, self-checking records and their wire forms.

A job or result travels as codec payload metadata (``__metadata__``: every value a string);
a worker status travels as retained JSON (humans and dashboards read it too). Parsing is
strict: unknown keys, missing keys and values of the wrong form are refused, and the layout
version must match, so two msao versions never half-understand each other.

Job kinds:
    split   hidden states at layer k -> decoder[k:L] (+ head) -> logits (or hidden states);
            ``session_id`` keeps the cloud half of the KV cache for later decode steps.
    answer  image bytes (PNG/JPEG) [+ keep], kept image tokens (float, or int8 with a scale per
            row: ``image_token_scales``) + keep, or no tensor at all (a text-only turn)
            + a question -> answer text, token ids (the end token last when the model ended
            the answer), per-token probabilities and confidence (cloud-only, draft/verify, pruned).
    probe   any tensors up, ``reply_bytes`` zeros down, no compute: measures the link (bandwidth,
            RTT) through the same broker, worker queue and codec as real jobs.
    verify  token-level speculation: a block of drafted tokens (``draft``, int64 (k,)) checked
            by the large model in one forward pass; the first block of a session (``past_length``
            0) also carries the prompt as an answer job does. The result holds the committed
            tokens (the accepted drafts, then the large model's own next token), ``past_length``
            the answer tokens committed so far, ``finish_reason`` whether the answer ended;
            with ``decode_ahead`` n, up to n more of the large model's own tokens after them.
            ``session_id`` keeps the large model's KV cache until the answer ends or the
            request's deadline passes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from msao.cloud_bridge.topics import check_id
from msao.engines.generation import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS
from msao.errors import CodecError, ConfigError

__all__ = [
    "EDGE_MODES",
    "EDGE_STATES",
    "ERROR_CODES",
    "JOB_KINDS",
    "LAYOUT_VERSION",
    "MAX_REPLY_BYTES",
    "RESULT_STATUSES",
    "EdgeStatus",
    "JobHeader",
    "ResultHeader",
    "ServedModel",
    "WorkerStatus",
    "parse_decoder_range",
]

LAYOUT_VERSION = "1"
_ADDED_IN_LAYOUT_1 = ("decode_ahead",)  # job keys newer than layout 1's first release, sent only when not 0
JOB_KINDS = ("split", "answer", "probe", "verify")
MAX_REPLY_BYTES = 256 * 1024 * 1024
RESULT_STATUSES = ("ok", "busy", "error")
ERROR_CODES = (
    "bad_payload",  # the bytes are not a valid payload (codec)
    "bad_job",  # the header is missing, malformed, or disagrees with the MQTT properties
    "too_large",  # payload or chunked message over the worker's limits
    "unknown_model",  # no bundle with this model hash on this worker
    "unknown_segment",  # no such decoder range or head in the bundle
    "bad_input",  # tensors do not match the segment (names, dtypes, shapes) or the image is bad
    "session_unknown",  # a decode step or block for a KV session this worker does not hold (expired, evicted, other worker)
    "session_mismatch",  # the session holds a different past length than the step (or block) expects
    "internal",  # a bug; the worker logged a traceback
)
_RANGE = re.compile(r"^decoder\[(\d{1,4}):(\d{1,4})\]\Z")
_HEAD = re.compile(r"^(lm_head|none|exit_head@\d{1,4})\Z")
_HASH = re.compile(r"^[0-9a-f]{64}\Z")
MAX_TEXT_CHARS = 2000


def parse_decoder_range(segment: str) -> tuple[int, int]:
    """``"decoder[2:4]"`` -> (2, 4); raises CodecError for anything else."""
    m = _RANGE.match(segment)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise CodecError(f"segment {segment!r} is not a decoder range like 'decoder[2:4]' with start < end")
    return int(m.group(1)), int(m.group(2))


def _to_strings(obj: object) -> dict[str, str]:
    return {f.name: repr(v) if isinstance(v := getattr(obj, f.name), float) else str(v) for f in fields(obj)}  # type: ignore[arg-type]


def _from_strings(cls, md: Mapping[str, str]):
    """Build ``cls`` from string metadata: unknown or missing keys and bad numbers are refused."""
    if not isinstance(md, Mapping):
        raise CodecError(f"{cls.__name__}: metadata must be a string dict, got {type(md).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(md) - set(known))
    if unknown:
        raise CodecError(f"{cls.__name__}: unknown metadata keys {unknown[:8]}; the sender speaks another msao layout")
    if md.get("layout") != LAYOUT_VERSION:
        raise CodecError(f"{cls.__name__}: layout {md.get('layout')!r}, this msao speaks {LAYOUT_VERSION!r}; upgrade the older side")
    kwargs: dict[str, object] = {}
    for name, f in known.items():
        if name not in md:
            continue
        raw = md[name]
        try:
            if f.type == "int":
                kwargs[name] = int(raw, 10)
            elif f.type == "float":
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError("not finite")
                kwargs[name] = value
            else:
                kwargs[name] = raw
        except ValueError as exc:
            raise CodecError(f"{cls.__name__}: {name}={raw[:40]!r} is not a valid {f.type} ({exc})") from exc
    try:
        return cls(**kwargs)
    except CodecError:
        raise
    except (TypeError, ValueError, ConfigError) as exc:  # a required field is missing, a bad id
        raise CodecError(f"{cls.__name__}: {exc}") from exc


@dataclass(frozen=True)
class JobHeader:
    """What a job asks for; carried as payload metadata (tensors travel beside it).

    Attributes:
        job_id: unique per job; results and re-sends are matched (and de-duplicated) by it.
        model_hash: the bundle's identity hash; a worker without it answers ``unknown_model``.
        kind: ``split`` or ``answer`` (see the module docstring).
        deadline_unix_s: wall-clock time after which nobody wants the result; workers drop it.
        segment: split: decoder range ``decoder[k:L]`` to run.
        head: split: ``lm_head``, ``exit_head@L`` or ``none`` (return hidden states).
        logits: split: ``last`` (only the last position, what generation needs) or ``all``.
        session_id: split: keep this range's KV cache under this id for later decode steps
            ("" = stateless, nothing kept); verify: the speculation session (required).
        past_length: split: KV length the session must hold before this step; 0 = prefill,
            which (re)starts the session. verify: answer tokens the session must have committed
            before this block; 0 = the first block, which carries the prompt.
        result_dtype: ``float32`` or ``float16`` for returned logits / hidden states.
        question: answer and a first verify block: the question text.
        max_new_tokens: answer and a first verify block: generation bound, the end token included (1..``MAX_NEW_TOKENS``);
            a job from an older edge that sends none gets ``DEFAULT_MAX_NEW_TOKENS``.
        exit_layer: answer: answer from the exit head after this layer; -1 = full depth.
        reply_bytes: probe: size of the reply tensor (downlink measurement).
        decode_ahead: verify: after the verdict, decode up to this many more tokens of the large
            model's greedy answer and commit them with the block's (0..``MAX_NEW_TOKENS``; other
            kinds: 0). Sent only when not 0, so a job without it has layout 1's bytes; a worker
            older than this key refuses a job with it (``bad_job``), the edge then finishes the
            answer alone: upgrade workers before edges.
    """

    job_id: str
    model_hash: str
    kind: str
    deadline_unix_s: float
    segment: str = ""
    head: str = "lm_head"
    logits: str = "last"
    session_id: str = ""
    past_length: int = 0
    result_dtype: str = "float32"
    question: str = ""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    exit_layer: int = -1
    reply_bytes: int = 0
    decode_ahead: int = 0
    layout: str = LAYOUT_VERSION

    def __post_init__(self) -> None:
        problems: list[str] = []
        for check in (
            lambda: check_id(self.job_id, "job id"),
            lambda: self.session_id and check_id(self.session_id, "session id"),
        ):
            try:
                check()
            except ConfigError as exc:
                problems.append(str(exc))
        if not _HASH.match(self.model_hash):
            problems.append(f"model_hash {self.model_hash[:70]!r} is not 64 lower-case hex digits")
        if self.kind not in JOB_KINDS:
            problems.append(f"kind {self.kind!r} not in {JOB_KINDS}")
        if not math.isfinite(self.deadline_unix_s):
            problems.append("deadline_unix_s must be finite")
        if self.result_dtype not in ("float32", "float16"):
            problems.append(f"result_dtype {self.result_dtype!r} not float32/float16")
        if self.kind == "split":
            try:
                parse_decoder_range(self.segment)
            except CodecError as exc:
                problems.append(str(exc))
            if not _HEAD.match(self.head):
                problems.append(f"head {self.head!r} is not lm_head, none or exit_head@<layer>")
            if self.logits not in ("last", "all"):
                problems.append(f"logits {self.logits!r} not last/all")
            if self.past_length < 0 or (self.past_length > 0 and not self.session_id):
                problems.append(f"past_length {self.past_length} needs a session_id (and must be >= 0)")
        if self.kind == "verify":
            if not self.session_id:
                problems.append("a verify job needs a session_id (its speculation session)")
            if self.past_length < 0:
                problems.append(f"past_length {self.past_length} must be >= 0 (answer tokens committed before this block)")
        if self.kind == "answer" or (self.kind == "verify" and self.past_length == 0):
            if not self.question or len(self.question) > MAX_TEXT_CHARS:
                problems.append(f"question must be 1-{MAX_TEXT_CHARS} characters")
            elif not self.question.isascii() and any("\ud800" <= c <= "\udfff" for c in self.question):  # the tokenizer refuses these
                problems.append("question holds a lone surrogate (an unpaired \\ud800-\\udfff escape); send valid Unicode text")
            if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
                problems.append(f"max_new_tokens {self.max_new_tokens} not in 1..{MAX_NEW_TOKENS}")
            if self.exit_layer < -1:
                problems.append(f"exit_layer {self.exit_layer} must be -1 (full depth) or a layer")
        if not 0 <= self.decode_ahead <= (MAX_NEW_TOKENS if self.kind == "verify" else 0):
            problems.append(f"decode_ahead {self.decode_ahead} must be 0 (verify jobs: at most {MAX_NEW_TOKENS})")
        if not 0 <= self.reply_bytes <= (MAX_REPLY_BYTES if self.kind == "probe" else 0):
            problems.append(f"reply_bytes {self.reply_bytes} must be 0 (probe jobs: at most {MAX_REPLY_BYTES})")
        if problems:
            raise CodecError("job header: " + "; ".join(problems))

    def to_metadata(self) -> dict[str, str]:
        md = _to_strings(self)
        for key in _ADDED_IN_LAYOUT_1:  # absent at its default: a worker that predates the key reads the job unchanged
            if getattr(self, key) == 0:
                del md[key]
        return md

    @classmethod
    def from_metadata(cls, md: Mapping[str, str]) -> JobHeader:
        return _from_strings(cls, md)


@dataclass(frozen=True)
class ResultHeader:
    """What a worker answers; carried as payload metadata of the result.

    Attributes:
        status: ``ok``, ``busy`` (queue full: fall back or try another worker) or ``error``.
        error_code / error: one of ``ERROR_CODES`` and a message saying what to do.
        queue_wait_ms: time the job waited in the worker's queue.
        compute_ms: inference time (the segments only).
        codec_ms: worker time decoding the job and encoding this result.
        session_id / past_length: split: the session and its KV length after this step;
            verify: the session and the answer tokens committed so far.
        text / confidence: answer: the answer and its lowest token probability.
        finish_reason: verify: "" while the answer goes on, ``stop`` (the model's end token)
            or ``length`` (the budget or the context ran out); the session is then freed.
        providers: execution providers the worker's segments ran on (comma-separated).
    """

    job_id: str
    status: str
    worker_id: str
    error_code: str = ""
    error: str = ""
    queue_wait_ms: float = 0.0
    compute_ms: float = 0.0
    codec_ms: float = 0.0
    session_id: str = ""
    past_length: int = 0
    text: str = ""
    confidence: float = -1.0
    providers: str = ""
    finish_reason: str = ""
    layout: str = LAYOUT_VERSION

    def __post_init__(self) -> None:
        check_id(self.job_id, "job id")
        check_id(self.worker_id, "worker id")
        if self.finish_reason not in ("", "stop", "length"):
            raise CodecError(f"result finish_reason {self.finish_reason!r} not '', stop or length")
        if self.status not in RESULT_STATUSES:
            raise CodecError(f"result status {self.status!r} not in {RESULT_STATUSES}")
        if (self.status == "error") != bool(self.error_code) or (self.error_code and self.error_code not in ERROR_CODES):
            raise CodecError(f"result error_code {self.error_code!r} does not fit status {self.status!r} (codes: {ERROR_CODES})")
        if len(self.error) > MAX_TEXT_CHARS or len(self.text) > MAX_TEXT_CHARS:
            raise CodecError(f"result error/text longer than {MAX_TEXT_CHARS} characters")

    def to_metadata(self) -> dict[str, str]:
        return _to_strings(self)

    @classmethod
    def from_metadata(cls, md: Mapping[str, str]) -> ResultHeader:
        return _from_strings(cls, md)


@dataclass(frozen=True)
class ServedModel:
    """One bundle a worker serves."""

    name: str
    model_hash: str
    num_layers: int
    split_points: tuple[int, ...]
    providers: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Mapping) -> ServedModel:
        d = _exact(cls, d)
        return cls(
            name=str(d["name"]),
            model_hash=str(d["model_hash"]),
            num_layers=int(d["num_layers"]),
            split_points=tuple(int(k) for k in d["split_points"]),
            providers=tuple(str(p) for p in d["providers"]),
        )


@dataclass(frozen=True)
class WorkerStatus:
    """A worker's retained status; its Last Will is the same record with ``state="offline"``.

    Attributes:
        queue_depth / queue_capacity: jobs waiting now / at most (a full queue answers busy).
        threads: jobs that run at once.
        sessions: KV sessions held for split decode steps.
        jobs_total / busy_total / errors_total / expired_total: counters since start.
        updated_unix_s: wall time of this status.
    """

    worker_id: str
    state: str
    models: tuple[ServedModel, ...]
    queue_depth: int = 0
    queue_capacity: int = 0
    threads: int = 0
    sessions: int = 0
    jobs_total: int = 0
    busy_total: int = 0
    errors_total: int = 0
    expired_total: int = 0
    updated_unix_s: float = 0.0
    layout: str = LAYOUT_VERSION

    def __post_init__(self) -> None:
        check_id(self.worker_id, "worker id")
        if self.state not in ("online", "offline"):
            raise ValueError(f"worker state {self.state!r} not online/offline")

    def serves(self, model_hash: str) -> bool:
        return self.state == "online" and any(m.model_hash == model_hash for m in self.models)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> WorkerStatus:
        d = dict(_exact(cls, d))
        if d.get("layout") != LAYOUT_VERSION:
            raise ValueError(f"worker status layout {d.get('layout')!r}, this msao speaks {LAYOUT_VERSION!r}")
        d["models"] = tuple(ServedModel.from_dict(m) for m in d["models"])
        for k in ("queue_depth", "queue_capacity", "threads", "sessions", "jobs_total", "busy_total", "errors_total", "expired_total"):
            if k in d:
                d[k] = int(d[k])
        d["updated_unix_s"] = float(d.get("updated_unix_s", 0.0))
        return cls(**d)


EDGE_STATES = ("starting", "online", "stopping", "offline")
EDGE_MODES = ("", "collaborative", "edge-only")


@dataclass(frozen=True)
class EdgeStatus:
    """An edge daemon's retained status; its Last Will is the same record with ``state="offline"``.

    Integrators (dashboards, Node-RED, Home Assistant) read it to know whether a request sent
    now will be served, so it says readiness, not just "connected".

    Attributes:
        state: ``starting`` (connected, the runtime is not serving yet: requests wait),
            ``online`` (serving), ``stopping`` (taking no new requests) or ``offline`` (a clean
            stop, or the broker's Last Will after an unclean one).
        ready: the runtime serves requests now (``state == "online"``).
        mode: ``collaborative`` (a cloud worker serves the large model) or ``edge-only``; ""
            when not ready.
        updated_unix_s: wall time of this status (0 in the Last Will, which is fixed at connect).
    """

    edge_id: str
    state: str
    updated_unix_s: float = 0.0
    ready: bool = False
    mode: str = ""
    layout: str = LAYOUT_VERSION

    def __post_init__(self) -> None:
        check_id(self.edge_id, "edge id")
        if self.state not in EDGE_STATES:
            raise ValueError(f"edge state {self.state!r} not in {EDGE_STATES}")
        if self.mode not in EDGE_MODES or self.ready != (self.state == "online"):
            raise ValueError(f"edge status: ready={self.ready!r} mode={self.mode!r} do not fit state {self.state!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_dict(cls, d: Mapping) -> EdgeStatus:
        return cls(**_exact(cls, d))


def _exact(cls, d: Mapping) -> Mapping:
    if not isinstance(d, Mapping):
        raise TypeError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    return d
