"""The edge daemon's retained status on ``msao/v1/edge/<edge_id>/status``, kept true by its MQTT intake.

Integrators need one question answered before they send anything: will a request sent now be
served? A connected socket does not say that (the models may still be loading), so the status
follows the runtime's readiness and mode, not the connection:

    intake connects ──► starting   (runtime loading, or not started: requests wait in the session)
    serve(runtime)  ──► online, ready, mode collaborative | edge-only   (re-published when the mode changes)
    intake.stop()   ──► stopping ──► offline            (a clean stop, published before DISCONNECT)
    connection lost ──► offline                         (the broker's Last Will, set at CONNECT)

Every (re)connect publishes the current status again, so a Last Will fired by a network blip
is replaced as soon as the daemon is back. Knows the runtime only through ``health()``; knows
MQTT only through ``BridgeClient.publish``.
"""

from __future__ import annotations

import logging
import threading
import time

from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.messages import EdgeStatus
from msao.cloud_bridge.topics import edge_status_topic
from msao.edge_runtime.runtime import EdgeRuntime
from msao.errors import MsaoError

__all__ = ["StatusReporter"]

log = logging.getLogger(__name__)


class StatusReporter:
    """Publishes one edge's retained ``EdgeStatus`` on one client: on connect, on change, at stop.

    Args:
        edge_id: the daemon's edge id (the status topic's).
        check_s: how often the runtime's readiness and mode are looked at between events.

    Attributes:
        topic: ``msao/v1/edge/<edge_id>/status``.
        will: the Last Will payload (``offline``, ``updated_unix_s`` 0), for ``ClientOptions``.
    """

    def __init__(self, edge_id: str, check_s: float = 2.0):
        self.edge_id = edge_id
        self.topic = edge_status_topic(edge_id)
        self.will = EdgeStatus(edge_id, "offline").to_json_bytes()
        self.check_s = check_s
        self._client: BridgeClient | None = None
        self._runtime: EdgeRuntime | None = None
        self._was_ready = False
        self._stopping = False
        self._last: tuple[str, str] | None = None  # (state, mode) last published
        self._lock = threading.Lock()  # one publisher at a time, so the broker sees them in order
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, client: BridgeClient) -> None:
        """Watch the runtime on a thread of its own and publish on ``client`` (connects publish via ``on_connect``)."""
        self._client = client
        self._thread = threading.Thread(target=self._loop, name=f"msao-intake-status-{self.edge_id}", daemon=True)
        self._thread.start()

    def serve(self, runtime: EdgeRuntime) -> None:
        self._runtime = runtime
        self.publish()

    def stopping(self) -> None:
        self._stopping = True
        self.publish()

    def stop(self) -> bytes:
        """End the watcher; the final ``offline`` payload, for ``BridgeClient.stop(final=...)``."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(self.check_s + 1.0)
        with self._lock:
            self._last = ("offline", "")
        return EdgeStatus(self.edge_id, "offline", round(time.time(), 3)).to_json_bytes()

    def current(self) -> EdgeStatus:
        """What is true now (see the module docstring for the states)."""
        runtime = self._runtime
        if self._stopping:
            return EdgeStatus(self.edge_id, "stopping", round(time.time(), 3))
        if runtime is None:
            return EdgeStatus(self.edge_id, "starting", round(time.time(), 3))
        health = runtime.health()
        if health["ready"]:
            self._was_ready = True
            return EdgeStatus(self.edge_id, "online", round(time.time(), 3), ready=True, mode=health["mode"])
        # the runtime stopped before the intake (the daemon's stop order), or was never started
        return EdgeStatus(self.edge_id, "stopping" if self._was_ready else "starting", round(time.time(), 3))

    def publish(self, force: bool = False) -> None:
        """Publish the current status (retained, QoS 1) if it changed since the last one, or always with ``force``."""
        client = self._client
        if client is None or self._done.is_set():
            return
        with self._lock:
            status = self.current()
            key = (status.state, status.mode)
            if key == self._last and not force:
                return
            try:
                client.publish(self.topic, status.to_json_bytes(), qos=1, retain=True)
            except MsaoError as exc:  # not connected and paho's queue full: the next connect publishes it
                log.debug("edge status %s not published (%s); sent again on the next connect", status.state, exc)
                return
            self._last = key
        log.info("edge %s status: %s%s", self.edge_id, status.state, f" ({status.mode})" if status.mode else "")

    def _loop(self) -> None:
        while not self._done.wait(self.check_s):
            try:
                self.publish()
            except Exception:  # a bug in a status must not end the watcher: log it, try again next tick
                log.exception("could not compute the edge status; trying again in %.0f s", self.check_s)
