"""A small, defensive MQTT 5 client over paho-mqtt 2.x: the only module that talks to paho.

Knows topics only as strings and payloads only as bytes; jobs, workers and placement live
elsewhere. What it adds to paho, each for a fact that bites (docs/cloud_bridge.md):

- TCP_NODELAY on the socket as soon as it opens (paho never sets it; small messages otherwise
  stall ~40 ms on Nagle + delayed ACK);
- every callback guarded: an exception is logged and counted, never let into paho, where it
  would silently end the network thread (paho #894); slow callbacks are logged (paho #379);
- a watchdog thread that restarts a dead network thread and sweeps stale chunk reassembly;
- the broker's Maximum Packet Size read from CONNACK: bigger payloads are chunked, never
  published whole; chunks in flight are bounded by a window;
- a bounded outgoing queue (paho queues without limit by default), reconnect with backoff,
  re-subscription on every connect, session expiry set on purpose, a Last Will;
- optional manual acknowledgement (``ClientOptions.manual_ack``): ``ack(message)`` sends the
  PUBACK when the owner is done, from any thread, and never on a connection newer than the
  one the message came on (packet ids are per connection; the broker redelivers instead).

Callbacks given to this client run on the network thread and must be quick: no inference.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

from msao.cloud_bridge.chunking import CHUNK_PROPERTY, MAX_CHUNKS, ChunkHeader, Reassembler, split_payload
from msao.cloud_bridge.mqtt_options import BrokerUrl, ClientCounters, ClientOptions, InboundMessage, PublishReport, TlsOptions
from msao.errors import CloudUnavailable, CodecError, ConfigError, MissingDependency

__all__ = ["BridgeClient", "BrokerUrl", "ClientCounters", "ClientOptions", "InboundMessage", "PublishReport", "TlsOptions"]

log = logging.getLogger(__name__)

SLOW_CALLBACK_S = 0.5
MQTT_MAX_PACKET = 268_435_455  # the protocol's own ceiling (4-byte remaining length)


def _paho():
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:
        raise MissingDependency("paho-mqtt is not installed: pip install 'msao[edge]' (or 'msao[cloud]')") from exc
    return mqtt


class BridgeClient:
    """One MQTT 5 connection with the habits listed in the module docstring.

    Args:
        options: connection settings.
        on_message: called on the network thread with each whole inbound message; must be quick.
        on_connect: called on the network thread after every (re)connect and re-subscription.

    Attributes:
        last_connect_error: why the last connection attempt failed, in a sentence that names
            the fix (untrusted certificate, refused credentials, TLS port spoken to without
            TLS, ...); None once connected, or when paho gave no reason.
    """

    def __init__(self, options: ClientOptions, on_message: Callable[[InboundMessage], None], on_connect: Callable[[], None] | None = None):
        mqtt = _paho()
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.properties import Properties

        self.options = options
        self.url = BrokerUrl.parse(options.broker)
        self.counters = ClientCounters()
        self.tcp_nodelay = False
        self.last_connect_error: str | None = None
        self._handler = on_message
        self._on_connect_hook = on_connect
        self._subscriptions: dict[str, int] = {}
        self._suback_pending: set[int] = set()
        self._subscribed = threading.Event()
        self._connection = 0  # bumped on every connect and disconnect (under _lock)
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._reassembler = Reassembler(options.max_message_bytes, timeout_s=options.reassembly_timeout_s)
        self._broker_max_packet: int | None = None
        self._disconnected_since: float | None = time.monotonic()
        self._warned_down = False
        self._net_thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._Properties = Properties

        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=True,
            manual_ack=options.manual_ack,
        )
        c.suppress_exceptions = True  # second line of defence; our callbacks are guarded anyway
        c.max_queued_messages_set(options.max_queued_messages)
        c.max_inflight_messages_set(options.max_inflight)
        c.reconnect_delay_set(max(1, math.floor(options.reconnect_min_s)), max(1, math.ceil(options.reconnect_max_s)))
        if self.url.tls:
            tls = options.tls or TlsOptions()
            c.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
            c.tls_insecure_set(tls.insecure)
        elif options.tls is not None and (options.tls.ca_file or options.tls.cert_file):
            raise ConfigError(f"TLS files given but the broker URL {self.url} is not mqtts://")
        if options.username is not None:
            if options.password and not self.url.tls:
                log.warning("the broker password of %s crosses the network unencrypted to %s; use mqtts://", options.username, self.url)
            c.username_pw_set(options.username, options.password)
        if options.will_topic:
            c.will_set(options.will_topic, options.will_payload, qos=1, retain=True)
        c.on_socket_open = self._guard("on_socket_open", self._on_socket_open)
        c.on_connect = self._guard("on_connect", self._on_connect)
        c.on_connect_fail = self._guard("on_connect_fail", self._on_connect_fail)
        c.on_disconnect = self._guard("on_disconnect", self._on_disconnect)
        c.on_message = self._guard("on_message", self._on_message)
        c.on_subscribe = self._guard("on_subscribe", self._on_subscribe)
        self._mqtt = c

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> BridgeClient:
        """Connect in the background (retrying with backoff) and start the watchdog."""
        self._connect_async()
        self._watchdog = threading.Thread(target=self._watch, name=f"msao-mqtt-watchdog-{self.options.client_id}", daemon=True)
        self._watchdog.start()
        return self

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Connected, and the broker has answered (SUBACK) every subscription made so far."""
        end = time.monotonic() + timeout_s
        return self._connected.wait(timeout_s) and self._subscribed.wait(max(0.0, end - time.monotonic()))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stop(self, final: tuple[str, bytes] | None = None, timeout_s: float = 2.0) -> None:
        """Publish ``final`` (topic, payload; retained, e.g. an offline status), then disconnect cleanly."""
        if self._stopping.is_set():
            return
        if final is not None and self.connected:
            try:
                info = self._mqtt.publish(final[0], final[1], qos=1, retain=True)
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish the final status on %s: %s", final[0], exc)
        self._stopping.set()
        self._mqtt.disconnect()
        self._mqtt.loop_stop()
        if self._watchdog is not None:
            self._watchdog.join(timeout_s)
        self._connected.clear()
        log.info("MQTT client %s stopped (%s)", self.options.client_id, self.counters)

    def __enter__(self) -> BridgeClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- subscribing and publishing ----------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected, and again after every reconnect."""
        with self._lock:  # held across the call so a quick SUBACK finds its mid recorded
            self._subscriptions[topic_filter] = qos
            if self.connected:
                rc, mid = self._mqtt.subscribe(topic_filter, qos)
                if rc == _paho().MQTT_ERR_SUCCESS and mid is not None:
                    self._suback_pending.add(mid)
                    self._subscribed.clear()

    @property
    def max_packet_bytes(self) -> int:
        """The broker's Maximum Packet Size from CONNACK, or the configured default."""
        return self._broker_max_packet or self.options.default_max_packet_bytes

    def publish(
        self,
        topic: str,
        payload: bytes | bytearray,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        expiry_s: float | None = None,
        user_properties: tuple[tuple[str, str], ...] = (),
        content_type: str | None = None,
        timeout_s: float = 10.0,
    ) -> PublishReport:
        """Publish ``payload``, in chunks when it does not fit one packet; never whole above the limit.

        Chunked publishes wait for broker acknowledgements to keep at most ``chunk_window``
        chunks in flight (except on the network thread, which must not wait).

        Raises:
            CloudUnavailable: the outgoing queue is full (broker unreachable for a while), or
                chunks were not acknowledged within ``timeout_s``.
            PayloadTooLarge: the payload cannot be chunked under the broker's limit.
        """
        base = (response_topic, correlation_data, expiry_s, content_type)
        props = self._props(*base, user_properties)
        limit = self.max_packet_bytes
        if _packet_bytes(topic, props, len(payload)) <= limit:
            info = self._publish_one(topic, payload, qos, retain, props)
            self.counters.messages_out += 1
            return PublishReport(len(payload), 1, info)
        message_id = uuid.uuid4().hex[:16]
        widest = f"{message_id}:{MAX_CHUNKS - 1}:{MAX_CHUNKS}:{10**12 - 1}:{10**10 - 1}"  # longest header the format allows
        chunk_bytes = limit - _packet_bytes(topic, self._props(*base, (*user_properties, (CHUNK_PROPERTY, widest))), 0)
        in_loop = threading.current_thread() is self._net_thread
        window: deque = deque()
        deadline = time.monotonic() + timeout_s
        chunks = 0
        last = None
        for header, part in split_payload(payload, chunk_bytes, message_id):
            p = self._props(*base, (*user_properties, (CHUNK_PROPERTY, header.to_property())))
            while not in_loop and len(window) >= self.options.chunk_window:
                self._await(window.popleft(), deadline, topic)
            last = self._publish_one(topic, part.tobytes(), 1, False, p)
            window.append(last)
            chunks += 1
        while window and not in_loop:
            self._await(window.popleft(), deadline, topic)
        self.counters.messages_out += 1
        self.counters.chunks_out += chunks
        # the broker acknowledges QoS 1 in order, so the last chunk's PUBACK covers them all
        return PublishReport(len(payload), chunks, last)

    def wait_delivered(self, report: PublishReport, timeout_s: float) -> bool:
        """Wait until the broker acknowledged a QoS 1 publish (QoS 0: once written).

        Returns False at ``timeout_s``, or as soon as the connection is down: paho would send
        the message again after a reconnect, but nothing tied to the old connection (such as
        a manual ack) can follow it. Safe to call from any thread except the network thread.
        """
        info = report.handle
        if info is None:
            return True
        end = time.monotonic() + timeout_s
        try:
            while not info.is_published():
                left = end - time.monotonic()
                if left <= 0 or not self.connected:
                    return False
                info.wait_for_publish(min(0.05, left))
        except (RuntimeError, ValueError):  # paho: the message was never queued
            return False
        return True

    def ack(self, message: InboundMessage) -> bool:
        """Send the PUBACK for ``message`` now (``manual_ack`` only); safe from any thread.

        Nothing is sent for QoS 0, for reassembled chunked messages (their chunks were
        acknowledged on arrival), without ``manual_ack`` (paho acknowledged on delivery), or
        when the connection the message came on has gone: packet ids belong to a connection,
        and the broker redelivers the message on the next one, which is what the owner wants.

        Returns:
            True if a PUBACK was queued for the socket.
        """
        if not self.options.manual_ack or message.qos == 0 or message.mid is None:
            return False
        with self._lock:  # the connection number cannot change while the PUBACK is queued
            if message.connection != self._connection or not self._connected.is_set():
                self.counters.acks_skipped += 1
                log.debug("not acknowledging mid %s on %s: its connection is gone; the broker redelivers", message.mid, message.topic)
                return False
            rc = self._mqtt.ack(message.mid, message.qos)
        if rc != _paho().MQTT_ERR_SUCCESS:
            self.counters.acks_skipped += 1
            return False
        self.counters.acks += 1
        return True

    def _props(self, response_topic, correlation_data, expiry_s, content_type, user_properties):
        props = self._Properties(_packet_type("PUBLISH"))
        if response_topic:
            props.ResponseTopic = response_topic
        if content_type:
            props.ContentType = content_type
        if correlation_data is not None:
            props.CorrelationData = correlation_data
        if expiry_s is not None:
            props.MessageExpiryInterval = max(1, math.ceil(expiry_s))
        if user_properties:
            props.UserProperty = list(user_properties)
        return props

    def _publish_one(self, topic: str, payload, qos: int, retain: bool, props):
        mqtt = _paho()
        info = self._mqtt.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise CloudUnavailable(
                f"MQTT outgoing queue is full ({self.options.max_queued_messages} messages) while publishing to {topic}: "
                f"the broker {self.url} has been unreachable; fall back to local execution"
            )
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN) or (info.rc == mqtt.MQTT_ERR_NO_CONN and qos == 0):
            raise CloudUnavailable(f"publish to {topic} failed: {mqtt.error_string(info.rc)}; is the broker {self.url} reachable?")
        return info

    def _await(self, info, deadline: float, topic: str) -> None:
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        if not info.is_published():
            raise CloudUnavailable(f"the broker {self.url} did not acknowledge chunks on {topic} in time; link down or too slow")

    # -- paho callbacks (all run on the network thread, all guarded) --------------------------

    def _guard(self, name: str, fn: Callable) -> Callable:
        def guarded(*args):
            t0 = time.perf_counter()
            try:
                fn(*args)
            except Exception:
                self.counters.callback_errors += 1
                log.exception(
                    "MQTT callback %s of %s raised; dropped the event, the network thread keeps running", name, self.options.client_id
                )
            dt = time.perf_counter() - t0
            if dt > SLOW_CALLBACK_S:
                self.counters.slow_callbacks += 1
                log.warning("MQTT callback %s took %.2f s; slow callbacks delay keepalives and every other message", name, dt)

        return guarded

    def _on_socket_open(self, client, userdata, sock) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.tcp_nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except (OSError, AttributeError) as exc:
            self.tcp_nodelay = False
            log.warning("could not set TCP_NODELAY on the MQTT socket (%s); small messages may stall ~40 ms", exc)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_connect_error = (
                f"the broker {self.url} refused {self.options.client_id}: {reason_code} (check --username and "
                "$MSAO_MQTT_PASSWORD, or the client certificate, and the broker's password file)"
            )
            log.error(
                "broker %s refused %s: %s (check credentials, client id and TLS settings)", self.url, self.options.client_id, reason_code
            )
            return
        stated = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self._broker_max_packet = int(stated) if stated else None
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        if receive_max and int(receive_max) < self.options.max_inflight:
            # paho 2.x ignores Receive Maximum and cannot change in-flight limits once connected
            log.warning(
                "broker %s allows %s QoS 1 messages in flight, fewer than max_inflight=%d; lower it",
                self.url,
                receive_max,
                self.options.max_inflight,
            )
        self.counters.connects += 1
        self.last_connect_error = None
        with self._lock:
            subs = list(self._subscriptions.items())
            self._disconnected_since = None
            self._warned_down = False
            self._connection += 1
            self._suback_pending.clear()
            for topic_filter, qos in subs:
                rc, mid = client.subscribe(topic_filter, qos)
                if rc == _paho().MQTT_ERR_SUCCESS and mid is not None:
                    self._suback_pending.add(mid)
            if self._suback_pending:
                self._subscribed.clear()
            else:
                self._subscribed.set()
            self._connected.set()
        log.info(
            "connected to %s as %s (max packet %s, session present %s, TCP_NODELAY %s)",
            self.url, self.options.client_id, stated or f"not stated, using {self.options.default_max_packet_bytes}",
            flags.session_present, self.tcp_nodelay,
        )  # fmt: skip
        if self._on_connect_hook is not None:
            self._on_connect_hook()

    def _on_connect_fail(self, client, userdata) -> None:
        # paho 2.2 calls this inside its `except OSError` around the connect, so the error being
        # handled is the reason; should a later paho not, the reason is just unknown (None).
        reason = _connect_failure(sys.exc_info()[1], self.url)
        with self._lock:
            first = not self._warned_down
            self._warned_down = True
            changed = reason is not None and reason != self.last_connect_error
            if reason is not None:
                self.last_connect_error = reason
        if changed:  # a TLS failure is a configuration error; anything else may pass (broker restarting)
            level = logging.ERROR if isinstance(sys.exc_info()[1], ssl.SSLError) else logging.WARNING
            log.log(level, "cannot connect: %s; retrying with backoff up to %.0f s", reason, self.options.reconnect_max_s)
        elif first:
            log.warning("cannot connect to %s yet; retrying with backoff up to %.0f s", self.url, self.options.reconnect_max_s)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._connected.is_set() and self.last_connect_error is None and not self._stopping.is_set():
            self.last_connect_error = f"{self.url} closed the connection before answering CONNECT ({reason_code})" + (
                "" if self.url.tls else "; if that port speaks TLS, use mqtts://"
            )
        with self._lock:
            self._connected.clear()
            self._connection += 1
            self._disconnected_since = time.monotonic()
        self.counters.disconnects += 1
        if not self._stopping.is_set():
            log.warning("disconnected from %s (%s); reconnecting", self.url, reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("broker %s refused a subscription of %s: %s (check the broker's ACL)", self.url, self.options.client_id, refused)
        with self._lock:
            self._suback_pending.discard(mid)
            if not self._suback_pending:
                self._subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:
        now = time.monotonic()
        with self._lock:
            connection = self._connection
        props = msg.properties
        user = tuple((str(k), str(v)) for k, v in (getattr(props, "UserProperty", None) or ()))
        chunk = next((v for k, v in user if k == CHUNK_PROPERTY), None)
        payload, chunks = msg.payload, 1
        self.counters.chunks_in += 1
        mid = msg.mid if msg.qos > 0 else None
        if chunk is not None:
            if self.options.manual_ack and msg.qos > 0:  # a chunk is acknowledged on arrival, whatever becomes of it
                self._ack_now(msg.mid, msg.qos)
            mid = None
            try:
                header = ChunkHeader.from_property(chunk)
                with self._lock:
                    whole = self._reassembler.add(msg.topic, header, payload, now)
            except CodecError as exc:
                self.counters.dropped_in += 1
                log.warning("dropped a chunk on %s: %s", msg.topic, exc)
                return
            if whole is None:
                return
            payload, chunks = whole, header.count
            user = tuple(kv for kv in user if kv[0] != CHUNK_PROPERTY)
        self.counters.messages_in += 1
        corr = getattr(props, "CorrelationData", None)
        inbound = InboundMessage(
            topic=msg.topic,
            payload=payload,
            response_topic=getattr(props, "ResponseTopic", None),
            correlation_data=bytes(corr) if corr is not None else None,
            expiry_s=getattr(props, "MessageExpiryInterval", None),
            user_properties=user,
            retained=bool(msg.retain),
            received_monotonic=now,
            wire_bytes=len(payload),
            chunks=chunks,
            mid=mid,
            qos=int(msg.qos),
            connection=connection,
        )
        try:
            self._handler(inbound)
        except Exception:
            # a message whose handler raises would come back at every reconnect and raise again
            self.ack(inbound)
            raise

    def _ack_now(self, mid: int, qos: int) -> None:
        if self._mqtt.ack(mid, qos) == _paho().MQTT_ERR_SUCCESS:
            self.counters.acks += 1

    # -- network thread and watchdog ----------------------------------------------------------

    def _connect_async(self) -> None:
        from paho.mqtt.properties import Properties

        connect = Properties(_packet_type("CONNECT"))
        connect.SessionExpiryInterval = self.options.session_expiry_s
        # tells the broker not to forward anything we would refuse anyway
        connect.MaximumPacketSize = min(MQTT_MAX_PACKET, self.options.max_message_bytes + 65536)
        if self.options.session_expiry_s == 0:
            clean = True
        else:
            clean = False if self.options.resume_session else _paho().MQTT_CLEAN_START_FIRST_ONLY
        self._mqtt.connect_async(self.url.host, self.url.port, self.options.keepalive_s, clean_start=clean, properties=connect)
        self._mqtt.loop_start()
        # paho 2.x keeps its network thread in Client._thread; watched so a dead one is noticed
        self._net_thread = getattr(self._mqtt, "_thread", None)

    def _watch(self) -> None:
        while not self._stopping.wait(self.options.watchdog_interval_s):
            try:
                self._check()
            except Exception:
                log.exception("MQTT watchdog check failed; will retry")

    def _check(self) -> None:
        with self._lock:
            self._reassembler.expire()
            down_since = self._disconnected_since
        thread = self._net_thread
        if thread is not None and not thread.is_alive() and not self._stopping.is_set():
            self.counters.loop_restarts += 1
            self._connected.clear()
            log.error("MQTT network thread of %s died; restarting it and reconnecting to %s", self.options.client_id, self.url)
            self._connect_async()
        if down_since is not None and time.monotonic() - down_since > 3 * self.options.keepalive_s and not self._warned_down:
            self._warned_down = True
            log.warning("no connection to %s for %.0f s; cloud jobs will fail over to the edge", self.url, time.monotonic() - down_since)


def _connect_failure(exc: BaseException | None, url: BrokerUrl) -> str | None:
    """Why a connection attempt failed, and what to change, from the OSError paho caught."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: {url} presented a certificate this client does not trust ({exc.verify_message}); give --ca-file "
            "the CA that signed the broker's certificate, and connect by a host name or address the certificate lists"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {url} failed ({exc.reason or exc}); is that port TLS (mqtts://), and are --cert-file/--key-file right?"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing accepts connections at {url} (connection refused); is the broker running on that port?"
    if isinstance(exc, OSError):
        return f"{url}: {exc.strerror or exc}"
    return None


def _packet_type(name: str):
    from paho.mqtt.packettypes import PacketTypes

    return getattr(PacketTypes, name)


def _packet_bytes(topic: str, props, payload_bytes: int) -> int:
    """Upper bound of a QoS 1 PUBLISH packet's size: fixed header, topic, packet id, properties, payload."""
    return 1 + 4 + 2 + len(topic.encode("utf-8")) + 2 + len(props.pack()) + payload_bytes
