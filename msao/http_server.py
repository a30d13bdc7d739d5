"""A threaded HTTP/1.1 server on h11: framing, limits and connection handling, no routing.

Why h11 and not uvicorn + starlette (measured, docs/http.md): h11 is one pure-Python package of
0.3 MB where uvicorn + starlette pull in 5.4 MB (anyio, click, idna, ...), and the runtime
answers from worker threads behind a blocking ``submit_and_wait``, which a thread per
connection serves without an event loop in between. h11 is the HTTP/1.1 state machine uvicorn
itself uses; what is left here is the socket loop.

What the server guarantees to its ``HttpApp``:
- ``head(request)`` is asked before any body byte is read, so authentication, routing and the
  declared size can refuse a request without reading (or waiting for) its body; a client that
  sent ``Expect: 100-continue`` gets its ``100 Continue`` only once ``head`` let it through.
- bodies arrive whole, Content-Length or chunked, never over ``max_body_bytes`` (413 as soon as
  the count passes it); a body that stops early is a 400, one that stalls a 408.
- keep-alive: after a response the connection waits ``keepalive_s`` for the next request, then
  closes; a response sent before its request's body was read closes the connection (draining a
  little of what the client still sends, so the close does not destroy the answer in flight).
- at most ``max_concurrent`` connections are served; a few more get ``app.busy(request)`` at once.
"""

from __future__ import annotations

import dataclasses
import http
import logging
import re
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import h11

__all__ = ["HttpApp", "HttpLimits", "HttpServer", "Request", "Response"]

log = logging.getLogger(__name__)

_MAX_HEAD_BYTES = 64 * 1024  # request line + headers; past it 431
_MAX_HEADERS = 100
_REFUSERS = 8  # threads that may answer busy() once every slot is taken
_REFUSE_TIMEOUT_S = 2.0
_LINGER_BYTES = 1 << 20
_LINGER_S = 1.0
_RECV = 65536
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


@dataclass(frozen=True)
class Request:
    """One request as the app sees it: lower-cased header names, the path without its query."""

    method: str
    target: str
    path: str
    headers: dict[str, str]  # repeated headers joined with ", " (Content-Length repeats are refused before)
    client: str
    http_version: str
    request_id: str  # the client's X-Request-Id when it is a safe id, else a fresh one: logs and answers carry it
    body: bytes = b""

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


@dataclass(frozen=True)
class Response:
    """``body`` bytes are sent with a Content-Length; an iterator of bytes is streamed (chunked on HTTP/1.1)."""

    status: int
    body: bytes | Iterable[bytes] = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


class HttpApp(Protocol):
    def head(self, request: Request) -> Response | None:
        """A response that ends the request before its body is read, or None to read it."""

    def handle(self, request: Request) -> Response:
        """The response to a request whose body was read (``request.body``)."""

    def error(self, request: Request | None, status: int, code: str, message: str) -> Response:
        """The response for a framing error the server found (bad request line, body too large, ...)."""

    def busy(self, request: Request) -> Response:
        """The response when every connection slot is taken (its body is never read; probes may still be answered)."""

    def served(self, request: Request | None, response: Response, seconds: float) -> None:
        """Called once per response sent (counting, logging)."""


@dataclass(frozen=True)
class HttpLimits:
    """Connection limits (see ``HttpOptions`` in ``msao.edge_runtime.http_api`` for the user-facing ones)."""

    max_body_bytes: int
    max_concurrent: int
    socket_timeout_s: float
    keepalive_s: float = 5.0


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class _Connection:
    sock: socket.socket
    client: str
    app: HttpApp
    limits: HttpLimits
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES))

    def serve(self, refuse: bool) -> None:
        self.sock.settimeout(min(self.limits.socket_timeout_s, _REFUSE_TIMEOUT_S) if refuse else self.limits.socket_timeout_s)
        first = True
        while True:
            request, body_pending = None, False
            started = time.perf_counter()
            try:
                event = self._next(idle=not first)
                if event is None:  # closed, or idle past keepalive
                    return
                first = False
                request = self._request(event)
                started = time.perf_counter()
                if refuse:
                    response, body_pending = self.app.busy(request), True
                else:
                    response = self.app.head(request)
                    body_pending = response is not None and not self._bodiless(request)
                    if response is None:
                        request = self._with_body(request)
                        response = self.app.handle(request)
            except _Refused as r:
                body_pending = self.conn.their_state is h11.SEND_BODY
                response = self.app.error(request, r.status, r.code, str(r))
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if 400 <= exc.error_status_hint < 600 else 400
                self._send_raw_error(request, status, str(exc))
                return
            except OSError:  # reset, broken pipe, timeout while reading the request line: nobody to answer
                return
            try:
                self._send(request, response, close=refuse or body_pending or response.close, started=started)
            except (OSError, h11.LocalProtocolError) as exc:
                log.debug("HTTP connection from %s lost while answering (%s)", self.client, exc)
                return
            if body_pending:
                self._linger()
                return
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE or refuse:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    # -- reading ---------------------------------------------------------------------------------

    def _next(self, idle: bool) -> Any:
        """The next h11 event; None when the peer closed (or stayed idle past keepalive between requests)."""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                if self.conn.they_are_waiting_for_100_continue:
                    self.sock.sendall(self.conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
                waiting_for_request = self.conn.their_state is h11.IDLE
                timeout = self.limits.keepalive_s if (idle and waiting_for_request) else self.limits.socket_timeout_s
                self.sock.settimeout(timeout)
                try:
                    data = self.sock.recv(_RECV)
                except TimeoutError:
                    if waiting_for_request:
                        return None
                    raise _Refused(408, "timeout", f"the request did not arrive within {timeout:g} s; send it at once") from None
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return None
            return event

    def _request(self, event: Any) -> Request:
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError("expected a request", error_status_hint=400)
        version = event.http_version.decode("latin-1")
        if version not in ("1.0", "1.1"):
            raise h11.RemoteProtocolError(f"HTTP/{version[:8]}", error_status_hint=505)
        if len(event.headers) > _MAX_HEADERS or sum(len(n) + len(v) + 4 for n, v in event.headers) > _MAX_HEAD_BYTES:
            raise h11.RemoteProtocolError(
                f"request headers over {_MAX_HEADERS} lines or {_MAX_HEAD_BYTES} bytes; send fewer", error_status_hint=431
            )
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        target = event.target.decode("latin-1")
        given = headers.get("x-request-id", "")
        return Request(
            request_id=given if _ID.match(given) else "r" + uuid.uuid4().hex[:19],
            method=event.method.decode("latin-1"),
            target=target,
            path=target.split("?", 1)[0],
            headers=headers,
            client=self.client,
            http_version=version,
        )

    def _bodiless(self, request: Request) -> bool:
        """Whether the request declared no body; if so, its end is consumed (the connection can be reused)."""
        if request.header("transfer-encoding") or request.header("content-length", "0") != "0":
            return False
        while self.conn.their_state is h11.SEND_BODY:
            if isinstance(self.conn.next_event(), (h11.EndOfMessage, type(h11.NEED_DATA))):
                break
        return self.conn.their_state is h11.DONE

    def _with_body(self, request: Request) -> Request:
        limit = self.limits.max_body_bytes
        declared = request.header("content-length")
        if declared and int(declared) > limit:  # h11 checked it is one integer
            raise _Refused(413, "too_large", f"body is {declared} bytes, over the limit of {limit}; send a smaller (e.g. JPEG) image")
        parts, size = [], 0
        while True:
            try:
                event = self._next(idle=False)
            except h11.RemoteProtocolError as exc:  # a bad chunk, or the stream ended inside the body
                if "peer closed" in str(exc):
                    of = f" of {declared}" if declared else ""
                    raise _Refused(400, "bad_request", f"body ended after {size}{of} bytes; send the whole body") from None
                raise _Refused(400, "bad_request", f"body is malformed ({exc}); send the JSON as it is, or well-formed chunks") from None
            if event is None:
                raise _Refused(400, "bad_request", f"body ended after {size} bytes; send the whole body")
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise _Refused(413, "too_large", f"body is over the limit of {limit} bytes; send a smaller (e.g. JPEG) image")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return dataclasses.replace(request, body=b"".join(parts))

    # -- writing ---------------------------------------------------------------------------------

    def _send(self, request: Request | None, response: Response, close: bool, started: float) -> None:
        headers = [("Server", "msao-edge"), *response.headers]
        streamed = not isinstance(response.body, (bytes, bytearray))
        if response.content_type:
            headers.append(("Content-Type", response.content_type))
        if not streamed:
            headers.append(("Content-Length", str(len(response.body))))
        if close:
            headers.append(("Connection", "close"))
        send = self.sock.sendall
        try:
            send(self.conn.send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status))))
            if request is None or request.method != "HEAD":
                for chunk in _chunks(response.body):
                    if chunk:
                        send(self.conn.send(h11.Data(data=chunk)))
            send(self.conn.send(h11.EndOfMessage()))
        finally:
            if streamed and hasattr(response.body, "close"):
                response.body.close()  # a generator cut short by a lost client releases what it holds
            self.app.served(request, response, time.perf_counter() - started)

    def _send_raw_error(self, request: Request | None, status: int, message: str) -> None:
        """A framing error h11 found before a request existed: answer once if the state allows, then close."""
        response = self.app.error(request, status, _code_for(status), message)
        try:
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self._send(request, dataclasses.replace(response, close=True), close=True, started=time.perf_counter())
            else:
                raise h11.LocalProtocolError("cannot answer in this state")
        except (h11.LocalProtocolError, OSError):
            # h11 refuses to speak to a peer it no longer understands: write the answer by hand
            body = response.body if isinstance(response.body, bytes) else b""
            head = f"HTTP/1.1 {status} {_reason(status).decode('latin-1')}\r\nServer: msao-edge\r\nContent-Type: {response.content_type}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            try:
                self.sock.sendall(head.encode("latin-1") + body)
            except OSError:
                pass
            self.app.served(request, response, 0.0)
        self._linger()

    def _linger(self) -> None:
        """Drain a little of an unread body after answering, so closing is a FIN, not a reset that
        could destroy the answer in the client's buffer while it is still sending."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(0.2)
            end, drained = time.monotonic() + _LINGER_S, 0
            while drained < _LINGER_BYTES and time.monotonic() < end:
                chunk = self.sock.recv(_RECV)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass


def _chunks(body: bytes | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(body, (bytes, bytearray)):
        yield bytes(body)
    else:
        yield from body


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("latin-1")
    except ValueError:
        return b""


def _code_for(status: int) -> str:
    return {408: "timeout", 413: "too_large", 411: "length_required"}.get(status, "bad_request" if status < 500 else "internal")


class HttpServer(socketserver.TCPServer):
    """One thread per connection, at most ``max_concurrent`` serving plus a few answering ``busy()``."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: with socketserver's 5, a burst of clients sees connection resets

    def __init__(self, host: str, port: int, app: HttpApp, limits: HttpLimits):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app, self.limits = app, limits
        self.slots = threading.BoundedSemaphore(limits.max_concurrent)
        self.refusers = threading.BoundedSemaphore(_REFUSERS)
        super().__init__((host, port), socketserver.BaseRequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.slots.acquire(blocking=False):
            sem, refuse = self.slots, False
        elif self.refusers.acquire(blocking=False):
            sem, refuse = self.refusers, True
        else:  # even the refusers are taken: close without a word rather than queue threads
            self.app.served(None, Response(503, close=True), 0.0)
            self.shutdown_request(request)
            return
        try:
            threading.Thread(target=self._serve, args=(request, client_address, sem, refuse), name="msao-http-conn", daemon=True).start()
        except RuntimeError:  # no thread could be started
            sem.release()
            self.shutdown_request(request)
            raise

    def _serve(self, sock: socket.socket, client_address: Any, sem: threading.BoundedSemaphore, refuse: bool) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Connection(sock, str(client_address[0]), self.app, self.limits).serve(refuse)
        except Exception:
            log.exception("HTTP connection from %s failed", client_address[0] if client_address else "?")
        finally:
            self.shutdown_request(sock)
            sem.release()
