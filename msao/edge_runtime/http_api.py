"""The edge daemon's HTTP intake: an OpenAI-compatible chat endpoint plus health and readiness.

    POST /v1/chat/completions   one question about one image (non-streaming) -> chat.completion
    GET  /healthz               200 while the server runs (liveness)
    GET  /readyz                200 with ``EdgeRuntime.health()`` when the runtime serves, else 503

Metrics are not served here: this listener has no authentication, so they have their own
(``msao edge --metrics HOST:PORT``, ``msao/prometheus.py``). Each answer is counted by route
and status (``msao_http_responses_total``), each chat POST as an intake request.

Owns HTTP: routing, connection limits, size checks before any body byte is read, and which
status each outcome gets. The body's meaning is ``openai_chat``'s (chat JSON -> ``EdgeRequest``,
``EdgeResponse`` -> ``chat.completion`` or an OpenAI-shaped error, and each error code's status);
the answer is the runtime's (``EdgeRuntime.submit_and_wait``, the same admission as every other
intake). Knows nothing of models, placement or MQTT. Standard library only, so the edge install
stays small.

Connections are HTTP/1.0 (one request each, then closed): an idle keep-alive connection would
hold one of the ``max_concurrent`` handler slots until its socket timeout.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from msao.edge_runtime.openai_chat import (
    MAX_JSON_DEPTH,
    MAX_JSON_ITEMS,
    OPENAI_ERRORS,
    completion_from_response,
    error_body,
    request_from_chat,
)
from msao.edge_runtime.requests import new_request_id
from msao.edge_runtime.runtime import EdgeRuntime
from msao.errors import ConfigError, RequestError
from msao.listener import BackgroundListener

__all__ = ["HttpIntake", "HttpOptions"]

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
_ROUTES = {CHAT_PATH: "POST", "/healthz": "GET", "/readyz": "GET"}
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
_REFUSERS = 8  # threads that may answer 503 once every handler slot is taken
_REFUSE_TIMEOUT_S = 2.0  # how long a refused client may take to send its request line and headers
_LINGER_BYTES = 1 << 20  # an unread body drained (up to this) so closing does not reset the connection
_LINGER_S = 1.0


@dataclass(frozen=True)
class HttpOptions:
    """Limits of the HTTP intake (the runtime's ``RequestLimits`` still apply to what is inside).

    Attributes:
        max_body_bytes: largest request body, checked against Content-Length before reading; the
            default fits a 16 MiB image after base64 (4/3) plus the JSON around it.
        max_concurrent: connections served at once, each holding a thread for up to its deadline
            plus the margin. Past it, up to 8 more connections get a 503 at once (health probes on
            them are still answered); past those, a connection is closed unanswered.
        socket_timeout_s: a client silent this long while sending is dropped (slow clients
            cannot pin handler slots).
        deadline_margin_s: wait this long past the request's deadline for the runtime's answer
            before giving up with 504 (the runtime itself answers late requests with ``deadline``).
        max_json_depth: nesting of the body (an OpenAI request with an image part needs 7).
        max_json_items: values in the whole body (lists and objects members, summed).
    """

    max_body_bytes: int = 24 * 1024 * 1024
    max_concurrent: int = 64
    socket_timeout_s: float = 30.0
    deadline_margin_s: float = 5.0
    max_json_depth: int = MAX_JSON_DEPTH
    max_json_items: int = MAX_JSON_ITEMS

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.max_concurrent < 1 or self.max_json_depth < 1 or self.max_json_items < 1:
            raise ConfigError(
                f"max_body_bytes, max_concurrent, max_json_depth and max_json_items must be >= 1, got "
                f"{self.max_body_bytes}, {self.max_concurrent}, {self.max_json_depth}, {self.max_json_items}"
            )
        if not self.socket_timeout_s > 0 or self.deadline_margin_s < 0:
            raise ConfigError(
                f"socket_timeout_s must be > 0 and deadline_margin_s >= 0, got {self.socket_timeout_s}, {self.deadline_margin_s}"
            )


class HttpIntake:
    """Serves the runtime over HTTP on a background thread; does not own (start or stop) the runtime.

    Args:
        runtime: a started ``EdgeRuntime``.
        host: address to bind (``127.0.0.1``; ``0.0.0.0`` or ``::`` for every interface; ``[::1]`` works).
        port: TCP port; 0 picks a free one, readable from ``port`` after ``start``.
        options: connection and size limits.
    """

    def __init__(self, runtime: EdgeRuntime, host: str, port: int, options: HttpOptions = HttpOptions()):
        self.runtime, self.options = runtime, options
        self.host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        self._listener = BackgroundListener(
            self.host, port, lambda: _Server(self.host, port, runtime, options), "HTTP", "--http", "msao-http"
        )

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
            log.info("HTTP intake on %s (%s, health /healthz /readyz)", self.url, CHAT_PATH)
        return self

    def stop(self) -> None:
        """Stop accepting; requests already in a handler finish on their own (within deadline + margin)."""
        if self._listener.stop():
            log.info("HTTP intake stopped")

    def __enter__(self) -> HttpIntake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_concurrent`` serving plus a few answering 503."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # listen backlog: with socketserver's 5, a burst of clients sees connection resets

    def __init__(self, host: str, port: int, runtime: EdgeRuntime, options: HttpOptions):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.runtime, self.options = runtime, options
        self.slots = threading.BoundedSemaphore(options.max_concurrent)
        self.refusers = threading.BoundedSemaphore(_REFUSERS)
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn, a DNS lookup that can hang on a Jetson offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.slots.acquire(blocking=False):
            sem, refuse = self.slots, False
        elif self.refusers.acquire(blocking=False):
            sem, refuse = self.refusers, True
        else:  # even the refusers are taken: close without a word rather than queue threads
            self.runtime.metrics.rejected.inc(code="unavailable")
            self.shutdown_request(request)
            return
        try:
            threading.Thread(target=self._serve, args=(request, client_address, sem, refuse), name="msao-http-conn", daemon=True).start()
        except RuntimeError:  # no thread could be started
            sem.release()
            self.shutdown_request(request)
            raise

    def _serve(self, request: Any, client_address: Any, sem: threading.BoundedSemaphore, refuse: bool) -> None:
        try:
            _Handler(request, client_address, self, refuse=refuse)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            sem.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("HTTP connection from %s failed", client_address[0] if client_address else "?")


class _Refusal(Exception):
    """Ends handling with an error response; ``code`` picks the HTTP status."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None, count: bool = True):
        super().__init__(message)
        self.code, self.headers, self.count = code, headers or {}, count


class _Handler(BaseHTTPRequestHandler):
    """One connection, one request. Every path out of ``_dispatch`` answers exactly once."""

    server: _Server
    protocol_version = "HTTP/1.0"
    server_version = "msao-edge"
    sys_version = ""

    def __init__(self, request: Any, client_address: Any, server: _Server, refuse: bool = False):
        self.refuse = refuse
        self.request_id = "-"
        self._answered = False
        self._body_read = False
        self._started = time.perf_counter()
        super().__init__(request, client_address, server)

    # -- BaseHTTPRequestHandler hooks -------------------------------------------------------------

    def setup(self) -> None:
        self.timeout = min(self.server.options.socket_timeout_s, _REFUSE_TIMEOUT_S) if self.refuse else self.server.options.socket_timeout_s
        super().setup()

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _dispatch logs one line per request, with its id

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("HTTP %s: " + format, self.client_address[0], *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by the base class (bad request line, headers too long) as OpenAI JSON."""
        self.close_connection = True
        # a request line the base class could not parse leaves "HTTP/0.9", which would send the body without a status line
        self.request_version = "HTTP/1.0"
        self._send_json(code, error_body(message or self.responses.get(code, ("error",))[0], _code_for_status(code), None))

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    # -- dispatch ------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._started = time.perf_counter()
        path = urlsplit(self.path).path
        header_id = self.headers.get("X-Request-Id", "")
        self.request_id = header_id if _ID.match(header_id) else new_request_id()
        status = 0
        try:
            try:
                status = self._route(path)
            except _Refusal as r:
                status = self._refuse(r)
            except OSError:  # the client went away (reset, broken pipe, socket timeout): no one to answer
                raise
            except Exception:
                log.exception("request %s: internal error in the HTTP intake", self.request_id)
                status = self._refuse(_Refusal("internal", "internal error in the HTTP intake; see the daemon log", count=False))
        except OSError as exc:
            log.debug("request %s: connection lost (%s: %s)", self.request_id, type(exc).__name__, exc)
        finally:
            if not self._body_read and (self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() != "0"):
                self._linger()
        ms = (time.perf_counter() - self._started) * 1e3
        log.debug("request %s: %s %s -> %s in %.1f ms", self.request_id, self.command, path[:80], status or "no answer", ms)

    def _route(self, path: str) -> int:
        method = _ROUTES.get(path)
        if path == "/metrics":
            raise _Refusal("not_found", "metrics are served on their own listener: start msao edge with --metrics HOST:PORT", count=False)
        if method is None:
            raise _Refusal("not_found", f"no such endpoint {path[:80]!r}; use POST {CHAT_PATH}, GET /healthz or /readyz", count=False)
        if self.command != method:
            raise _Refusal("method_not_allowed", f"{path} takes {method}, not {self.command}", {"Allow": method}, count=False)
        if path == "/healthz":
            return self._send_json(200, {"live": True})
        if path == "/readyz":
            runtime = self.server.runtime
            return self._send_json(200 if runtime.ready else 503, runtime.health())
        self.server.runtime.metrics.intake_requests.inc(source="http")
        if self.refuse:
            n = self.server.options.max_concurrent
            raise _Refusal("unavailable", f"the edge's HTTP intake already serves {n} connections; retry in a moment", {"Retry-After": "1"})
        return self._chat()

    def _chat(self) -> int:
        runtime, options = self.server.runtime, self.server.options
        try:
            request = request_from_chat(
                self._read_body(), runtime.options.limits, self.request_id, options.max_json_depth, options.max_json_items
            )
        except RequestError as exc:
            raise _Refusal(exc.code, str(exc)) from None
        self.request_id = request.request_id
        wait_s = request.deadline_ms / 1e3 + options.deadline_margin_s
        try:
            response = runtime.submit_and_wait(request, wait_s)
        except RequestError as exc:  # refused at admission; the runtime counted it already
            raise _Refusal(exc.code, str(exc), {"Retry-After": "1"}, count=False) from None
        except concurrent.futures.TimeoutError:
            raise _Refusal(
                "deadline", f"no answer within {wait_s:.1f} s (deadline {request.deadline_ms:.0f} ms + margin)", count=False
            ) from None
        if response is None:
            raise _Refusal(
                "unavailable", "the edge daemon stopped before serving this request; send it again", {"Retry-After": "1"}, count=False
            )
        if response.status != "ok":
            status = OPENAI_ERRORS.get(response.error_code, OPENAI_ERRORS["internal"]).http_status
            body = error_body(response.error or "request failed", response.error_code or "internal", response)
            return self._send_json(status, body, {"Retry-After": "1"} if status in (429, 503) else None)
        return self._send_json(200, completion_from_response(response))

    def _read_body(self) -> bytes:
        """The body, after checking its declared size; nothing is read when it is refused."""
        if self.headers.get("Transfer-Encoding"):
            raise _Refusal("length_required", "chunked transfer encoding is not supported; send the body with a Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise _Refusal("length_required", "Content-Length is missing; send the JSON body with its length")
        if len(set(lengths)) != 1 or not lengths[0].strip().isdecimal():
            raise _Refusal("bad_request", f"Content-Length {', '.join(lengths)[:60]!r} is not one non-negative integer")
        n = int(lengths[0])
        limit = self.server.options.max_body_bytes
        if n > limit:
            raise _Refusal("too_large", f"body is {n} bytes, over the limit of {limit}; send a smaller (e.g. JPEG) image")
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            raise _Refusal(
                "timeout", f"the body did not arrive within {self.server.options.socket_timeout_s:g} s; send it at once", count=False
            ) from None
        self._body_read = True
        if len(body) != n:
            raise _Refusal("bad_request", f"body ended after {len(body)} of {n} bytes; send the whole body", count=False)
        return body

    # -- answering -----------------------------------------------------------------------------------

    def _refuse(self, r: _Refusal) -> int:
        if r.count and r.code in ("bad_request", "bad_image", "too_large", "length_required", "unavailable"):
            self.server.runtime.metrics.rejected.inc(code="bad_request" if r.code == "length_required" else r.code)
        status = OPENAI_ERRORS.get(r.code, OPENAI_ERRORS["internal"]).http_status
        if status >= 500:
            log.info("request %s: %d %s", self.request_id, status, r)
        if self._answered:
            return status
        return self._send_json(status, error_body(str(r), r.code, None), r.headers)

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> int:
        return self._send(status, json.dumps(body, separators=(",", ":")).encode("utf-8"), "application/json", headers)

    def _send(self, status: int, payload: bytes, content_type: str, headers: dict[str, str] | None = None) -> int:
        self._answered = True
        path = urlsplit(getattr(self, "path", "")).path  # unset when the request line could not be parsed
        self.server.runtime.metrics.http_responses.inc(route=path if path in _ROUTES else "other", code=status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Request-Id", self.request_id)
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()
        return status

    def _linger(self) -> None:
        """Drain a little of an unread body after answering so the close is a FIN, not a reset
        that could destroy our answer in the client's buffer (the client may still be sending)."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.2)
            end, drained = time.monotonic() + _LINGER_S, 0
            while drained < _LINGER_BYTES and time.monotonic() < end:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass


# -- status codes ------------------------------------------------------------------------------------


def _code_for_status(status: int) -> str:
    """The error code of an HTTP status the base class answers with on its own (400, 414, 431, 501, ...)."""
    for code, kind in OPENAI_ERRORS.items():
        if kind.http_status == status:
            return code
    return "bad_request" if 400 <= status < 500 else "internal"
