"""OpenAI chat completions <-> msao: one chat body becomes one ``EdgeRequest``, one ``EdgeResponse``
becomes a ``chat.completion`` or an OpenAI-shaped error.

    request_from_chat(body, limits, request_id)   bytes of a POST /v1/chat/completions -> EdgeRequest
    completion_from_response(response)            an answered EdgeResponse -> chat.completion JSON
    error_body(message, code, response)           any refusal or failed response -> {"error": {...}}
    OPENAI_ERRORS[code]                           HTTP status and OpenAI error type of each code

Owns the mapping only: knows nothing of sockets, headers or connection limits (``http_api`` serves
it) and nothing of models or placement (``EdgeRuntime`` answers the request). Bodies are untrusted
bytes: every refusal is a ``RequestError`` whose ``code`` picks the status and the error type, with
a message that says what to send instead. Standard library only, so the edge install stays small.
"""

from __future__ import annotations

import json
import time
from typing import Any, NamedTuple

from msao.edge_runtime.requests import EdgeRequest, EdgeResponse, RequestLimits, image_bytes_from_base64
from msao.errors import RequestError

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_JSON_ITEMS",
    "MSAO_KEYS",
    "OPENAI_ERRORS",
    "OpenAIErrorKind",
    "completion_from_response",
    "error_body",
    "request_from_chat",
]

MAX_JSON_DEPTH = 10  # an OpenAI request with an image part needs 7
MAX_JSON_ITEMS = 1000  # values in the whole body: one question and one image need a few dozen
MSAO_KEYS = frozenset({"deadline_ms", "stream", "policy", "split_layer", "keep_ratio", "request_id"})


class OpenAIErrorKind(NamedTuple):
    """How OpenAI's API reports one kind of error: the HTTP status and ``error.type``."""

    http_status: int
    type: str


# Per msao error code (requests.ERROR_CODES), then the codes only the HTTP server raises (routing,
# framing): clients written for OpenAI branch on the status and ``error.type``, msao's own on ``error.code``.
OPENAI_ERRORS: dict[str, OpenAIErrorKind] = {
    "bad_request": OpenAIErrorKind(400, "invalid_request_error"),
    "bad_image": OpenAIErrorKind(400, "invalid_request_error"),
    "too_large": OpenAIErrorKind(413, "invalid_request_error"),
    "busy": OpenAIErrorKind(429, "rate_limit_error"),
    "unavailable": OpenAIErrorKind(503, "server_error"),
    "deadline": OpenAIErrorKind(504, "timeout_error"),
    "internal": OpenAIErrorKind(500, "server_error"),
    "not_found": OpenAIErrorKind(404, "invalid_request_error"),
    "method_not_allowed": OpenAIErrorKind(405, "invalid_request_error"),
    "length_required": OpenAIErrorKind(411, "invalid_request_error"),
    "timeout": OpenAIErrorKind(408, "invalid_request_error"),
}


def request_from_chat(
    body: bytes,
    limits: RequestLimits,
    request_id: str,
    max_json_depth: int = MAX_JSON_DEPTH,
    max_json_items: int = MAX_JSON_ITEMS,
) -> EdgeRequest:
    """An OpenAI chat body -> ``EdgeRequest``: the last user message's text parts and its one image.

    Earlier turns and OpenAI sampling fields (``model``, ``max_tokens``, ``temperature``) are
    ignored: msao answers one question about one image. The optional ``msao`` object sets the
    request's ``deadline_ms``, ``stream``, ``policy``, ``split_layer``, ``keep_ratio`` and
    ``request_id``.

    Args:
        body: the raw request body (untrusted; any bytes).
        limits: the runtime's intake limits (image bytes, question length, deadlines).
        request_id: the id to use when the body's ``msao.request_id`` gives none.
        max_json_depth: nesting the body may have, checked level by level after parsing.
        max_json_items: values the whole body may hold (members of lists and objects, summed).

    Raises:
        RequestError: ``bad_request`` (not UTF-8/JSON, wrong shape, streaming), ``bad_image`` (no
            image, two images, a URL instead of a data: URI, bad base64), ``too_large`` (decoded
            image). ``OPENAI_ERRORS[code]`` gives its HTTP status.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"body is not UTF-8 text (byte {exc.start}); encode the JSON as UTF-8", "bad_request") from None
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and ints over 4300 digits (plain ValueError)
        raise RequestError(f"body is not JSON ({str(exc)[:80]}); send an OpenAI chat completion request", "bad_request") from None
    if not isinstance(doc, dict):
        raise RequestError(f"body must be a JSON object, got {type(doc).__name__}", "bad_request")
    _check_shape(doc, max_json_depth, max_json_items)
    if doc.get("stream") not in (None, False):
        raise RequestError("streaming is not supported; send stream=false", "bad_request")
    ext = doc.get("msao") or {}
    if not isinstance(ext, dict):
        raise RequestError(f"'msao' must be an object with keys {sorted(MSAO_KEYS)}", "bad_request")
    unknown = sorted(set(ext) - MSAO_KEYS)
    if unknown:
        raise RequestError(f"unknown 'msao' keys {[str(k)[:40] for k in unknown[:8]]}; known: {sorted(MSAO_KEYS)}", "bad_request")
    question, image = _last_user_turn(doc.get("messages"), limits)
    deadline = ext.get("deadline_ms", limits.default_deadline_ms)
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline <= limits.max_deadline_ms:
        raise RequestError(f"msao.deadline_ms must be a number in (0, {limits.max_deadline_ms:g}], got {str(deadline)[:40]}", "bad_request")
    for key, kind in (("stream", str), ("policy", str), ("request_id", str), ("split_layer", int), ("keep_ratio", (int, float))):
        value = ext.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise RequestError(f"msao.{key} has the wrong type ({type(value).__name__})", "bad_request")
    return EdgeRequest(  # checks ids, policy, split layer and keep ratio itself (RequestError)
        request_id=ext.get("request_id") or request_id,
        question=question,
        image=image,
        stream_id=ext.get("stream"),
        deadline_ms=float(deadline),
        policy=ext.get("policy"),
        split_layer=ext.get("split_layer"),
        keep_ratio=ext.get("keep_ratio"),
    )


def completion_from_response(response: EdgeResponse) -> dict[str, Any]:
    """An answered ``EdgeResponse`` as an OpenAI ``chat.completion``, with ``msao`` added.

    ``usage`` is all zeros: the intake does not count tokens (the prompt's size depends on the
    plan's keep-set), and zeros keep clients that read the field working.
    """
    return {
        "id": "chatcmpl-" + response.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": response.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": response.answer}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "msao": response.to_dict(),
    }


def error_body(message: str, code: str, response: EdgeResponse | None = None) -> dict[str, Any]:
    """An OpenAI error object for ``code`` (an unknown code reads as ``internal``'s type).

    Args:
        message: what went wrong and what to send instead (shown to the client as is).
        code: an ``OPENAI_ERRORS`` key; it becomes ``error.code``.
        response: the runtime's failed response, added as ``msao`` when the runtime produced one
            (a refusal before the runtime saw the request has none).
    """
    kind = OPENAI_ERRORS.get(code, OPENAI_ERRORS["internal"])
    body: dict[str, Any] = {"error": {"message": message, "type": kind.type, "code": code, "param": None}}
    if response is not None:
        body["msao"] = response.to_dict()
    return body


def _last_user_turn(messages: Any, limits: RequestLimits) -> tuple[str, bytes]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of chat messages", "bad_request")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise RequestError("no message has role 'user'; put the question and the image in a user message", "bad_request")
    content = user[-1].get("content")
    if isinstance(content, str):
        raise RequestError("the user message has no image; send the image as an image_url content part (a data: URI)", "bad_image")
    if not isinstance(content, list):
        raise RequestError("the user message's content must be a string or a list of text and image_url parts", "bad_request")
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise RequestError("image_url must be a data: URI string or {'url': 'data:image/png;base64,...'}", "bad_image")
            urls.append(url)
        else:
            raise RequestError(
                f"content part type {str(kind)[:40]!r} is not supported; send 'text' and one 'image_url' part", "bad_request"
            )
    if len(urls) != 1:
        hint = "send the image as an image_url content part" if not urls else "msao answers about one image per request; send one"
        raise RequestError(f"the user message has {len(urls)} images; {hint}", "bad_image")
    url = urls[0]
    if not url.startswith("data:"):
        raise RequestError("msao never fetches URLs; send the image inline as a data: URI (data:image/png;base64,...)", "bad_image")
    image = image_bytes_from_base64(url)  # RequestError bad_image
    if len(image) > limits.max_payload_bytes:
        raise RequestError(
            f"image is {len(image)} bytes, over the limit of {limits.max_payload_bytes}; send a smaller (e.g. JPEG) image", "too_large"
        )
    question = " ".join(t.strip() for t in texts if t.strip())
    if not question:
        raise RequestError("the user message has no question; add a text part", "bad_request")
    if len(question) > limits.max_question_chars:
        raise RequestError(f"question is {len(question)} characters, over the limit of {limits.max_question_chars}", "bad_request")
    return question, image


def _check_shape(doc: Any, max_depth: int, max_items: int) -> None:
    """Bound nesting and size of parsed JSON, level by level (no recursion on hostile input)."""
    depth, items, level = 0, 0, [doc]
    while level:
        depth += 1
        if depth > max_depth:
            raise RequestError(f"body JSON is nested deeper than {max_depth} levels", "bad_request")
        nxt: list[Any] = []
        for o in level:
            if isinstance(o, dict):
                nxt.extend(o.values())
            elif isinstance(o, list):
                nxt.extend(o)
        items += len(nxt)
        if items > max_items:
            raise RequestError(f"body JSON has more than {max_items} values; send one question and one image", "bad_request")
        level = nxt
