"""A bare paho MQTT 5 client that records everything, for playing an honest or a malicious party.

A malicious edge is not bound to msao's client, so the negative tests speak MQTT through this
probe: it reports CONNACK, SUBACK and PUBACK reason codes as strings ("Success",
"Not authorized", "Granted QoS 1", ...) and keeps every message it receives.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from msao.cloud_bridge.mqtt_options import BrokerUrl

__all__ = ["Probe", "Received"]


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None
    correlation_data: bytes | None


class Probe:
    """One MQTT 5 connection over TLS to ``url``; use as a context manager.

    Args:
        user / password: credentials (None: none sent).
        ca_file: CA the probe trusts for the broker's certificate.
        cert: (certificate, key) to present, for the client-certificate listener.
        client_id: default a random one.
        session_expiry_s / clean_start: for session take-over tests.
    """

    def __init__(
        self,
        url: str,
        user: str | None,
        password: str | None,
        ca_file: Path,
        *,
        cert: tuple[Path, Path] | None = None,
        client_id: str | None = None,
        session_expiry_s: int = 0,
        clean_start: bool = True,
    ):
        self.url = BrokerUrl.parse(url)
        self.user = user
        self.client_id = client_id or f"probe-{user}-{uuid.uuid4().hex[:8]}"
        self.messages: list[Received] = []
        self.connack: str | None = None
        self.disconnect_reason: str | None = None
        self._subacks: dict[int, list[str]] = {}
        self._sync_topics: set[str] = set()
        self._pubacks: dict[int, str] = {}
        self._cond = threading.Condition()
        self._session_expiry_s = session_expiry_s
        self._clean_start = clean_start
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5, reconnect_on_failure=False)
        c.tls_set(ca_certs=str(ca_file), certfile=str(cert[0]) if cert else None, keyfile=str(cert[1]) if cert else None)
        if user is not None:
            c.username_pw_set(user, password)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self.client = c

    # -- lifecycle -----------------------------------------------------------------------------

    def connect(self, timeout_s: float = 5.0) -> str:
        """Connect and return the CONNACK reason ("Success", "Not authorized", ...); raises what TLS raises."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        self.client.connect(self.url.host, self.url.port, keepalive=30, clean_start=self._clean_start, properties=props)
        self.client.loop_start()
        self._wait(lambda: self.connack is not None or self.disconnect_reason is not None, timeout_s)
        return self.connack or f"no CONNACK (disconnected: {self.disconnect_reason})"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Probe:
        reason = self.connect()
        assert reason == "Success", f"{self.client_id} could not connect to {self.url}: {reason}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- actions -------------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, timeout_s: float = 5.0) -> list[str]:
        """Subscribe at QoS 1 and return the SUBACK reason codes."""
        rc, mid = self.client.subscribe(topic_filter, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe {topic_filter}: {mqtt.error_string(rc)}"
        self._wait(lambda: mid in self._subacks, timeout_s)
        return self._subacks.get(mid, ["no SUBACK"])

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        timeout_s: float = 5.0,
    ) -> str:
        """Publish at QoS 1 and return the PUBACK reason ("Success", "No matching subscribers", "Not authorized")."""
        props = Properties(PacketTypes.PUBLISH)
        if response_topic:
            props.ResponseTopic = response_topic
        if correlation_data is not None:
            props.CorrelationData = correlation_data
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        self._wait(lambda: info.mid in self._pubacks, timeout_s)
        return self._pubacks.get(info.mid, "no PUBACK")

    def received(self, topic: str | None = None, marker: bytes | None = None) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if (topic is None or m.topic == topic) and (marker is None or marker in m.payload)]

    def wait_for(self, marker: bytes, timeout_s: float = 5.0) -> list[Received]:
        """Messages whose payload holds ``marker``, once at least one arrived (or the timeout passed)."""
        self._wait(lambda: any(marker in m.payload for m in self.messages), timeout_s)
        return self.received(marker=marker)

    def sync(self, topic: str, timeout_s: float = 5.0) -> None:
        """Publish a marker to ``topic`` (one this user may write and read) and wait for it to come back.

        The broker forwards messages to one client in the order it accepted them, so afterwards
        everything it was going to forward to this client from before has arrived.
        """
        if topic not in self._sync_topics:
            assert self.subscribe(topic) == ["Granted QoS 1"], topic
            self._sync_topics.add(topic)
        marker = f"sync-{uuid.uuid4().hex}".encode()
        reason = self.publish(topic, marker)
        assert reason == "Success", f"{self.client_id} may not publish its sync message to {topic}: {reason}"
        assert self.wait_for(marker, timeout_s), f"{self.client_id} did not get its own message back on {topic}"

    # -- paho callbacks ------------------------------------------------------------------------

    def _wait(self, predicate, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        with self._cond:
            while not predicate():
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self.connack = str(reason_code)
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self.disconnect_reason = str(reason_code)
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self._subacks[mid] = [str(rc) for rc in reason_codes]
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._pubacks[mid] = str(reason_code)
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        props = msg.properties
        corr = getattr(props, "CorrelationData", None)
        with self._cond:
            self.messages.append(
                Received(msg.topic, bytes(msg.payload), bool(msg.retain), getattr(props, "ResponseTopic", None), corr and bytes(corr))
            )
            self._cond.notify_all()
