"""Fuzz targets: untrusted bytes through each parser; anything but the parser's typed error is a bug.

Shared by the Hypothesis properties (``test_fuzz_properties.py``) and the atheris runner
(``run_fuzz.py``). A target returns normally when the parser accepted the bytes or refused them
with its typed error (checking the invariants of either outcome), and raises anything else.

    target          parser                                             allowed error
    edge_request    RequestFromJson / RequestFromRawImage (+ props)    RequestError (code in ERROR_CODES)
    chat_body       http_api._RequestFromChat                          _Refusal (code with an HTTP status)
    codec           TensorsFromPayload, then Job/ResultHeader          CodecError (PayloadTooLarge included)
    chunks          ChunkHeader.from_property + Reassembler.add        CodecError
    image           DecodeImage (1 Mpx limit)                          ImageError
    ids             CheckId, JobTopic, ResponseTopicProblem            ConfigError
"""

from __future__ import annotations

import re
from collections.abc import Callable

from msao.cloud_bridge.chunking import MAX_CHUNKS, ChunkHeader, Reassembler
from msao.cloud_bridge.codec import CodecLimits, TensorsFromPayload
from msao.cloud_bridge.messages import JobHeader, ResultHeader
from msao.cloud_bridge.topics import CheckId, JobTopic
from msao.edge_runtime.http_api import _STATUS, HttpOptions, _Refusal, _RequestFromChat
from msao.edge_runtime.mqtt_intake import _JSON_START, ResponseTopicProblem
from msao.edge_runtime.requests import ERROR_CODES, EdgeRequest, RequestFromJson, RequestFromRawImage, RequestLimits
from msao.engines.images import DecodeImage
from msao.errors import CodecError, ConfigError, ImageError, RequestError

__all__ = ["TARGETS", "FuzzChatBody", "FuzzChunks", "FuzzCodec", "FuzzEdgeRequest", "FuzzIds", "FuzzImage", "PropsAndPayload"]

LIMITS = RequestLimits(max_payload_bytes=64 * 1024)
CODEC_LIMITS = CodecLimits(max_payload_bytes=64 * 1024)
PROPERTY_KEYS = ("question", "stream", "deadline_ms", "request_id", "policy", "traceparent", "qustion")
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class FuzzFinding(AssertionError):
    """A parser broke its contract (wrong error type, empty message, broken invariant)."""


def _check(ok: object, what: str) -> None:
    if not ok:
        raise FuzzFinding(what)


def PropsAndPayload(data: bytes) -> tuple[dict[str, str], bytes]:  # noqa: N802
    """``key=value`` lines, a blank line, then the payload (no blank line: the whole input is the payload)."""
    head, sep, payload = data.partition(b"\n\n")
    if not sep:
        return {}, data
    props = {}
    for line in head.split(b"\n")[:8]:
        k, _, v = line.decode("utf-8", "replace").partition("=")
        props[k if k in PROPERTY_KEYS else PROPERTY_KEYS[len(k) % len(PROPERTY_KEYS)]] = v
    return props, payload


def _CheckRequest(r: EdgeRequest) -> None:  # noqa: N802
    _check(_SAFE_ID.fullmatch(r.request_id), f"accepted request id {r.request_id!r}")
    _check(isinstance(r.question, str) and r.question.strip() and len(r.question) <= LIMITS.max_question_chars, "accepted question")
    _check(isinstance(r.image, bytes) and 0 < len(r.image) <= LIMITS.max_payload_bytes, "accepted image")
    _check(0 < r.deadline_ms <= LIMITS.max_deadline_ms, f"accepted deadline {r.deadline_ms}")
    _check(r.stream_id is None or _SAFE_ID.fullmatch(r.stream_id), f"accepted stream id {r.stream_id!r}")


def FuzzEdgeRequest(data: bytes) -> None:  # noqa: N802
    """An MQTT request (user properties, then the payload) as ``MqttIntake._parse`` reads it."""
    props, payload = PropsAndPayload(data)
    try:
        r = RequestFromJson(payload, LIMITS) if _JSON_START.match(payload) else RequestFromRawImage(payload, props, LIMITS)
    except RequestError as exc:
        _check(exc.code in ERROR_CODES and str(exc).strip(), f"RequestError code {exc.code!r}, message {str(exc)!r}")
        return
    _CheckRequest(r)


def FuzzChatBody(data: bytes) -> None:  # noqa: N802
    """A POST /v1/chat/completions body."""
    try:
        r = _RequestFromChat(data, LIMITS, HttpOptions(), "fuzz")
    except _Refusal as exc:
        _check(exc.code in _STATUS and str(exc).strip(), f"_Refusal code {exc.code!r}, message {str(exc)!r}")
        return
    _CheckRequest(r)


def FuzzCodec(data: bytes) -> None:  # noqa: N802
    """A job or result payload: codec, then both header parsers on its metadata."""
    try:
        out = TensorsFromPayload(data, CODEC_LIMITS)
    except CodecError as exc:
        _check(str(exc).strip(), "CodecError without a message")
        return
    _check(out.body_bytes <= CODEC_LIMITS.max_payload_bytes, f"body of {out.body_bytes} bytes accepted")
    _check(sum(x.nbytes for x in out.tensors.values()) <= out.body_bytes, "tensors larger than the body")
    _check(all(not x.flags.writeable for x in out.tensors.values()), "a decoded tensor is writeable")
    for cls in (JobHeader, ResultHeader):
        try:
            cls.from_metadata(out.metadata)
        except CodecError as exc:
            _check(str(exc).strip(), f"{cls.__name__}: CodecError without a message")


def FuzzChunks(data: bytes) -> None:  # noqa: N802
    """Lines ``<msao-chunk property>|<n>``: n zero bytes with that property, into one Reassembler."""
    r = Reassembler(4096, max_partial_messages=4, max_buffered_bytes=8192)
    for i, line in enumerate(data.split(b"\n")[:64]):
        prop, _, n = line.decode("utf-8", "replace").partition("|")
        size = int(n) % 5000 if n.isascii() and n.isdecimal() else len(n)
        try:
            h = ChunkHeader.from_property(prop)
            _check(0 <= h.index < h.count <= MAX_CHUNKS and h.begin + h.size <= h.total_bytes, f"header {prop!r} accepted")
            whole = r.add("fuzz/topic", h, bytes(size), now=float(i))
        except CodecError as exc:
            _check(str(exc).strip(), "CodecError without a message")
            continue
        _check(whole is None or len(whole) == h.total_bytes, "a message of the wrong size completed")
        _check(len(r) <= r.max_partial_messages and r.buffered_bytes <= r.max_buffered_bytes, "reassembly over its bounds")


def FuzzImage(data: bytes) -> None:  # noqa: N802
    """Image bytes as the edge's and the worker's decoder sees them (1 Mpx limit keeps each run fast)."""
    try:
        rgb = DecodeImage(data, max_pixels=1 << 20)
    except ImageError as exc:
        _check(str(exc).strip(), "ImageError without a message")
        return
    _check(rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[0] * rgb.shape[1] <= 1 << 20, f"decoded {rgb.shape}")


def FuzzIds(data: bytes) -> None:  # noqa: N802
    """Text as an id, a model hash and a ResponseTopic."""
    text = data.decode("utf-8", "replace")
    try:
        CheckId(text)
        _check(_SAFE_ID.fullmatch(text), f"id {text!r} accepted")
    except ConfigError as exc:
        _check(str(exc).strip(), "ConfigError without a message")
    try:
        JobTopic(text)
        _check(re.fullmatch(r"[0-9a-f]{64}", text), f"model hash {text!r} accepted")
    except ConfigError:
        pass
    problem = ResponseTopicProblem(text)
    _check(problem or not (set(text) & {"+", "#", "\x00"} or text.startswith("$") or not text), f"ResponseTopic {text!r} accepted")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "edge_request": FuzzEdgeRequest,
    "chat_body": FuzzChatBody,
    "codec": FuzzCodec,
    "chunks": FuzzChunks,
    "image": FuzzImage,
    "ids": FuzzIds,
}
