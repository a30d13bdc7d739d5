"""A client of a running edge daemon over MQTT 5: what ``msao ask --broker`` and the benchmark use.

Sends the JSON request form of ``docs/mqtt-api.md`` to ``msao/v1/edge/<edge_id>/request`` with
a response topic private to this client and the request id as correlation data, and waits for
the matching response. Thread-safe: many requests may wait at once. Any MQTT 5 client can do
the same; this one exists so Python users and tests need no other library.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.mqtt_options import ClientOptions, InboundMessage
from msao.cloud_bridge.topics import PREFIX, check_id
from msao.edge_runtime.requests import EdgeResponse, new_request_id
from msao.errors import CloudUnavailable, RequestError

__all__ = ["EdgeClient", "EdgeReply"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeReply:
    """A response and what it cost as seen by the client (publish to response received)."""

    response: EdgeResponse
    round_trip_ms: float


class _Waiter:
    def __init__(self, on_partial: Callable[[EdgeResponse], None] | None = None) -> None:
        self.event = threading.Event()
        self.payload: bytes | None = None
        self.on_partial = on_partial


class EdgeClient:
    """Ask questions of the edge daemon ``edge_id`` through the broker in ``options``."""

    def __init__(self, options: ClientOptions, edge_id: str):
        self.edge_id = check_id(edge_id, "edge id")
        self.request_topic = f"{PREFIX}/edge/{edge_id}/request"
        self.response_topic = f"{PREFIX}/edge/{edge_id}/response/{check_id(options.client_id, 'client id')}"
        self._waiting: dict[str, _Waiter] = {}
        self._lock = threading.Lock()
        self.client = BridgeClient(options, self._on_message)
        self.client.subscribe(self.response_topic, qos=1)

    def start(self, timeout_s: float = 5.0) -> EdgeClient:
        self.client.start()
        if not self.client.wait_connected(timeout_s):
            reason = self.client.last_connect_error
            self.client.stop()
            if reason:
                raise CloudUnavailable(f"no connection to the broker after {timeout_s:.0f} s: {reason}")
            raise CloudUnavailable(f"no broker at {self.client.url} after {timeout_s:.0f} s; is it running?")
        return self

    def close(self) -> None:
        self.client.stop()

    def __enter__(self) -> EdgeClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ask(
        self,
        image: bytes,
        question: str,
        *,
        deadline_ms: float = 5000.0,
        wait_s: float | None = None,
        request_id: str | None = None,
        on_partial: Callable[[EdgeResponse], None] | None = None,
        **fields: object,
    ) -> EdgeReply:
        """Send one request and wait for its response (``wait_s``: default deadline + 10 s).

        ``fields`` are the optional JSON request keys (``stream``, ``policy``, ``split_layer``,
        ``keep_ratio``). ``on_partial`` asks for ``partials`` and gets each ``partial`` response
        (the answer so far, final) on the client's network thread before this returns the last.

        Raises:
            CloudUnavailable: no response in time (the daemon is down or the broker unreachable).
        """
        rid = request_id or new_request_id()
        doc = {"request_id": rid, "question": question, "image": base64.b64encode(image).decode("ascii"), "deadline_ms": deadline_ms}
        doc.update({k: v for k, v in fields.items() if v is not None})
        if on_partial is not None:
            doc["partials"] = True
        waiter = _Waiter(on_partial)
        with self._lock:
            self._waiting[rid] = waiter
        try:
            t0 = time.perf_counter()
            self.client.publish(
                self.request_topic, json.dumps(doc).encode(), response_topic=self.response_topic, correlation_data=rid.encode("ascii")
            )
            wait = deadline_ms / 1e3 + 10.0 if wait_s is None else wait_s
            if not waiter.event.wait(wait):
                raise CloudUnavailable(
                    f"no response to request {rid} from edge {self.edge_id} within {wait:.1f} s; is `msao edge` running?"
                )
            rtt = (time.perf_counter() - t0) * 1e3
        finally:
            with self._lock:
                self._waiting.pop(rid, None)
        try:
            response = EdgeResponse.from_dict(json.loads(waiter.payload or b""))
        except (ValueError, TypeError) as exc:
            raise RequestError(f"the edge sent an unreadable response to {rid}: {exc}", "internal") from None
        return EdgeReply(response, rtt)

    def _on_message(self, msg: InboundMessage) -> None:
        rid = (msg.correlation_data or b"").decode("ascii", "replace")
        with self._lock:
            waiter = self._waiting.get(rid)
        if waiter is None:
            return
        if waiter.on_partial is not None and b'"partial"' in msg.payload:
            try:
                response = EdgeResponse.from_dict(json.loads(msg.payload))
            except (ValueError, TypeError, RequestError):
                response = None  # unreadable: read again as the final response, which reports it
            if response is not None and response.status == "partial":
                try:
                    waiter.on_partial(response)
                except Exception:  # the caller's code must not stop this client's network thread
                    log.exception("request %s: the on_partial callback failed", rid)
                return
        waiter.payload = bytes(msg.payload)
        waiter.event.set()

    @staticmethod
    def new_client_id() -> str:
        return "ask-" + uuid.uuid4().hex[:12]
