"""What a user asks the edge daemon and what it answers: typed records and their strict parsers.

Every intake (MQTT, HTTP, ``msao ask``, the Python API) turns its bytes into one
``EdgeRequest`` here and sends back one ``EdgeResponse``; nothing else in the daemon sees raw
payloads. Parsing trusts nothing: sizes are checked before anything is decoded, JSON depth
is bounded, known keys must have their types, text must be UTF-8, ids must be safe in MQTT
topics and logs. Unknown JSON keys and user properties are ignored (logged at debug), because
integration tools carry their own along (Node-RED's ``_msgid``, ``topic``); a known key of the
wrong type is still refused. ``context`` is the caller's own (bounded) JSON, echoed unchanged. The image
is kept as the file's bytes; it is decoded (with its own pixel limit) by the worker that
serves the request, so a bad image costs the intake nothing and gets an error response.

Knows nothing of MQTT, HTTP or placement.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from msao.edge_runtime.plans import POLICIES
from msao.engines.generation import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS
from msao.errors import RequestError

__all__ = [
    "ERROR_CODES",
    "JSON_ONLY_KEYS",
    "MAX_CONTEXT_BYTES",
    "context_from_value",
    "EdgeRequest",
    "EdgeResponse",
    "image_bytes_from_base64",
    "json_depth",
    "RequestLimits",
    "new_request_id",
    "request_from_json",
    "request_from_raw_image",
]

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
MAX_CONTEXT_BYTES = 4096
ERROR_CODES = (
    "bad_request",  # the payload is not a request: not JSON, not UTF-8, wrong types of known keys
    "bad_image",  # the image is missing, not decodable, or too large
    "too_large",  # the payload is over the intake's size limit
    "deadline",  # the deadline passed before an answer could be committed
    "busy",  # the admission queue is full; try again later or elsewhere
    "unavailable",  # the daemon is shutting down or has no model loaded
    "internal",  # a bug; the daemon logged a traceback
)


def new_request_id() -> str:
    return "r" + uuid.uuid4().hex[:19]


@dataclass(frozen=True)
class RequestLimits:
    """Bounds applied at intake, before any decoding.

    Attributes:
        max_payload_bytes: the whole request payload (JSON or raw image).
        max_question_chars: question length after UTF-8 decoding.
        max_json_depth: nesting of the JSON document (a request needs 2; ``context`` counts).
        default_deadline_ms / max_deadline_ms: the deadline when none is given, and the cap.
        max_context_bytes: the request's ``context`` serialised as compact UTF-8 JSON.
    """

    max_payload_bytes: int = 16 * 1024 * 1024
    max_question_chars: int = 1000
    max_json_depth: int = 4
    default_deadline_ms: float = 5000.0
    max_deadline_ms: float = 600_000.0
    max_context_bytes: int = MAX_CONTEXT_BYTES


@dataclass(frozen=True)
class EdgeRequest:
    """One question about one image (or one frame of a stream).

    Attributes:
        request_id: safe id (``[A-Za-z0-9_-]{1,64}``); answers and logs carry it.
        question: the question text, non-empty.
        image: the image file's bytes (JPEG, PNG, ...), decoded by the serving worker;
            ``b""`` is a text-only turn, answered by the language model alone (no decode, no
            vision encoder, no MAS: the modal sparsity case where the image is not needed at all).
        stream_id: frames with the same id reuse the previous frame's tokens (MAS temporal).
        deadline_ms: budget from acceptance to the committed answer.
        policy: placement policy for this request (None = the daemon's configured one);
            ``static_split`` takes ``split_layer``, ``prune_only`` takes ``keep_ratio``.
        split_layer / keep_ratio: parameters of the policies above.
        max_new_tokens: the answer's budget in generated tokens, the end token included
            (1..``MAX_NEW_TOKENS``); None = ``DEFAULT_MAX_NEW_TOKENS``. An answer cut by it ends
            with ``finish_reason`` "length".
        context: the caller's JSON value (None = none), echoed unchanged in the response so a
            flow can carry its own state through the daemon; bounded by ``context_from_value``.
        partials: publish the answer's text so far as ``partial`` responses while it is being
            committed (the MQTT intake; the speculative plan's verified tokens), before the final one.
    """

    request_id: str
    question: str
    image: bytes = field(repr=False)
    stream_id: str | None = None
    deadline_ms: float = 5000.0
    policy: str | None = None
    split_layer: int | None = None
    keep_ratio: float | None = None
    max_new_tokens: int | None = None
    context: Any = None
    partials: bool = False

    @property
    def text_only(self) -> bool:
        return not self.image

    @property
    def token_budget(self) -> int:
        return DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.request_id, str) or not _ID.match(self.request_id):
            problems.append(f"request id {str(self.request_id)[:80]!r} must be 1-64 characters from A-Z a-z 0-9 _ -")
        if not isinstance(self.question, str) or not self.question.strip():
            problems.append("question is empty; ask something about the image")
        elif not self.question.isascii() and any("\ud800" <= c <= "\udfff" for c in self.question):  # a JSON "\ud800" escape
            problems.append("question holds a lone surrogate (an unpaired \\ud800-\\udfff escape); send valid Unicode text")
        if not isinstance(self.image, (bytes, bytearray)):
            problems.append(f"image must be the JPEG/PNG file's bytes (b\"\" for a text-only turn), got {type(self.image).__name__}")
        elif self.stream_id is not None and not self.image:
            problems.append("a stream frame needs its image; send the frame's JPEG/PNG bytes")
        if self.stream_id is not None and (not isinstance(self.stream_id, str) or not _ID.match(self.stream_id)):
            problems.append(f"stream id {str(self.stream_id)[:80]!r} must be 1-64 characters from A-Z a-z 0-9 _ -")
        if not (isinstance(self.deadline_ms, (int, float)) and 0 < self.deadline_ms < float("inf")):
            problems.append(f"deadline_ms must be a positive number of milliseconds, got {self.deadline_ms!r}")
        if self.policy is not None and self.policy not in POLICIES:
            problems.append(f"policy {str(self.policy)[:40]!r} is not one of {list(POLICIES)}")
        if self.split_layer is not None and (
            isinstance(self.split_layer, bool) or not isinstance(self.split_layer, int) or self.split_layer < 0
        ):
            problems.append(f"split_layer must be an integer >= 0, got {self.split_layer!r}")
        if self.keep_ratio is not None and (
            isinstance(self.keep_ratio, bool) or not (isinstance(self.keep_ratio, (int, float)) and 0 < self.keep_ratio <= 1)
        ):
            problems.append(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS
        ):
            problems.append(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}, got {str(self.max_new_tokens)[:40]}")
        if not isinstance(self.partials, bool):
            problems.append(f"partials must be true or false, got {str(self.partials)[:40]}")
        if problems:
            raise RequestError("; ".join(problems), "bad_request")


@dataclass(frozen=True)
class EdgeResponse:
    """The daemon's answer to one request (JSON on every intake; ``docs/mqtt-api.md`` has the schema).

    Attributes:
        status: ``ok``, or ``error`` / ``busy`` with ``error_code`` and ``error``; ``partial``
            (only to a request that asked for ``partials``): ``answer`` is the text so far, final
            but not whole, and the response with another status follows.
        answered_by: ``edge`` or ``cloud``: whose answer was committed.
        model: name of the model that produced the committed answer.
        plan: the plan taken (``Plan.describe()``) and ``reason``: why the scheduler chose it.
        fallback: why the plan was abandoned for an edge-only answer ("" = it was not).
        mas: MAS values (``image``, ``text``, ``image_necessity``) and ``kept_tokens`` / ``image_tokens``.
        timings_ms: wall time per stage (queue, decode_image, vision, mas, local, cloud, total).
        bytes_up / bytes_down: payload bytes this request put on / took off the network
            (speculative and failed cloud jobs included).
        flops_edge / flops_cloud: FLOPs this request cost on each side, from the bundles' segment
            FLOPs models and the tokens actually processed (speculative cloud jobs included).
        prompt_tokens / completion_tokens: tokens the committed answer's model prefilled (its
            text and kept image tokens) and generated (the end token not counted).
        finish_reason: ``stop`` (the model ended the answer) or ``length`` (the token budget or
            the model's context ran out first); "" on a failure.
        image_cached: the image's tokens came from the edge's image cache (an image asked about
            before, e.g. a follow-up question): no vision encoder ran.
        upload: what the cloud job carried for the image (``UPLOAD_FORMS``: ``file``, ``jpeg@70``,
            ``region@70``, ``tokens@int8``, ...); "" when no answer job went up.
        context: the request's ``context``, unchanged (None when it had none).
    """

    request_id: str
    status: str
    answer: str = ""
    confidence: float = 0.0
    answered_by: str = ""
    model: str = ""
    plan: str = ""
    reason: str = ""
    fallback: str = ""
    mas: dict[str, float] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    flops_edge: int = 0
    flops_cloud: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    image_cached: bool = False
    upload: str = ""
    error_code: str = ""
    error: str = ""
    context: Any = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode("utf-8")

    @classmethod
    def partial(cls, request_id: str, answer: str, model: str, context: Any = None) -> EdgeResponse:
        """The answer so far, final but not whole (``EdgeRequest.partials``)."""
        return cls(request_id=request_id, status="partial", answer=answer, model=model, context=context)

    @classmethod
    def failure(cls, request_id: str, code: str, message: str, context: Any = None) -> EdgeResponse:
        if code not in ERROR_CODES:
            code = "internal"
        return cls(request_id=request_id, status="busy" if code == "busy" else "error", error_code=code, error=message, context=context)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EdgeResponse:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise RequestError(f"response has unknown keys {unknown[:8]}; the daemon speaks another msao version", "bad_request")
        return cls(**d)


_PROPERTY_KEYS = {"question", "stream", "deadline_ms", "request_id", "policy", "traceparent"}
JSON_ONLY_KEYS = frozenset({"image", "split_layer", "keep_ratio", "max_new_tokens", "context", "partials"})  # no user-property form
_JSON_KEYS = (_PROPERTY_KEYS - {"traceparent"}) | JSON_ONLY_KEYS


def _ignored(what: str, names: list[str], request_id: str | None) -> None:
    """Unknown keys are the integrator's own (Node-RED's ``_msgid``, ``topic``): ignored, noted at debug."""
    if names and log.isEnabledFor(logging.DEBUG):
        log.debug("request %s: ignored unknown %s %s", request_id or "(no id yet)", what, [k[:40] for k in names[:8]])


def context_from_value(value: Any, limits: RequestLimits = RequestLimits()) -> Any:
    """The request's ``context`` if it may be echoed: plain JSON (no NaN/Infinity), at most
    ``limits.max_context_bytes`` serialised; its depth is bounded with the whole request's.

    Raises:
        RequestError: ``bad_request``, saying how large it is or what is not JSON.
    """
    if value is None:
        return None
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except ValueError:
        raise RequestError("context holds NaN or Infinity, which is not JSON; send plain JSON numbers", "bad_request") from None
    if size > limits.max_context_bytes:
        raise RequestError(
            f"context is {size} bytes as JSON, over the limit of {limits.max_context_bytes}; keep a key there and the state in your flow",
            "bad_request",
        )
    return value


def json_depth(obj: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, stopping at ``limit`` + 1 (no recursion on hostile input)."""
    depth, level = 0, [obj]
    while level and depth <= limit:
        depth += 1
        nxt = []
        for o in level:
            if isinstance(o, dict):
                nxt.extend(o.values())
            elif isinstance(o, list):
                nxt.extend(o)
        level = nxt
    return depth


def _text(payload: bytes | bytearray, what: str) -> str:
    try:
        return bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{what} is not UTF-8 text (byte {exc.start}); encode it as UTF-8", "bad_request") from None


def _check_size(payload: bytes | bytearray, limits: RequestLimits) -> None:
    if len(payload) > limits.max_payload_bytes:
        raise RequestError(
            f"request is {len(payload)} bytes, over the limit of {limits.max_payload_bytes}; send a smaller (e.g. JPEG) image",
            "too_large",
        )


def _deadline(value: Any, limits: RequestLimits) -> float:
    if value is None:
        return limits.default_deadline_ms
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"deadline_ms must be a number of milliseconds, got {type(value).__name__}", "bad_request")
    if not 0 < value <= limits.max_deadline_ms:
        raise RequestError(
            f"deadline_ms {value} is not in (0, {limits.max_deadline_ms:g}]: a deadline in the past cannot be met", "deadline"
        )
    return float(value)


def _question(value: Any, limits: RequestLimits) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError("question is missing or empty; send a non-empty string", "bad_request")
    if len(value) > limits.max_question_chars:
        raise RequestError(f"question is {len(value)} characters, over the limit of {limits.max_question_chars}", "bad_request")
    return value


def request_from_json(payload: bytes | bytearray, limits: RequestLimits = RequestLimits(), request_id: str | None = None) -> EdgeRequest:
    """Parse ``{"question", "image" (base64 or a data: URI), "stream"?, "deadline_ms"?, "request_id"?, "policy"?, ...}``.

    Args:
        request_id: the transport's id (MQTT correlation data) when the JSON carries none.

    Raises:
        RequestError: with ``code`` ``too_large``, ``bad_request``, ``bad_image`` or ``deadline``.
    """
    _check_size(payload, limits)
    text = _text(payload, "request")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and ints over 4300 digits (plain ValueError)
        raise RequestError(
            f"request is not JSON ({str(exc)[:80]}); send a JSON object or the raw image with a question property", "bad_request"
        ) from None
    if not isinstance(doc, dict):
        raise RequestError(f"request must be a JSON object, got {type(doc).__name__}", "bad_request")
    if json_depth(doc, limits.max_json_depth) > limits.max_json_depth:
        raise RequestError(f"request JSON is nested deeper than {limits.max_json_depth} levels", "bad_request")
    rid = doc.get("request_id") or request_id or new_request_id()
    _ignored("keys", sorted(set(doc) - _JSON_KEYS), rid if isinstance(rid, str) else None)
    image = doc.get("image")
    if not isinstance(image, str) or not image:
        raise RequestError("image is missing: send the JPEG/PNG file base64-encoded (or as a data: URI) in 'image'", "bad_image")
    image_bytes = image_bytes_from_base64(image)
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, str):
        raise RequestError(f"stream must be a string id, got {type(stream).__name__}", "bad_request")
    context = context_from_value(doc.get("context"), limits)
    return EdgeRequest(
        request_id=rid if isinstance(rid, str) else str(rid)[:80],
        question=_question(doc.get("question"), limits),
        image=image_bytes,
        stream_id=stream,
        deadline_ms=_deadline(doc.get("deadline_ms"), limits),
        policy=doc.get("policy"),
        split_layer=doc.get("split_layer"),
        keep_ratio=doc.get("keep_ratio"),
        max_new_tokens=doc.get("max_new_tokens"),
        context=context,
        partials=False if doc.get("partials") is None else doc["partials"],
    )


def image_bytes_from_base64(value: str) -> bytes:
    """Base64 (standard or URL-safe, padding optional) or a ``data:image/...;base64,`` URI -> bytes."""
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RequestError("image data URI must be data:image/<type>;base64,<data>", "bad_image")
    data = value.strip().replace("-", "+").replace("_", "/")
    data += "=" * (-len(data) % 4)
    try:
        out = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image is not valid base64; send the file's bytes base64-encoded", "bad_image") from None
    if not out:
        raise RequestError("image is empty after base64 decoding", "bad_image")
    return out


def request_from_raw_image(
    payload: bytes | bytearray, properties: dict[str, str], limits: RequestLimits = RequestLimits(), request_id: str | None = None
) -> EdgeRequest:
    """A raw JPEG/PNG payload with the question (and optional ``stream``, ``deadline_ms``) in properties.

    Unknown properties are ignored; the keys that only the JSON form has (``split_layer``,
    ``context``, ...) are refused, since a property cannot carry them and would go unseen.
    """
    _check_size(payload, limits)
    if not payload:
        raise RequestError("image is empty; send the JPEG/PNG file's bytes as the payload", "bad_request")
    json_only = sorted(set(properties) & JSON_ONLY_KEYS)
    if json_only:
        raise RequestError(
            f"request properties {json_only} exist only in the JSON form; send a JSON request with the image in base64", "bad_request"
        )
    _ignored("user properties", sorted(set(properties) - _PROPERTY_KEYS), properties.get("request_id") or request_id)
    deadline = properties.get("deadline_ms")
    try:
        deadline_value = None if deadline is None else float(deadline)
    except ValueError:
        raise RequestError(f"deadline_ms property {deadline[:40]!r} is not a number", "bad_request") from None
    return EdgeRequest(
        request_id=properties.get("request_id") or request_id or new_request_id(),
        question=_question(properties.get("question"), limits),
        image=bytes(payload),
        stream_id=properties.get("stream"),
        deadline_ms=_deadline(deadline_value, limits),
        policy=properties.get("policy"),
    )
