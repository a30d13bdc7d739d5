"""The benchmark's processes: a broker, cloud workers, a shaped link and a throttled edge daemon.

    client ──HTTP (local, unshaped)──► msao edge  (cgroup: `edge_share` of one core)
                                          │ MQTT, through the ShapingProxy (profile: delay, jitter, rate)
                                          ▼
                                       Mosquitto ◄── msao cloud (unthrottled)

Requests reach the daemon over its local HTTP API, as a camera on the Jetson would; only the
edge–cloud path crosses the emulated network. Each (profile, policy) cell gets a fresh daemon,
so its estimates, memory peak and CPU time belong to that cell alone.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.shaping_proxy import LinkShape, ShapingProxy
from bench.throttle import CpuThrottle

__all__ = ["cpu_seconds", "EdgeDaemon", "free_port", "peak_rss_bytes", "Stack"]

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its reaped children (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks  # utime stime cutime cstime (fields 14-17)


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the process's peak resident memory so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} in {timeout_s:.0f} s (log: {log})")


@dataclass
class EdgeDaemon:
    """A running `msao edge` with its HTTP port, process and cgroup."""

    process: subprocess.Popen
    http_port: int
    log_path: Path
    throttle: CpuThrottle | None

    def get(self, path: str) -> dict:
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=30)
        try:
            c.request("GET", path)
            return json.loads(c.getresponse().read())
        finally:
            c.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.throttle is not None:
            self.throttle.__exit__()


class Stack:
    """Broker + cloud workers + shaping proxy for one run; edge daemons come and go per cell.

    Args:
        work: folder for configs and logs.
        cloud_bundle / edge_bundle / calibration: what the processes serve.
        workers: cloud worker processes.
        edge_share: cores the edge daemon may use (cgroup quota); None = unthrottled.
    """

    def __init__(
        self, work: Path, edge_bundle: Path, cloud_bundle: Path, calibration: Path | None, workers: int = 1, edge_share: float | None = 0.25
    ):
        self.work = work
        self.edge_bundle, self.cloud_bundle, self.calibration = edge_bundle, cloud_bundle, calibration
        self.workers_wanted = workers
        self.edge_share = edge_share
        self.procs: list[subprocess.Popen] = []
        self.worker_procs: list[subprocess.Popen] = []
        self.proxy: ShapingProxy | None = None
        self.broker_port = 0

    def __enter__(self) -> Stack:
        self.work.mkdir(parents=True, exist_ok=True)
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(mosquitto):
            raise RuntimeError("mosquitto is not installed: `make broker` installs it")
        self.broker_port = free_port()
        conf = self.work / "mosquitto.conf"
        conf.write_text(
            f"listener {self.broker_port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n"
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        log = self.work / "mosquitto.log"
        broker = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        self.procs.append(broker)
        _wait_port(self.broker_port, broker, "mosquitto", log, 10)
        for i in range(self.workers_wanted):
            wlog = self.work / f"cloud-{i}.log"
            cmd = [sys.executable, "-m", "msao", "-v", "cloud", "--bundle", str(self.cloud_bundle), "--broker", self.broker_url,
                   "--worker-id", f"bench-cloud-{i}", "--threads", "1"]  # fmt: skip
            w = subprocess.Popen(cmd, stdout=open(wlog, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
            self.procs.append(w)
            self.worker_procs.append(w)
        self.proxy = ShapingProxy("127.0.0.1", self.broker_port).start()
        return self

    @property
    def broker_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.broker_port}"

    def shape(self, shape: LinkShape) -> None:
        assert self.proxy is not None
        self.proxy.set_shape(shape)

    def start_edge(self, name: str, policy: str, extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> EdgeDaemon:
        """A fresh, throttled `msao edge` whose MQTT goes through the proxy; ready and collaborative when returned."""
        assert self.proxy is not None
        port = free_port()
        log = self.work / f"edge-{name}.log"
        args = [
            sys.executable, "-m", "msao", "-v", "edge", "--broker", f"mqtt://127.0.0.1:{self.proxy.port}",
            "--edge-id", f"bench-{uuid.uuid4().hex[:6]}", "--http", f"127.0.0.1:{port}", "--no-mqtt-intake",
            "--bundle", str(self.edge_bundle), "--large-bundle", str(self.cloud_bundle),
            "--calibration", str(self.calibration) if self.calibration else "", "--policy", policy, *extra,
        ]  # fmt: skip
        environment = {**os.environ, "MSAO_RUNTIME_PROBE_INTERVAL_S": "2", **(env or {})}
        proc = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=environment)
        throttle = None
        if self.edge_share is not None:
            throttle = CpuThrottle(self.edge_share).__enter__()
            throttle.add(proc.pid)
        daemon = EdgeDaemon(proc, port, log, throttle)
        try:
            _wait_port(port, proc, "msao edge", log, 180)
            end = time.monotonic() + 60
            while daemon.get("/readyz").get("mode") != "collaborative":
                if time.monotonic() > end:
                    raise RuntimeError(f"msao edge never saw a cloud worker (log: {log})")
                time.sleep(0.2)
        except Exception:
            daemon.stop()
            raise
        return daemon

    def cloud_cpu_seconds(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.worker_procs if p.poll() is None)

    def __exit__(self, *exc: object) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
