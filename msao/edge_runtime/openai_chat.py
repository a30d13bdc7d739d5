"""OpenAI chat completions <-> msao: one chat body becomes one ``ChatCall`` (an ``EdgeRequest`` and
how to answer it), one ``EdgeResponse`` becomes a ``chat.completion``, its stream of chunks, or an
OpenAI-shaped error.

    call_from_chat(body, limits, request_id)      bytes of a POST /v1/chat/completions -> ChatCall
    completion_from_response(response, call)      an answered EdgeResponse -> chat.completion JSON
    chunks_from_response(response, call)          ... -> chat.completion.chunk objects (stream: true)
    ChunkStream(call, model)                      the same chunks while a speculative answer's text grows
    error_body(message, code, response)           any refusal or failed response -> {"error": {...}}
    OPENAI_ERRORS[code]                           HTTP status and OpenAI error type of each code

A conversation is answered about its newest image: the last user turn's question, and the image
of the latest user turn that sent one (a follow-up question sends the earlier turn's image bytes
again, and the runtime reuses that image's cached tokens). A conversation without any image is a
text-only turn, answered by the language model alone.

Owns the mapping only: knows nothing of sockets, headers or connection limits (``http_api`` serves
it) and nothing of models or placement (``EdgeRuntime`` answers the request). Bodies are untrusted
bytes: every refusal is a ``RequestError`` whose ``code`` picks the status and the error type, with
a message that says what to send instead. Standard library only, so the edge install stays small.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from msao.edge_runtime.requests import EdgeRequest, EdgeResponse, RequestLimits, image_bytes_from_base64
from msao.errors import RequestError

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_JSON_ITEMS",
    "MSAO_KEYS",
    "OPENAI_ERRORS",
    "ChatCall",
    "ChunkStream",
    "OpenAIErrorKind",
    "call_from_chat",
    "chunks_from_response",
    "completion_from_response",
    "error_body",
]

MAX_JSON_DEPTH = 10  # an OpenAI request with an image part needs 7
MAX_JSON_ITEMS = 1000  # values in the whole body: one question and one image need a few dozen
MSAO_KEYS = frozenset({"deadline_ms", "stream", "policy", "split_layer", "keep_ratio", "request_id"})
MAX_STOP_SEQUENCES = 4  # as OpenAI's API


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
    "unauthorized": OpenAIErrorKind(401, "invalid_request_error"),
}


@dataclass(frozen=True)
class ChatCall:
    """What one chat body asks for: the request the runtime answers, and how to hand the answer back.

    Attributes:
        request: the question, the conversation's newest image (``b""``: text-only), the budget.
        stream: answer as server-sent ``chat.completion.chunk`` events.
        include_usage: with ``stream``, a last chunk carrying ``usage`` (``stream_options``).
        stop: the answer is cut before the first of these strings (``finish_reason`` "stop").
        follow_up: the image came from an earlier user turn, not the last one.
    """

    request: EdgeRequest
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    follow_up: bool = False


def call_from_chat(
    body: bytes,
    limits: RequestLimits,
    request_id: str,
    max_json_depth: int = MAX_JSON_DEPTH,
    max_json_items: int = MAX_JSON_ITEMS,
) -> ChatCall:
    """An OpenAI chat body -> ``ChatCall``: the last user turn's text, the newest image, the budget.

    Read: ``messages``, ``stream``, ``stream_options.include_usage``, ``max_tokens`` /
    ``max_completion_tokens`` (the answer's token budget), ``stop`` and ``n`` (1 only). Ignored,
    as a single greedy answer makes them moot: ``model`` (the daemon answers with its own models;
    ``GET /v1/models`` lists them), ``temperature``, ``top_p``, ``seed`` and the rest. The optional
    ``msao`` object sets the request's ``deadline_ms``, ``stream`` (a video stream's id),
    ``policy``, ``split_layer``, ``keep_ratio`` and ``request_id``.

    Args:
        body: the raw request body (untrusted; any bytes).
        limits: the runtime's intake limits (image bytes, question length, deadlines).
        request_id: the id to use when the body's ``msao.request_id`` gives none.
        max_json_depth: nesting the body may have, checked level by level after parsing.
        max_json_items: values the whole body may hold (members of lists and objects, summed).

    Raises:
        RequestError: ``bad_request`` (not UTF-8/JSON, wrong shape, ``n`` > 1, a bad budget or
            stop), ``bad_image`` (two images in one turn, a URL instead of a data: URI, bad
            base64), ``too_large`` (decoded image). ``OPENAI_ERRORS[code]`` gives its HTTP status.
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
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {str(stream)[:40]}", "bad_request")
    options = doc.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError("'stream_options' must be an object like {\"include_usage\": true}", "bad_request")
    n = doc.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise RequestError(f"n={str(n)[:20]}: msao gives one (greedy) answer per request; send n=1 or leave it out", "bad_request")
    budget = _token_budget(doc)
    stop = _stop_sequences(doc.get("stop"))
    ext = doc.get("msao") or {}
    if not isinstance(ext, dict):
        raise RequestError(f"'msao' must be an object with keys {sorted(MSAO_KEYS)}", "bad_request")
    unknown = sorted(set(ext) - MSAO_KEYS)
    if unknown:
        raise RequestError(f"unknown 'msao' keys {[str(k)[:40] for k in unknown[:8]]}; known: {sorted(MSAO_KEYS)}", "bad_request")
    question, image, follow_up = _conversation(doc.get("messages"), limits)
    deadline = ext.get("deadline_ms", limits.default_deadline_ms)
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline <= limits.max_deadline_ms:
        raise RequestError(f"msao.deadline_ms must be a number in (0, {limits.max_deadline_ms:g}], got {str(deadline)[:40]}", "bad_request")
    for key, kind in (("stream", str), ("policy", str), ("request_id", str), ("split_layer", int), ("keep_ratio", (int, float))):
        value = ext.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise RequestError(f"msao.{key} has the wrong type ({type(value).__name__})", "bad_request")
    request = EdgeRequest(  # checks ids, policy, split layer, keep ratio and the budget itself (RequestError)
        request_id=ext.get("request_id") or request_id,
        question=question,
        image=image,
        stream_id=ext.get("stream"),
        deadline_ms=float(deadline),
        policy=ext.get("policy"),
        split_layer=ext.get("split_layer"),
        keep_ratio=ext.get("keep_ratio"),
        max_new_tokens=budget,
    )
    return ChatCall(request, stream=stream, include_usage=bool(options.get("include_usage")) and stream, stop=stop, follow_up=follow_up)


def _token_budget(doc: dict) -> int | None:
    budgets = {k: doc[k] for k in ("max_completion_tokens", "max_tokens") if doc.get(k) is not None}
    for key, value in budgets.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(f"{key} must be a positive integer, got {str(value)[:40]}", "bad_request")
    if len(set(budgets.values())) > 1:
        raise RequestError(f"max_tokens and max_completion_tokens disagree ({budgets}); send one", "bad_request")
    return next(iter(budgets.values()), None)


def _stop_sequences(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or len(items) > MAX_STOP_SEQUENCES or not all(isinstance(x, str) and x for x in items):
        raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them", "bad_request")
    return tuple(items)


def completion_from_response(response: EdgeResponse, call: ChatCall | None = None) -> dict[str, Any]:
    """An answered ``EdgeResponse`` as an OpenAI ``chat.completion``, with ``msao`` added.

    ``usage`` counts the tokens of the model whose answer was committed: the prompt as its
    prefill processed it (image tokens after the keep-set included) and the answer's tokens.
    """
    answer, finish = _answer_and_finish(response, call)
    return {
        "id": "chatcmpl-" + response.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": response.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
        "usage": _usage(response),
        "msao": response.to_dict(),
    }


def chunks_from_response(response: EdgeResponse, call: ChatCall) -> list[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of an answer committed whole, as OpenAI sends them:
    the role, the text (one chunk), the finish reason (with ``msao`` added), then ``usage`` alone
    when ``stream_options.include_usage`` asked for it."""
    stream = ChunkStream(call, response.model)
    return [stream.start(), *stream.end(response)]


class ChunkStream:
    """The chunks of one streamed answer while its text grows (the speculative plan's verified
    tokens), then its end: the same chunks ``chunks_from_response`` sends, the text split over
    several content deltas.

    Every text ``grow`` sees is final (a prefix of the answer), so the deltas concatenate to the
    answer. With stop sequences, a tail that could begin one is held back until the next text
    says whether it does, so no delta ever has to be taken back.
    """

    def __init__(self, call: ChatCall, model: str):
        self.call, self.model = call, model
        self.created = int(time.time())
        self.sent = ""  # the content the client has
        self.stopped = False  # a stop sequence was reached: nothing more is sent

    def _chunk(self, delta: dict, finish_reason: str | None, model: str | None = None, **more: Any) -> dict[str, Any]:
        head = {"id": "chatcmpl-" + self.call.request.request_id, "object": "chat.completion.chunk", "created": self.created}
        return {**head, "model": model or self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **more}

    def start(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def grow(self, text: str) -> list[dict[str, Any]]:
        """The content delta (none or one chunk) for the answer's text so far."""
        if self.stopped:
            return []
        visible, stopped = _cut_at_stop(text, self.call.stop)
        if not stopped:
            visible = visible[: len(visible) - _stop_prefix_length(visible, self.call.stop)]
        self.stopped = stopped
        if len(visible) <= len(self.sent) or not visible.startswith(self.sent):
            return []
        delta, self.sent = visible[len(self.sent) :], visible
        return [self._chunk({"content": delta}, None)]

    def end(self, response: EdgeResponse) -> list[dict[str, Any]]:
        """The rest of the text, the finish reason with ``msao``, and ``usage`` if asked for."""
        answer, finish = _answer_and_finish(response, self.call)
        out = []
        if not self.sent:
            out.append(self._chunk({"content": answer}, None, response.model))
        elif answer.startswith(self.sent) and len(answer) > len(self.sent):
            out.append(self._chunk({"content": answer[len(self.sent) :]}, None, response.model))
        out.append(self._chunk({}, finish, response.model, msao=response.to_dict()))
        if self.call.include_usage:
            head = {"id": "chatcmpl-" + response.request_id, "object": "chat.completion.chunk", "created": self.created}
            out.append({**head, "model": response.model, "choices": [], "usage": _usage(response)})
        return out


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to its first stop sequence, and whether it had one."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest tail of ``text`` that begins a stop sequence (0: none)."""
    return max((j for s in stops for j in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:j])), default=0)


def _answer_and_finish(response: EdgeResponse, call: ChatCall | None) -> tuple[str, str]:
    answer, stopped = _cut_at_stop(response.answer, call.stop if call else ())
    return answer, "stop" if stopped else response.finish_reason or "stop"


def _usage(response: EdgeResponse) -> dict[str, int]:
    prompt, completion = response.prompt_tokens, response.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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


def _conversation(messages: Any, limits: RequestLimits) -> tuple[str, bytes, bool]:
    """(question of the last user turn, newest image or b"", whether that image is from an earlier turn)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of chat messages", "bad_request")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise RequestError("no message has role 'user'; put the question (and any image) in a user message", "bad_request")
    turns = [_user_turn(m.get("content")) for m in user]
    texts, urls = turns[-1]
    follow_up = False
    if not urls:  # a follow-up about the newest earlier image, or a text-only conversation
        earlier = [u for _, us in turns[:-1] for u in us]
        urls, follow_up = earlier[-1:], bool(earlier)
    image = _image(urls[0], limits) if urls else b""
    question = " ".join(t.strip() for t in texts if t.strip())
    if not question:
        raise RequestError("the user message has no question; add a text part", "bad_request")
    if len(question) > limits.max_question_chars:
        raise RequestError(f"question is {len(question)} characters, over the limit of {limits.max_question_chars}", "bad_request")
    return question, image, follow_up


def _user_turn(content: Any) -> tuple[list[str], list[str]]:
    """(text parts, image URLs) of one user message; at most one image per message."""
    if isinstance(content, str):
        return [content], []
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
    if len(urls) > 1:
        raise RequestError(f"a user message has {len(urls)} images; msao answers about one image per request; send one", "bad_image")
    return texts, urls


def _image(url: str, limits: RequestLimits) -> bytes:
    if not url.startswith("data:"):
        raise RequestError("msao never fetches URLs; send the image inline as a data: URI (data:image/png;base64,...)", "bad_image")
    image = image_bytes_from_base64(url)  # RequestError bad_image
    if len(image) > limits.max_payload_bytes:
        raise RequestError(
            f"image is {len(image)} bytes, over the limit of {limits.max_payload_bytes}; send a smaller (e.g. JPEG) image", "too_large"
        )
    return image


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
