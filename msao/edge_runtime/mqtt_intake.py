"""The edge daemon's MQTT intake: requests in on ``msao/v1/edge/<id>/request``, answers out, acks after answers.

Owns the request/response protocol of ``docs/mqtt-api.md``: which payload form a message is,
where its answer goes, which id it carries, and when the broker may forget it. Knows nothing
of models, plans or paho (``BridgeClient`` is the only MQTT user); parsing is
``requests.py``'s, serving is ``EdgeRuntime``'s.

    broker ──PUBLISH (QoS 1, unacked)──► on_message (network thread: parse, dedupe, submit; no waiting)
       │                                   ├─ parse error / busy / unavailable ─► error response ─┐
       │                                   └─ EdgeRuntime.submit ─► worker ─► on_done(response) ──┤
       │                                                                       publish QoS 1 ◄────┘
       ◄──────────── PUBACK of the request ◄── acker thread, once the broker acknowledged the response

A request is acknowledged only after its response reached the broker, so a daemon that dies or
stops with requests still queued (``on_done(None)``) leaves them in its persistent session and
the broker redelivers them to the next daemon with the same edge id. Redelivery and retries
are made idempotent by request id: finished responses are remembered (bounded LRU) and sent
again instead of recomputed, and a copy of a request still being served waits for it.

A request's MQTT 5 MessageExpiryInterval caps its deadline: one that waited in the session (or
in this intake while the models loaded) past its expiry is answered ``deadline``, not about an
old image as if fresh. The intake connects before the runtime serves (``serve``): requests
that arrive meanwhile are held, unanswered and unacknowledged, and the retained status
(``mqtt_status.py``) says ``starting`` until then, ``offline`` by Last Will if the daemon dies.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.mqtt_options import ClientOptions, InboundMessage
from msao.cloud_bridge.topics import check_id, edge_request_topic, edge_response_topic
from msao.edge_runtime.mqtt_status import StatusReporter
from msao.edge_runtime.requests import (
    EdgeRequest,
    EdgeResponse,
    RequestLimits,
    context_from_value,
    json_depth,
    new_request_id,
    request_from_json,
    request_from_raw_image,
)
from msao.edge_runtime.runtime import EdgeRuntime
from msao.errors import ConfigError, MsaoError, RequestError

__all__ = [
    "CONTENT_TYPE",
    "MAX_RESPONSE_TOPIC_CHARS",
    "intake_client_id",
    "IntakeCounters",
    "IntakeOptions",
    "MqttIntake",
    "response_topic_problem",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
MAX_RESPONSE_TOPIC_CHARS = 256
_ID = re.compile(rb"^[A-Za-z0-9_-]{1,64}\Z")
_JSON_START = re.compile(rb"[ \t\r\n]*\{")
_STOP = object()


def intake_client_id(edge_id: str) -> str:
    """The fixed MQTT client id of an edge's intake: a restarted daemon resumes its session."""
    return f"msao-edge-{check_id(edge_id, 'edge id')}-intake"


@dataclass(frozen=True)
class IntakeOptions:
    """How the intake keeps its session and its promises.

    Attributes:
        session_expiry_s: how long the broker keeps the intake's session (subscription,
            unacknowledged and newly arriving requests) while no daemon is connected.
        remember: finished responses kept by request id, to answer redelivered or repeated
            requests without computing them again (least recently used dropped first).
        drain_s: on ``stop``, how long requests already submitted may still be answered.
        ack_timeout_s: how long to wait for the broker to acknowledge a response before
            giving up on acknowledging its request (the broker then redelivers it).
        max_held: requests held while the runtime is not serving yet (QoS 1 ones are also
            bounded by the broker's in-flight window); more are answered ``unavailable``.
        status_check_s: how often the retained status looks at the runtime's readiness and mode.
    """

    session_expiry_s: int = 3600
    remember: int = 1024
    drain_s: float = 5.0
    ack_timeout_s: float = 10.0
    max_held: int = 256
    status_check_s: float = 2.0

    def __post_init__(self) -> None:
        if self.session_expiry_s < 1:
            raise ConfigError(
                f"session_expiry_s must be >= 1, got {self.session_expiry_s}: without a session the broker cannot redeliver requests"
            )
        if self.remember < 1 or self.drain_s < 0 or self.ack_timeout_s <= 0 or self.max_held < 0 or self.status_check_s <= 0:
            raise ConfigError(f"remember >= 1, drain_s >= 0, ack_timeout_s > 0, max_held >= 0 and status_check_s > 0; got {self}")


@dataclass(frozen=True)
class IntakeCounters:
    """Counts since start (a snapshot; see ``MqttIntake.counters``).

    Attributes:
        requests_in: request messages received (including duplicates and bad ones).
        parse_errors: requests answered with an error before reaching the runtime.
        refused: requests the runtime refused at once (``busy`` / ``unavailable``).
        duplicates: requests whose id was finished or in progress (not computed again).
        ignored: retained messages on the request topic (never answered).
        held: requests that arrived before the runtime served, held until it did.
        expired: requests whose MessageExpiryInterval ran out before they were served.
        published: responses published (one per delivery, duplicates included).
        publish_failures: responses that could not be published (their requests stay unacked).
        acked: requests acknowledged to the broker after their response was delivered.
    """

    requests_in: int = 0
    parse_errors: int = 0
    refused: int = 0
    duplicates: int = 0
    ignored: int = 0
    held: int = 0
    expired: int = 0
    published: int = 0
    publish_failures: int = 0
    acked: int = 0


@dataclass(frozen=True)
class _Delivery:
    """One received copy of a request and where its answer goes."""

    message: InboundMessage
    response_topic: str
    correlation_data: bytes


class MqttIntake:
    """Serves one edge id's request topic with a runtime. Start it, stop it (or use ``with``).

    Args:
        runtime: the ``EdgeRuntime`` that answers (the intake does not own or stop it); None
            while the daemon is still loading it: requests are held and the status says
            ``starting`` until ``serve(runtime)``.
        client_options: broker, credentials and buffers; ``client_id`` is replaced by
            ``intake_client_id(edge_id)``, ``session_expiry_s`` by the intake's, the Last Will
            by the edge's offline status, and manual acknowledgement with session resumption
            is switched on.
        edge_id: this daemon's id (``[A-Za-z0-9_-]{1,64}``); one intake per id at a time.
        limits: request parsing limits (payload size, question length, deadlines).
        options: session, idempotency and shutdown settings.

    Stop the runtime first (it drains its queue, handing back what it could not serve), then
    the intake; requests handed back are not acknowledged, so the broker redelivers them.
    """

    def __init__(
        self,
        runtime: EdgeRuntime | None,
        client_options: ClientOptions,
        edge_id: str,
        limits: RequestLimits = RequestLimits(),
        options: IntakeOptions = IntakeOptions(),
    ):
        self.edge_id = check_id(edge_id, "edge id")
        self.runtime, self.limits, self.options = runtime, limits, options
        self.request_topic = edge_request_topic(edge_id)
        self.default_response_topic = edge_response_topic(edge_id)
        self.status = StatusReporter(self.edge_id, options.status_check_s)
        self.client_options = replace(
            client_options,
            client_id=intake_client_id(edge_id),
            will_topic=self.status.topic,
            will_payload=self.status.will,
            session_expiry_s=options.session_expiry_s,
            manual_ack=True,
            resume_session=True,
            # a request over the limit must reach us to be answered `too_large`, not be dropped by the broker
            # (8x the request limit: a 100 MB upload to a 16 MB limit is refused with an answer; beyond
            # that the broker drops it unanswered, as MQTT 5 requires, and the sender's client is told)
            max_message_bytes=max(client_options.max_message_bytes, 8 * limits.max_payload_bytes),
        )
        self.client = BridgeClient(self.client_options, self._on_message, on_connect=partial(self.status.publish, force=True))
        self._lock = threading.Lock()
        self._held: list[InboundMessage] = []  # arrived before ``serve``
        self._running: dict[str, list[_Delivery]] = {}  # request id -> copies waiting for the answer
        self._finished: OrderedDict[str, bytes] = OrderedDict()  # request id -> response JSON (LRU)
        self._counts: Counter[str] = Counter()
        self._acks: queue.Queue = queue.Queue()
        self._closing = threading.Event()  # no new requests are taken
        self._closed = threading.Event()  # no responses are published
        self._acker: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> MqttIntake:
        """Connect (in the background, retrying) and subscribe; see ``wait_ready``."""
        self._acker = threading.Thread(target=self._ack_loop, name=f"msao-intake-acker-{self.edge_id}", daemon=True)
        self._acker.start()
        self.status.start(self.client)
        if self.runtime is not None:
            self.status.serve(self.runtime)
        self.client.subscribe(self.request_topic, qos=1)
        self.client.start()
        log.info("MQTT intake of edge %s: requests on %s, answers on %s by default, status on %s", self.edge_id, self.request_topic,
                 self.default_response_topic, self.status.topic)  # fmt: skip
        return self

    def serve(self, runtime: EdgeRuntime) -> None:
        """Start answering with ``runtime``: the requests held meanwhile first, then the status says online."""
        with self._lock:
            self.runtime = runtime
            held, self._held = self._held, []
        if held:
            log.info("serving %d requests that arrived while the edge was starting", len(held))
        for msg in held:
            self._on_message(msg)
        self.status.serve(runtime)

    def wait_ready(self, timeout_s: float) -> bool:
        """True once connected and the broker confirmed the subscription."""
        return self.client.wait_subscribed(timeout_s)

    def stop(self) -> None:
        """Take no new requests (left unacknowledged for the next daemon), wait up to ``drain_s``
        for those already submitted, acknowledge what was answered, then disconnect."""
        if self._closing.is_set():
            return
        self._closing.set()
        self.status.stopping()
        if not self._wait(lambda: not self._running, self.options.drain_s):
            log.warning("intake stopping with %d requests unanswered; the broker redelivers them", len(self._running))
        self._closed.set()
        self._acks.put(_STOP)
        if self._acker is not None:
            self._acker.join(self.options.ack_timeout_s + 1.0)
        self.client.stop(final=(self.status.topic, self.status.stop()))
        log.info("MQTT intake of edge %s stopped (%s)", self.edge_id, self.counters())

    def __enter__(self) -> MqttIntake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def counters(self) -> IntakeCounters:
        """A consistent snapshot of the counters, for metrics."""
        with self._lock:
            return IntakeCounters(**self._counts)

    # -- requests (network thread: parse, dedupe, submit; never wait) ------------------------

    def _on_message(self, msg: InboundMessage) -> None:
        if self._closing.is_set():
            return  # not acknowledged: the broker redelivers it to the next daemon
        with self._lock:
            hold = self.runtime is None and len(self._held) < self.options.max_held
            if hold:
                self._held.append(msg)
                self._counts["held"] += 1
        if hold:
            return  # answered (and acknowledged) once the runtime serves
        if self.runtime is None:  # more arrived while starting than we hold
            self._count("requests_in")
            self._count("refused")
            rid, context = self._fallback(msg, _id_from_bytes(msg.correlation_data))
            why = "the edge daemon is starting (loading its models); retry in a moment"
            failure = EdgeResponse.failure(rid, "unavailable", why, context)
            self._send(failure.to_json_bytes(), [self._delivery(msg, self._response_topic(msg.response_topic)[0], rid)])
            return
        self._count("requests_in")
        if msg.retained:
            self._count("ignored")
            log.warning(
                "ignored a retained message on %s: requests must not be retained (they would be asked again at every subscribe)", msg.topic
            )
            self.client.ack(msg)
            return
        hint = _id_from_bytes(msg.correlation_data)
        topic, topic_problem = self._response_topic(msg.response_topic)
        try:
            if topic_problem:
                raise RequestError(topic_problem, "bad_request")
            request = self._parse(msg, hint)
        except RequestError as exc:
            rid, context = self._fallback(msg, hint)
            self._count("parse_errors")
            log.info("request %s on %s refused: %s %s", rid, msg.topic, exc.code, exc)
            self._send(EdgeResponse.failure(rid, exc.code, str(exc), context).to_json_bytes(), [self._delivery(msg, topic, rid)])
            return
        rid = request.request_id
        delivery = self._delivery(msg, topic, rid)
        with self._lock:
            stored = self._finished.get(rid)
            if stored is not None:
                self._finished.move_to_end(rid)
            waiting = self._running.get(rid)
            if stored is None and waiting is not None:
                waiting.append(delivery)
            elif stored is None:
                self._running[rid] = [delivery]
        if stored is not None or waiting is not None:
            self._count("duplicates")
            log.debug("request %s: duplicate (%s); not computed again", rid, "answered" if stored else "in progress")
            if stored is not None:
                self._send(stored, [delivery])
            return
        left_ms = _expiry_left_ms(msg)
        if left_ms is not None and left_ms <= 0:
            with self._lock:
                waiting = self._running.pop(rid, [delivery])
            self._count("expired")
            log.info("request %s expired (MessageExpiryInterval %s s) before it was served", rid, msg.expiry_s)
            why = (f"the request's MessageExpiryInterval ({msg.expiry_s} s left when it arrived) ran out before it could be served; "
                   "send it again with a fresh image, or a longer expiry")  # fmt: skip
            self._send(EdgeResponse.failure(rid, "deadline", why, request.context).to_json_bytes(), waiting)
            return
        if left_ms is not None and left_ms < request.deadline_ms:
            request = replace(request, deadline_ms=left_ms)  # an answer after the message expired has nobody to read it
        log.debug("request %s: accepted from %s (%d bytes, deadline %.0f ms)", rid, msg.topic, msg.wire_bytes, request.deadline_ms)
        runtime = self.runtime
        assert runtime is not None  # _on_message holds requests until ``serve``
        on_partial = None
        if request.partials:
            model = runtime.large.name if runtime.large is not None else runtime.edge.name  # verified tokens are the large model's
            on_partial = partial(self._on_partial, rid, model, request.context)
        try:
            runtime.submit(request, partial(self._on_done, rid), on_partial)
        except RequestError as exc:
            with self._lock:
                waiting = self._running.pop(rid, [delivery])
            self._count("refused")
            log.info("request %s refused by the runtime: %s", rid, exc.code)
            self._send(EdgeResponse.failure(rid, exc.code, str(exc), request.context).to_json_bytes(), waiting)

    def _parse(self, msg: InboundMessage, hint: str | None) -> EdgeRequest:
        props = dict(msg.user_properties)
        if props.get("request_id") is not None:
            hint = props["request_id"]
        if _JSON_START.match(msg.payload):
            return request_from_json(msg.payload, self.limits, request_id=hint)
        return request_from_raw_image(msg.payload, props, self.limits, request_id=hint)

    def _response_topic(self, topic: str | None) -> tuple[str, str]:
        """(topic to answer on, problem with the request's ResponseTopic or "")."""
        if topic is None:
            return self.default_response_topic, ""
        problem = response_topic_problem(topic)
        return (self.default_response_topic, problem) if problem else (topic, "")

    def _fallback(self, msg: InboundMessage, hint: str | None) -> tuple[str, Any]:
        """The request's id and echoable context for an error response when the request itself could not be parsed."""
        rid, context = None, None
        if _JSON_START.match(msg.payload) and len(msg.payload) <= self.limits.max_payload_bytes:
            rid, context = _json_id_and_context(msg.payload, self.limits)
        prop = dict(msg.user_properties).get("request_id")
        if prop is not None and _ID.match(prop.encode("utf-8", "replace")):
            rid = prop
        return rid or hint or new_request_id(), context

    @staticmethod
    def _delivery(msg: InboundMessage, topic: str, rid: str) -> _Delivery:
        return _Delivery(msg, topic, msg.correlation_data if msg.correlation_data is not None else rid.encode("ascii"))

    # -- answers ----------------------------------------------------------------------------

    def _on_done(self, rid: str, response: EdgeResponse | None) -> None:
        """Runtime worker thread: publish the answer to every copy of the request, queue the acks."""
        with self._lock:
            waiting = self._running.pop(rid, [])
            if response is not None:
                data = response.to_json_bytes()
                self._finished[rid] = data
                while len(self._finished) > self.options.remember:
                    self._finished.popitem(last=False)
        if response is None:
            log.info("request %s was not served (the runtime is stopping); left unacknowledged for redelivery", rid)
            return
        log.debug("request %s: %s %s", rid, response.status, response.error_code or response.answer)
        self._send(data, waiting)

    def _on_partial(self, rid: str, model: str, context: Any, text: str) -> None:
        """Runtime worker thread: the answer so far to every copy of the request waiting, as a ``partial`` response.

        QoS 1 like the final response, so the broker keeps them in order; nothing is acknowledged
        (the request is acked on its final response only) and nothing is stored for duplicates.
        """
        with self._lock:
            waiting = list(self._running.get(rid, ()))
        data = EdgeResponse.partial(rid, text, model, context).to_json_bytes()
        for d in waiting:
            if self._closed.is_set():
                return
            try:
                self.client.publish(d.response_topic, data, qos=1, correlation_data=d.correlation_data, content_type=CONTENT_TYPE)
            except MsaoError as exc:  # a partial lost is superseded by the next one or the final response
                log.info("could not publish a partial response on %s (%s)", d.response_topic, exc)

    def _send(self, data: bytes, deliveries: list[_Delivery]) -> None:
        """Publish ``data`` to each delivery's response topic; its request is acked once the broker has it."""
        for d in deliveries:
            if self._closed.is_set():
                log.debug("intake closed: not answering %s; the broker redelivers it", d.correlation_data[:64])
                return
            try:
                report = self.client.publish(d.response_topic, data, qos=1, correlation_data=d.correlation_data, content_type=CONTENT_TYPE)
            except MsaoError as exc:
                self._count("publish_failures")
                log.warning("could not publish a response on %s (%s); its request stays unacknowledged", d.response_topic, exc)
                continue
            self._count("published")
            self._acks.put((report, d.message))

    def _ack_loop(self) -> None:
        """Acknowledge each request once the broker acknowledged its response (PUBACKs come in order)."""
        while True:
            item = self._acks.get()
            if item is _STOP:
                return
            report, message = item
            if self.client.wait_delivered(report, self.options.ack_timeout_s):
                if self.client.ack(message):
                    self._count("acked")
            else:
                log.warning("a response on %s was not confirmed by the broker; its request stays unacknowledged", message.topic)

    # -- small helpers ----------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _wait(self, cond: Callable[[], bool], timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if cond():
                    return True
            if time.monotonic() >= end:
                return False
            time.sleep(0.02)


def response_topic_problem(topic: str) -> str:
    """What is wrong with a request's ResponseTopic, or "" if the intake may publish there.

    Any other edge's or client's topic is allowed: who may publish where is the broker's ACL.
    """
    if not isinstance(topic, str) or not topic:
        return "the request's ResponseTopic is empty; leave it out to get the answer on the edge's response topic"
    if len(topic) > MAX_RESPONSE_TOPIC_CHARS:
        return f"the request's ResponseTopic is {len(topic)} characters, over the limit of {MAX_RESPONSE_TOPIC_CHARS}"
    if "+" in topic or "#" in topic:
        return f"the request's ResponseTopic {topic[:80]!r} contains a wildcard (+ or #); name one topic to publish to"
    if topic.startswith("$"):
        return f"the request's ResponseTopic {topic[:80]!r} starts with '$', which is reserved for the broker"
    if "\x00" in topic:
        return "the request's ResponseTopic contains a NUL character"
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        return "the request's ResponseTopic is not valid UTF-8"
    return ""


def _id_from_bytes(value: bytes | None) -> str | None:
    """CorrelationData as a request id, if it is one (ASCII ``[A-Za-z0-9_-]{1,64}``)."""
    if value is not None and _ID.match(value):
        return value.decode("ascii")
    return None


def _expiry_left_ms(msg: InboundMessage) -> float | None:
    """Milliseconds left of the request's MessageExpiryInterval now (None: it never expires).

    The broker forwards the remaining interval in whole seconds; 0 (under a second left) counts
    as expired. Time the message spent in this intake (held while starting) is taken off.
    """
    if msg.expiry_s is None:
        return None
    return msg.expiry_s * 1e3 - (time.monotonic() - msg.received_monotonic) * 1e3


def _json_id_and_context(payload: bytes | bytearray, limits: RequestLimits) -> tuple[str | None, Any]:
    """The ``request_id`` and ``context`` of a JSON request that failed to parse, where they can still be read safely."""
    try:
        doc = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, ints over 4300 digits
        return None, None
    if not isinstance(doc, dict):
        return None, None
    rid = doc.get("request_id")
    try:
        shallow = json_depth(doc, limits.max_json_depth) <= limits.max_json_depth
        context = context_from_value(doc.get("context"), limits) if shallow else None
    except RequestError:
        context = None  # the context itself is what was wrong: it is not echoed
    return (rid if isinstance(rid, str) and _ID.match(rid.encode("utf-8", "replace")) else None), context
