"""The benchmark's topology: a broker, cloud workers, a shaped link and slower edge daemons that come and go.

    client ──HTTP (local, unshaped)──► msao edge  (cgroup share of one core, or time-dilated)
                                          │ MQTT, through the ShapingProxy (profile: delay, jitter, rate)
                                          ▼
                                       Mosquitto ◄── msao cloud (unthrottled)

Requests reach a daemon over its local HTTP API, as a camera on the Jetson would; only the
edge–cloud path crosses the emulated network. Each daemon is fresh, so its estimates, memory
peak and CPU time belong to whoever started it alone.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from testbed.broker import Broker, start_broker
from testbed.cloud import CloudWorker
from testbed.edge import EdgeDaemon
from testbed.process import free_port
from testbed.shaping import LinkShape, ShapingProxy
from testbed.stats import cpu_seconds
from testbed.throttle import CpuThrottle

__all__ = ["Stack"]

EDGE_READY_TIMEOUT_S = 240.0  # loading two bundles on a throttled edge, then seeing a worker


class Stack:
    """Broker + cloud workers + shaping proxy for one run; edge daemons come and go. A context manager.

    Args:
        work: folder for configs and logs.
        edge_bundle / cloud_bundle / calibration: what the processes serve.
        workers: cloud worker processes.
        edge_share: cores each edge daemon may use (cgroup quota); None = unthrottled.
        edge_dilation: each edge daemon emulates a device this many times slower; None = its own speed.
        edge_dilation_profile: instead, a device profile file (one factor per kind of edge work).
    """

    def __init__(
        self,
        work: Path,
        edge_bundle: Path,
        cloud_bundle: Path,
        calibration: Path | None,
        workers: int = 1,
        edge_share: float | None = 0.25,
        edge_dilation: float | None = None,
        edge_dilation_profile: str = "",
    ):
        if edge_dilation is not None and edge_dilation_profile:
            raise ValueError("edge_dilation or edge_dilation_profile, not both")
        self.work = work
        self.edge_bundle, self.cloud_bundle, self.calibration = edge_bundle, cloud_bundle, calibration
        self.workers_wanted = workers
        self.edge_share = edge_share
        self.edge_dilation = edge_dilation
        self.edge_dilation_profile = edge_dilation_profile
        self.broker: Broker | None = None
        self.workers: list[CloudWorker] = []
        self.proxy: ShapingProxy | None = None
        self._edges: list[tuple[EdgeDaemon, CpuThrottle | None]] = []

    def __enter__(self) -> Stack:
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self.broker = start_broker(self.work / "broker")
            for i in range(self.workers_wanted):
                self.workers.append(
                    CloudWorker(f"bench-cloud-{i}", self.cloud_bundle, self.broker.url, self.work / f"cloud-{i}.log", verbosity="-v")
                )
            self.proxy = ShapingProxy("127.0.0.1", self.broker.port).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    @property
    def broker_url(self) -> str:
        assert self.broker is not None, "the stack is not started"
        return self.broker.url

    def shape(self, shape: LinkShape) -> None:
        assert self.proxy is not None, "the stack is not started"
        self.proxy.set_shape(shape)

    def start_edge(self, name: str, policy: str, extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> EdgeDaemon:
        """A fresh, slowed `msao edge` whose MQTT goes through the proxy; ready and collaborative when returned."""
        assert self.proxy is not None, "the stack is not started"
        port = free_port()
        args = [
            "--broker", f"mqtt://127.0.0.1:{self.proxy.port}", "--edge-id", f"bench-{uuid.uuid4().hex[:6]}",
            "--http", f"127.0.0.1:{port}", "--no-mqtt-intake", "--bundle", str(self.edge_bundle),
            "--large-bundle", str(self.cloud_bundle), "--calibration", str(self.calibration) if self.calibration else "",
            "--policy", policy, *extra,
        ]  # fmt: skip
        environment = {**os.environ, "MSAO_RUNTIME_PROBE_INTERVAL_S": "2", **(env or {})}
        throttle = CpuThrottle(self.edge_share).__enter__() if self.edge_share is not None else None
        try:
            daemon = EdgeDaemon(
                args,
                self.work / f"edge-{name}.log",
                port,
                environment,
                throttle,
                self.edge_dilation,
                dilation_profile=self.edge_dilation_profile,
            )
        except BaseException:
            if throttle is not None:
                throttle.__exit__()
            raise
        self._edges.append((daemon, throttle))
        try:
            daemon.wait_ready(EDGE_READY_TIMEOUT_S, collaborative=True)
        except BaseException:
            self.stop_edge(daemon)
            raise
        return daemon

    def stop_edge(self, daemon: EdgeDaemon) -> None:
        """Stop one daemon and release its cgroup."""
        for i, (d, throttle) in enumerate(self._edges):
            if d is daemon:
                del self._edges[i]
                daemon.stop()
                if throttle is not None:
                    throttle.__exit__()
                return
        daemon.stop()

    def replace_worker(self, index: int = 0) -> CloudWorker:
        """SIGKILL worker ``index`` (a crash: nothing flushed, no offline status of its own) and start a fresh one in its place.

        What a supervisor does after a crash; the new worker has a new id, as a restarted container would.
        """
        old = self.workers[index]
        if old.alive():
            old.kill()
        n = len(list(self.work.glob("cloud-*.log")))
        self.workers[index] = CloudWorker(
            f"bench-cloud-{n}", self.cloud_bundle, self.broker_url, self.work / f"cloud-{n}.log", verbosity="-v"
        )
        return self.workers[index]

    def broker_cpu_seconds(self) -> float:
        assert self.broker is not None, "the stack is not started"
        return cpu_seconds(self.broker.process.pid)

    def cloud_cpu_seconds(self) -> float:
        return sum(cpu_seconds(w.pid) for w in self.workers if w.alive())

    def __exit__(self, *exc: object) -> None:
        for daemon, _ in list(self._edges):
            self.stop_edge(daemon)
        if self.proxy is not None:
            self.proxy.stop()
        for w in self.workers:
            if w.alive():
                w.process.terminate()
        for w in self.workers:
            w.stop(15)
        if self.broker is not None:
            self.broker.stop()
