"""The edge daemon's HTTP intake: the OpenAI chat API as vLLM, llama.cpp's server and ollama serve it.

    POST /v1/chat/completions   a question (about an image, a follow-up, or text only) -> chat.completion,
                                or with ``stream: true`` server-sent chat.completion.chunk events + [DONE]
    GET  /v1/models             the edge and large models, with their bundle hashes
    GET  /healthz               200 while the server runs (liveness), from before the models load
    GET  /readyz                200 with ``EdgeRuntime.health()`` when the runtime serves, else 503 and why
    GET  /ui                    the live web view (one self-contained HTML page, ``web_view``)
    GET  /ui/state              what the page polls: recent requests, link estimate, cloud queue, edge load

Optional ``api_key`` (``msao edge --api-key`` or ``MSAO_API_KEY``): every ``/v1/`` route then
needs ``Authorization: Bearer <key>`` (the health routes stay open for probes, as vLLM's), and so
does ``/ui/state``; the ``/ui`` page itself holds no data and asks for the key. Optional
``cors_origins``: browsers on those origins may call the API (preflights answered, credentials not).

Metrics are not served here: they have their own listener (``msao edge --metrics HOST:PORT``,
``msao/prometheus.py``). Each answer is counted by route and status (``msao_http_responses_total``),
each chat POST as an intake request.

Owns the routes and which status each outcome gets; the framing (HTTP/1.1, keep-alive, chunked
bodies, ``Expect: 100-continue``, connection limits) is ``msao.http_server``'s, the body's meaning
``openai_chat``'s, the answer the runtime's (``EdgeRuntime.submit``, the same admission as
every other intake; a stream also takes its partial texts). Bind it before the models load
(``start`` with no runtime; ``serve`` hands it the runtime once ready): a port in use fails at
once, and probes see 503 "loading".
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from msao.edge_runtime.openai_chat import (
    MAX_JSON_DEPTH,
    MAX_JSON_ITEMS,
    OPENAI_ERRORS,
    ChunkStream,
    call_from_chat,
    chunks_from_response,
    completion_from_response,
    error_body,
)
from msao.edge_runtime.requests import EdgeResponse, new_request_id
from msao.edge_runtime.runtime import EdgeRuntime
from msao.edge_runtime.web_view import page, since_from_query, state
from msao.errors import ConfigError, RequestError
from msao.http_server import HttpLimits, HttpServer, Request, Response
from msao.listener import BackgroundListener

__all__ = ["CHAT_PATH", "UI_PATH", "UI_STATE_PATH", "HttpIntake", "HttpOptions"]

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
UI_PATH, UI_STATE_PATH = "/ui", "/ui/state"
_ROUTES = {CHAT_PATH: "POST", MODELS_PATH: "GET", "/healthz": "GET", "/readyz": "GET", UI_PATH: "GET", UI_STATE_PATH: "GET"}
_SSE = "text/event-stream"


@dataclass(frozen=True)
class HttpOptions:
    """Limits and access of the HTTP intake (the runtime's ``RequestLimits`` still apply to what is inside).

    Attributes:
        max_body_bytes: largest request body, checked against Content-Length before reading (and
            counted while reading a chunked one); the default fits a 16 MiB image after base64
            (4/3) plus the JSON around it.
        max_concurrent: connections served at once, each holding a thread for up to its deadline
            plus the margin. Past it, up to 8 more connections get a 503 at once; past those, a
            connection is closed unanswered.
        socket_timeout_s: a client silent this long while sending is dropped (slow clients
            cannot pin handler slots).
        keepalive_s: an idle keep-alive connection is closed after this (it holds a slot).
        deadline_margin_s: wait this long past the request's deadline for the runtime's answer
            before giving up with 504 (the runtime itself answers late requests with ``deadline``).
        max_json_depth: nesting of the body (an OpenAI request with an image part needs 7).
        max_json_items: values in the whole body (lists and objects members, summed).
        api_key: when set, ``/v1/`` routes need ``Authorization: Bearer <api_key>``.
        cors_origins: origins (``https://host:port``) whose browser pages may call the API; ``*`` any.
    """

    max_body_bytes: int = 24 * 1024 * 1024
    max_concurrent: int = 64
    socket_timeout_s: float = 30.0
    keepalive_s: float = 5.0
    deadline_margin_s: float = 5.0
    max_json_depth: int = MAX_JSON_DEPTH
    max_json_items: int = MAX_JSON_ITEMS
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.max_concurrent < 1 or self.max_json_depth < 1 or self.max_json_items < 1:
            raise ConfigError(
                f"max_body_bytes, max_concurrent, max_json_depth and max_json_items must be >= 1, got "
                f"{self.max_body_bytes}, {self.max_concurrent}, {self.max_json_depth}, {self.max_json_items}"
            )
        if not self.socket_timeout_s > 0 or not self.keepalive_s > 0 or self.deadline_margin_s < 0:
            raise ConfigError(
                f"socket_timeout_s and keepalive_s must be > 0 and deadline_margin_s >= 0, got "
                f"{self.socket_timeout_s}, {self.keepalive_s}, {self.deadline_margin_s}"
            )
        if self.api_key is not None and (len(self.api_key) < 8 or not self.api_key.isprintable() or " " in self.api_key):
            raise ConfigError("the API key must be at least 8 printable characters without spaces (e.g. `openssl rand -hex 16`)")
        for origin in self.cors_origins:
            if origin != "*" and not re.match(r"^https?://[^/\s]+\Z", origin):
                raise ConfigError(f"CORS origin {origin!r} must be scheme://host[:port] without a path, or *")


class HttpIntake:
    """Serves the runtime over HTTP on a background thread; does not own (start or stop) the runtime.

    Args:
        runtime: a started ``EdgeRuntime``, or None to bind now and ``serve`` it later.
        host: address to bind (``127.0.0.1``; ``0.0.0.0`` or ``::`` for every interface; ``[::1]`` works).
        port: TCP port; 0 picks a free one, readable from ``port`` after ``start``.
        options: connection and size limits, API key, CORS.
    """

    def __init__(self, runtime: EdgeRuntime | None, host: str, port: int, options: HttpOptions = HttpOptions()):
        self.options = options
        self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self._routes = _Routes(runtime, options)
        limits = HttpLimits(options.max_body_bytes, options.max_concurrent, options.socket_timeout_s, options.keepalive_s)
        self._listener = BackgroundListener(self.host, port, lambda: HttpServer(self.host, port, self._routes, limits), "HTTP", "--http",
                                            "msao-http")  # fmt: skip

    @property
    def runtime(self) -> EdgeRuntime | None:
        return self._routes.runtime

    @property
    def port(self) -> int:
        """The bound port (the real one once started, even when 0 was asked)."""
        return self._listener.port

    @property
    def url(self) -> str:
        return self._listener.base_url

    def start(self) -> HttpIntake:
        if not self._listener.running:
            self._listener.start()
            state = "serving" if self.runtime is not None else "loading models (503 until ready)"
            log.info("HTTP intake on %s (%s, %s, health /healthz /readyz): %s", self.url, CHAT_PATH, MODELS_PATH, state)
        return self

    def serve(self, runtime: EdgeRuntime) -> None:
        """From now on requests are answered by ``runtime``."""
        self._routes.runtime = runtime

    def stop(self) -> None:
        """Stop accepting; requests already in a handler finish on their own (within deadline + margin)."""
        if self._listener.stop():
            log.info("HTTP intake stopped")

    def __enter__(self) -> HttpIntake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Refusal(Exception):
    """Ends handling with an error response; ``code`` picks the HTTP status."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None, count: bool = True):
        super().__init__(message)
        self.code, self.headers, self.count = code, headers or {}, count


class _Routes:
    """The ``HttpApp`` the server calls: routing, auth, CORS, and the chat exchange."""

    def __init__(self, runtime: EdgeRuntime | None, options: HttpOptions):
        self.runtime, self.options = runtime, options
        self._key = options.api_key.encode() if options.api_key else None

    # -- HttpApp -----------------------------------------------------------------------------------

    def head(self, request: Request) -> Response | None:
        try:
            return self._head(request)
        except _Refusal as r:
            return self._refuse(request, r)

    def handle(self, request: Request) -> Response:
        try:
            return self._chat(request)
        except _Refusal as r:
            return self._refuse(request, r)
        except Exception:
            log.exception("request %s: internal error in the HTTP intake", _request_id(request))
            return self._refuse(request, _Refusal("internal", "internal error in the HTTP intake; see the daemon log", count=False))

    def error(self, request: Request | None, status: int, code: str, message: str) -> Response:
        if code == "internal" and status == 505:
            message = f"HTTP version not supported ({message}); speak HTTP/1.1 or 1.0"
        return self._refuse(request, _Refusal(code, message), status)

    def busy(self, request: Request) -> Response:
        if request.path in ("/healthz", "/readyz") and request.method in ("GET", "HEAD"):
            return self.head(request)  # probes are answered even when every slot is taken
        n = self.options.max_concurrent
        r = _Refusal("unavailable", f"the edge's HTTP intake already serves {n} connections; retry in a moment", {"Retry-After": "1"})
        return self._refuse(request, r)

    def served(self, request: Request | None, response: Response, seconds: float) -> None:
        path = request.path if request is not None else ""
        if self.runtime is not None:
            self.runtime.metrics.http_responses.inc(route=path if path in _ROUTES else "other", code=response.status)
            if request is None and response.status == 503 and response.close and not response.body:
                self.runtime.metrics.rejected.inc(code="unavailable")  # closed unanswered: every refuser was busy
        log.debug("HTTP %s %s -> %d in %.1f ms", request.method if request else "-", path[:80], response.status, seconds * 1e3)

    # -- routing -----------------------------------------------------------------------------------

    def _head(self, request: Request) -> Response | None:
        path, method = request.path, request.method
        if method == "OPTIONS":
            return self._preflight(request)
        if path == "/metrics":
            raise _Refusal("not_found", "metrics are served on their own listener: start msao edge with --metrics HOST:PORT", count=False)
        want = _ROUTES.get(path)
        if want is None:
            raise _Refusal(
                "not_found", f"no such endpoint {path[:80]!r}; use POST {CHAT_PATH}, GET {MODELS_PATH}, {UI_PATH}, /healthz or /readyz",
                count=False,
            )
        if method != want and not (method == "HEAD" and want == "GET"):
            raise _Refusal("method_not_allowed", f"{path} takes {want}, not {method[:20]}", {"Allow": want}, count=False)
        if path == "/healthz":
            return self._json(request, 200, {"live": True, "ready": self.runtime is not None and self.runtime.ready})
        if path == "/readyz":
            if self.runtime is None:
                return self._json(request, 503, {"ready": False, "reason": "loading models"}, {"Retry-After": "5"})
            health = self.runtime.health()
            if not health["ready"]:
                health["reason"] = "the runtime is stopping"
            return self._json(request, 200 if health["ready"] else 503, health)
        if path == UI_PATH:  # no data in it: served like the probes; the state it polls needs the key
            body, headers = page()
            return Response(200, body, content_type="text/html; charset=utf-8", headers=(("X-Request-Id", request.request_id), *headers))
        self._authorize(request)
        runtime = self._serving()
        if path == MODELS_PATH:
            return self._json(request, 200, _models(runtime))
        if path == UI_STATE_PATH:
            try:
                since = since_from_query(request.target)
            except RequestError as exc:
                raise _Refusal(exc.code, str(exc), count=False) from None
            return self._json(request, 200, state(runtime, since), {"Cache-Control": "no-store"})
        runtime.metrics.intake_requests.inc(source="http")
        if not request.header("content-length") and not request.header("transfer-encoding"):
            raise _Refusal("length_required", "Content-Length is missing; send the JSON body with its length (or chunked)")
        return None  # read the body, then handle()

    def _serving(self) -> EdgeRuntime:
        if self.runtime is None:
            raise _Refusal("unavailable", "msao is starting (loading its models); retry in a moment", {"Retry-After": "5"}, count=False)
        return self.runtime

    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        given = request.header("authorization")
        token = given[7:].strip().encode("latin-1") if given[:7].lower() == "bearer " else b""
        if not hmac.compare_digest(token, self._key):
            what = "is missing" if not given else "is wrong"
            raise _Refusal(
                "unauthorized", f"the API key {what}; send Authorization: Bearer <key> (the daemon's --api-key)",
                {"WWW-Authenticate": "Bearer"}, count=False,
            )  # fmt: skip

    def _preflight(self, request: Request) -> Response:
        want = _ROUTES.get(request.path)
        if want is None:
            raise _Refusal("not_found", f"no such endpoint {request.path[:80]!r}", count=False)
        allow = (("Allow", f"{want}, OPTIONS"),)
        cors = self._cors(request)
        if cors:
            cors += (("Access-Control-Allow-Methods", f"{want}, OPTIONS"),
                     ("Access-Control-Allow-Headers", "Authorization, Content-Type, X-Request-Id"), ("Access-Control-Max-Age", "600"))  # fmt: skip
        return Response(204, b"", content_type="", headers=allow + cors)

    def _cors(self, request: Request) -> tuple[tuple[str, str], ...]:
        origin = request.header("origin")
        if not origin or not self.options.cors_origins:
            return ()
        if "*" in self.options.cors_origins:
            return (("Access-Control-Allow-Origin", "*"),)
        if origin in self.options.cors_origins:
            return (("Access-Control-Allow-Origin", origin), ("Vary", "Origin"))
        return ()

    # -- the chat exchange -------------------------------------------------------------------------

    def _chat(self, request: Request) -> Response:
        runtime, options = self._serving(), self.options
        try:
            call = call_from_chat(request.body, runtime.options.limits, _request_id(request), options.max_json_depth, options.max_json_items)
        except RequestError as exc:
            raise _Refusal(exc.code, str(exc)) from None
        rid = call.request.request_id
        wait_s = call.request.deadline_ms / 1e3 + options.deadline_margin_s
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        try:  # partial texts only where the client streams: the others get the whole answer at once
            runtime.submit(call.request, lambda r: events.put(("done", r)), (lambda t: events.put(("partial", t))) if call.stream else None)
        except RequestError as exc:  # refused at admission; the runtime counted it already
            raise _Refusal(exc.code, str(exc), {"Retry-After": "1"}, count=False) from None
        until = time.monotonic() + wait_s
        try:
            kind, first = events.get(timeout=wait_s)
        except queue.Empty:
            raise _Refusal(
                "deadline", f"no answer within {wait_s:.1f} s (deadline {call.request.deadline_ms:.0f} ms + margin)", count=False
            ) from None
        headers = (("X-Request-Id", rid), ("Cache-Control", "no-cache"), *self._cors(request))
        if kind == "partial":  # part of the answer is final already: stream it now, the rest as it comes
            model = runtime.large.name if runtime.large is not None else runtime.edge.name
            return Response(200, _live_events(ChunkStream(call, model), first, events, until, wait_s), content_type=_SSE, headers=headers)
        response: EdgeResponse | None = first
        if response is None:
            raise _Refusal(
                "unavailable", "the edge daemon stopped before serving this request; send it again", {"Retry-After": "1"}, count=False
            )
        if response.status != "ok":
            status = OPENAI_ERRORS.get(response.error_code, OPENAI_ERRORS["internal"]).http_status
            body = error_body(response.error or "request failed", response.error_code or "internal", response)
            return self._json(request, status, body, {"Retry-After": "1"} if status in (429, 503) else None, rid)
        if call.stream:
            return Response(200, _events(chunks_from_response(response, call)), content_type=_SSE, headers=headers)
        return self._json(request, 200, completion_from_response(response, call), None, rid)

    # -- answering ---------------------------------------------------------------------------------

    def _refuse(self, request: Request | None, r: _Refusal, status: int | None = None) -> Response:
        if r.count and self.runtime is not None and r.code in ("bad_request", "bad_image", "too_large", "length_required", "unavailable"):
            self.runtime.metrics.rejected.inc(code="bad_request" if r.code == "length_required" else r.code)
        status = status or OPENAI_ERRORS.get(r.code, OPENAI_ERRORS["internal"]).http_status
        if status >= 500:
            log.info("request %s: %d %s", _request_id(request), status, r)
        out = self._json(request, status, error_body(str(r), r.code, None), r.headers)
        # with no length, the bytes that follow may be the body itself: not a next request to parse
        return replace(out, close=True) if r.code == "length_required" else out

    def _json(
        self, request: Request | None, status: int, body: dict[str, Any], headers: dict[str, str] | None = None, rid: str | None = None
    ) -> Response:
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
        extra = (("X-Request-Id", rid or _request_id(request)), *(headers or {}).items(), *(self._cors(request) if request else ()))
        return Response(status, payload, headers=tuple(extra))


def _events(chunks: Iterable[dict[str, Any]], done: bool = True) -> Iterator[bytes]:
    """Server-sent events of chunks; ``done``: ended by ``data: [DONE]`` as OpenAI's clients expect."""
    for chunk in chunks:
        yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode("utf-8") + b"\n\n"
    if done:
        yield b"data: [DONE]\n\n"


def _live_events(stream: ChunkStream, text: str, events: queue.Queue, until: float, wait_s: float) -> Iterator[bytes]:
    """An answer streamed while it is committed: its first final text, each later one, then its end.

    The 200 is sent before the answer is whole, so a failure after it (the deadline passed, the
    daemon stopped) comes as an OpenAI ``error`` event before ``[DONE]``, as OpenAI's own streams
    report one.
    """
    yield from _events([stream.start(), *stream.grow(text)], done=False)
    while True:
        try:
            kind, item = events.get(timeout=max(0.0, until - time.monotonic()))
        except queue.Empty:
            yield from _events([error_body(f"no whole answer within {wait_s:.1f} s; what was sent is final", "deadline")])
            return
        if kind == "partial":
            yield from _events(stream.grow(item), done=False)
        elif item is None:
            yield from _events([error_body("the edge daemon stopped before the answer was whole; what was sent is final", "unavailable")])
            return
        elif item.status != "ok":
            yield from _events([error_body(item.error or "request failed", item.error_code or "internal", item)])
            return
        else:
            yield from _events(stream.end(item))
            return


def _models(runtime: EdgeRuntime) -> dict[str, Any]:
    """The models this daemon answers with, as OpenAI lists them; ``msao`` says which role and bundle."""
    created = int(time.time())
    out = []
    for role, model in (("edge", runtime.edge), ("large", runtime.large)):
        if model is None:
            continue
        manifest = model.manifest
        out.append({
            "id": model.name, "object": "model", "created": created, "owned_by": "msao",
            "msao": {"role": role, "model_hash": manifest.model_hash, "served_on": "edge" if role == "edge" else "edge+cloud"},
        })  # fmt: skip
    return {"object": "list", "data": out}


def _request_id(request: Request | None) -> str:
    return request.request_id if request is not None else new_request_id()
