"""What an MQTT connection is configured with, and the records it hands out; no paho in here.

Split from ``client.py`` so that options can be built, checked and printed (``msao cloud
--help``, configs, tests) without importing paho.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from msao.errors import ConfigError

__all__ = ["BrokerUrl", "ClientCounters", "ClientOptions", "InboundMessage", "PublishReport", "TlsOptions"]


@dataclass(frozen=True)
class BrokerUrl:
    """``mqtt://host:port`` (plain TCP, default port 1883) or ``mqtts://host:port`` (TLS, 8883)."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/") or parts.username:
            raise ConfigError(
                f"broker {url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT (credentials go in --username / MSAO_MQTT_PASSWORD)"
            )
        try:
            port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        except ValueError as exc:
            raise ConfigError(f"broker {url!r}: bad port ({exc})") from exc
        return cls(parts.hostname, port, parts.scheme == "mqtts")

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsOptions:
    """TLS for ``mqtts://``: CA bundle (None = system CAs), client certificate, and an escape hatch.

    Attributes:
        insecure: skip host name verification (the certificate chain is still checked); tests only.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"TLS file {path!r} does not exist")
        if self.key_file and not self.cert_file:
            raise ConfigError("--key-file needs --cert-file")


@dataclass(frozen=True)
class ClientOptions:
    """How to connect and how much to buffer.

    Attributes:
        broker: ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT``.
        client_id: unique per connection; a second client with the same id kicks the first off.
        session_expiry_s: how long the broker keeps this client's session after a disconnect.
            Workers use 0 so a dead worker's shared-subscription messages are not held for it;
            edges use a little so results published during a network blip are delivered.
        keepalive_s: ping interval; a dead connection is noticed after ~1.5x this.
        max_queued_messages: QoS 1 messages paho may hold while the broker is unreachable; a
            publish beyond this raises ``CloudUnavailable`` instead of growing memory.
        max_inflight: unacknowledged QoS 1 messages at once (capped by the broker's Receive Maximum).
        reconnect_min_s / reconnect_max_s: reconnect backoff bounds (doubling in between).
        default_max_packet_bytes: packet size limit assumed when CONNACK does not state one
            (Mosquitto 2.0 states none but proxies and bridges may still have one).
        max_message_bytes: largest (reassembled) message accepted from the broker.
        chunk_window: chunks published but not yet acknowledged by the broker, per publish call.
        reassembly_timeout_s: a chunked message not complete this long after its first chunk is dropped.
        tls / username / password: broker credentials (password never logged).
        will_topic / will_payload: retained Last Will the broker publishes if this client dies.
        watchdog_interval_s: how often the watchdog checks the network thread.
        manual_ack: QoS 1 messages are acknowledged only when the owner calls
            ``BridgeClient.ack(message)`` (e.g. after answering), so the broker redelivers what
            was not finished when the connection or the process died. Chunks of a chunked
            message are acknowledged one by one as they arrive (the whole message has no
            single PUBACK). Unacknowledged messages count against the broker's in-flight
            window for this client (Mosquitto ``max_inflight_messages``, default 20).
        resume_session: connect with Clean Start 0 even the first time, so a restarted process
            with the same ``client_id`` picks up the session (subscriptions, unacknowledged and
            queued messages) its predecessor left; needs ``session_expiry_s > 0``. False: the
            first connect of this object starts a clean session, reconnects resume it.
    """

    broker: str
    client_id: str
    session_expiry_s: int = 0
    keepalive_s: int = 30
    max_queued_messages: int = 1000
    max_inflight: int = 20
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    default_max_packet_bytes: int = 1_000_000
    max_message_bytes: int = 64 * 1024 * 1024
    chunk_window: int = 8
    reassembly_timeout_s: float = 30.0
    tls: TlsOptions | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    will_topic: str | None = None
    will_payload: bytes = b""
    watchdog_interval_s: float = 1.0
    manual_ack: bool = False
    resume_session: bool = False

    def __post_init__(self) -> None:
        BrokerUrl.parse(self.broker)
        if not self.client_id or len(self.client_id) > 128:
            raise ConfigError(f"client id {self.client_id!r} must be 1-128 characters")
        if self.session_expiry_s < 0 or self.keepalive_s < 5 or self.max_queued_messages < 1 or self.max_inflight < 1:
            raise ConfigError(f"session expiry >= 0, keepalive >= 5 s, queue and in-flight >= 1; got {self}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError(f"reconnect backoff needs 0 < min <= max, got {self.reconnect_min_s}, {self.reconnect_max_s}")
        if self.default_max_packet_bytes < 1024 or self.chunk_window < 1:
            raise ConfigError("default_max_packet_bytes must be >= 1024 and chunk_window >= 1")
        if self.resume_session and self.session_expiry_s == 0:
            raise ConfigError("resume_session needs session_expiry_s > 0: a session that expires at once cannot be resumed")


@dataclass(frozen=True)
class InboundMessage:
    """A whole message (chunks already reassembled) as the owner's handler sees it.

    Attributes:
        expiry_s: remaining MessageExpiryInterval as forwarded by the broker (None = never expires).
        received_monotonic: ``time.monotonic()`` when the last chunk arrived.
        wire_bytes / chunks: payload bytes received and MQTT messages they came in.
        mid / qos: packet id and QoS of the PUBLISH, for ``BridgeClient.ack`` under
            ``manual_ack`` (mid None: nothing left to acknowledge, e.g. a reassembled chunked
            message whose chunks were acknowledged as they arrived).
        connection: the client's connection number when the message arrived; an ack for an
            earlier connection is not sent (the broker redelivers the message instead).
    """

    topic: str
    payload: bytes | bytearray
    response_topic: str | None
    correlation_data: bytes | None
    expiry_s: int | None
    user_properties: tuple[tuple[str, str], ...]
    retained: bool
    received_monotonic: float
    wire_bytes: int
    chunks: int
    mid: int | None = None
    qos: int = 0
    connection: int = 0


@dataclass(frozen=True)
class PublishReport:
    """What one ``publish`` put on the wire: payload bytes and MQTT messages (chunks).

    Attributes:
        handle: paho's record of the last packet published (opaque here); give the report to
            ``BridgeClient.wait_delivered`` to learn when the broker has acknowledged it.
    """

    wire_bytes: int
    chunks: int
    handle: object = field(default=None, compare=False, repr=False)


@dataclass
class ClientCounters:
    """Counters since start (read them for metrics; written only by the client)."""

    connects: int = 0
    disconnects: int = 0
    callback_errors: int = 0
    slow_callbacks: int = 0
    loop_restarts: int = 0
    messages_in: int = 0
    chunks_in: int = 0
    dropped_in: int = 0
    messages_out: int = 0
    chunks_out: int = 0
    acks: int = 0
    acks_skipped: int = 0
