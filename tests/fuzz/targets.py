"""Fuzz targets: untrusted bytes through each parser; anything but the parser's typed error is a bug.

Shared by the Hypothesis properties (``test_fuzz_properties.py``) and the atheris runner
(``run_fuzz.py``). A target returns normally when the parser accepted the bytes or refused them
with its typed error (checking the invariants of either outcome), and raises anything else.

    target          parser                                             allowed error
    edge_request    request_from_json / request_from_raw_image (+ props)    RequestError (code in ERROR_CODES); unknown keys
                                                                       and properties are accepted, so an accepted
                                                                       request's context must still be bounded JSON
    chat_body       openai_chat.call_from_chat                           RequestError (code in OPENAI_ERRORS: an HTTP status)
    codec           tensors_from_payload, then Job/ResultHeader          CodecError (PayloadTooLarge included)
    chunks          ChunkHeader.from_property + Reassembler.add        CodecError
    image           decode_image (1 Mpx limit)                          ImageError
    ids             check_id, job_topic, response_topic_problem            ConfigError
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from msao.cloud_bridge.chunking import MAX_CHUNKS, ChunkHeader, Reassembler
from msao.cloud_bridge.codec import CodecLimits, tensors_from_payload
from msao.cloud_bridge.messages import JobHeader, ResultHeader
from msao.cloud_bridge.topics import check_id, job_topic
from msao.edge_runtime.mqtt_intake import _JSON_START, response_topic_problem
from msao.edge_runtime.openai_chat import OPENAI_ERRORS, call_from_chat
from msao.edge_runtime.requests import ERROR_CODES, EdgeRequest, RequestLimits, request_from_json, request_from_raw_image
from msao.engines.images import decode_image
from msao.errors import CodecError, ConfigError, ImageError, RequestError

__all__ = ["TARGETS", "fuzz_chat_body", "fuzz_chunks", "fuzz_codec", "fuzz_edge_request", "fuzz_ids", "fuzz_image", "props_and_payload"]

LIMITS = RequestLimits(max_payload_bytes=64 * 1024)
CODEC_LIMITS = CodecLimits(max_payload_bytes=64 * 1024)
# known properties, JSON-only keys (refused as properties) and unknown ones (ignored)
PROPERTY_KEYS = ("question", "stream", "deadline_ms", "request_id", "policy", "traceparent", "qustion", "split_layer", "context", "_msgid")
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class FuzzFinding(AssertionError):
    """A parser broke its contract (wrong error type, empty message, broken invariant)."""


def _check(ok: object, what: str) -> None:
    if not ok:
        raise FuzzFinding(what)


def props_and_payload(data: bytes) -> tuple[dict[str, str], bytes]:
    """``key=value`` lines, a blank line, then the payload (no blank line: the whole input is the payload)."""
    head, sep, payload = data.partition(b"\n\n")
    if not sep:
        return {}, data
    props = {}
    for line in head.split(b"\n")[:8]:
        k, _, v = line.decode("utf-8", "replace").partition("=")
        props[k if k in PROPERTY_KEYS else PROPERTY_KEYS[len(k) % len(PROPERTY_KEYS)]] = v
    return props, payload


def _check_request(r: EdgeRequest, text_only_ok: bool = False) -> None:
    """``text_only_ok``: the intake may take a turn without an image (chat), answered by the language model alone."""
    _check(_SAFE_ID.fullmatch(r.request_id), f"accepted request id {r.request_id!r}")
    _check(isinstance(r.question, str) and r.question.strip() and len(r.question) <= LIMITS.max_question_chars, "accepted question")
    _check(isinstance(r.image, bytes) and (text_only_ok or r.image) and len(r.image) <= LIMITS.max_payload_bytes, "accepted image")
    _check(0 < r.deadline_ms <= LIMITS.max_deadline_ms, f"accepted deadline {r.deadline_ms}")
    _check(r.stream_id is None or _SAFE_ID.fullmatch(r.stream_id), f"accepted stream id {r.stream_id!r}")
    if r.context is not None:  # echoed in every response: it must be plain JSON within the bound
        try:
            size = len(json.dumps(r.context, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8"))
        except ValueError:
            raise FuzzFinding(f"accepted a context that is not plain JSON: {str(r.context)[:80]}") from None
        _check(size <= LIMITS.max_context_bytes, f"accepted a context of {size} bytes")


def fuzz_edge_request(data: bytes) -> None:
    """An MQTT request (user properties, then the payload) as ``MqttIntake._parse`` reads it."""
    props, payload = props_and_payload(data)
    try:
        r = request_from_json(payload, LIMITS) if _JSON_START.match(payload) else request_from_raw_image(payload, props, LIMITS)
    except RequestError as exc:
        _check(exc.code in ERROR_CODES and str(exc).strip(), f"RequestError code {exc.code!r}, message {str(exc)!r}")
        return
    _check_request(r)


def fuzz_chat_body(data: bytes) -> None:
    """A POST /v1/chat/completions body."""
    try:
        r = call_from_chat(data, LIMITS, "fuzz").request
    except RequestError as exc:
        _check(exc.code in OPENAI_ERRORS and str(exc).strip(), f"RequestError code {exc.code!r}, message {str(exc)!r}")
        return
    _check_request(r, text_only_ok=True)


def fuzz_codec(data: bytes) -> None:
    """A job or result payload: codec, then both header parsers on its metadata."""
    try:
        out = tensors_from_payload(data, CODEC_LIMITS)
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


def fuzz_chunks(data: bytes) -> None:
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


def fuzz_image(data: bytes) -> None:
    """Image bytes as the edge's and the worker's decoder sees them (1 Mpx limit keeps each run fast)."""
    try:
        rgb = decode_image(data, max_pixels=1 << 20)
    except ImageError as exc:
        _check(str(exc).strip(), "ImageError without a message")
        return
    _check(rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.shape[0] * rgb.shape[1] <= 1 << 20, f"decoded {rgb.shape}")


def fuzz_ids(data: bytes) -> None:
    """Text as an id, a model hash and a ResponseTopic."""
    text = data.decode("utf-8", "replace")
    try:
        check_id(text)
        _check(_SAFE_ID.fullmatch(text), f"id {text!r} accepted")
    except ConfigError as exc:
        _check(str(exc).strip(), "ConfigError without a message")
    try:
        job_topic(text)
        _check(re.fullmatch(r"[0-9a-f]{64}", text), f"model hash {text!r} accepted")
    except ConfigError:
        pass
    problem = response_topic_problem(text)
    _check(problem or not (set(text) & {"+", "#", "\x00"} or text.startswith("$") or not text), f"ResponseTopic {text!r} accepted")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "edge_request": fuzz_edge_request,
    "chat_body": fuzz_chat_body,
    "codec": fuzz_codec,
    "chunks": fuzz_chunks,
    "image": fuzz_image,
    "ids": fuzz_ids,
}
