"""Real MQTT parts for tests: Mosquitto on a free loopback port, `msao cloud` worker processes, edge links.

Brokers run as plain processes with their own config file (``set_tcp_nodelay true``, no
persistence: sessions live as long as the process); ``max_packet_bytes`` sets
``max_packet_size`` to force chunking. Test packages wrap these in their own fixtures.
"""

from __future__ import annotations

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

import pytest

from msao.cloud_bridge.link import CloudLink, LinkOptions
from msao.cloud_bridge.mqtt_options import ClientOptions

__all__ = ["Broker", "free_port", "open_link", "start_broker", "start_workers", "stop_all", "wait_online", "WorkerProcess"]

ROOT = Path(__file__).resolve().parents[1]
SMALL_MAX_PACKET = 16384  # small_broker's max_packet_size: big payloads must be chunked


@dataclass
class Broker:
    url: str
    port: int
    max_packet_bytes: int | None
    conf: Path
    log_path: Path
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def restart(self) -> None:
        """Start a fresh broker on the same port (no state survives: persistence is off)."""
        self.stop()
        self.process = _launch(self.conf, self.log_path, self.port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(conf: Path, log_path: Path, port: int) -> subprocess.Popen:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(exe):
        pytest.fail("mosquitto is not installed: run `make broker` (Debian package mosquitto)")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"mosquitto did not start on port {port}:\n{log_path.read_text()[-2000:]}")


def start_broker(root: Path, max_packet_bytes: int | None = None) -> Broker:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true", "persistence false"]
    if max_packet_bytes:
        lines.append(f"max_packet_size {max_packet_bytes}")
    if os.geteuid() == 0:
        lines.append("user root")  # otherwise mosquitto drops to a 'mosquitto' user that may lack our tmp dir
    conf = root / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    log_path = root / "mosquitto.log"
    return Broker(f"mqtt://127.0.0.1:{port}", port, max_packet_bytes, conf, log_path, _launch(conf, log_path, port))


free_port = free_port  # the name older tests import


class WorkerProcess:
    """One `msao cloud` process, logging at debug level to a file the test can read."""

    def __init__(self, worker_id: str, process: subprocess.Popen, log_path: Path):
        self.worker_id = worker_id
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if text in self.log():
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.005)
        return False

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(5)


def start_workers(broker: Broker, bundle_dir: Path, log_dir: Path, count: int = 1, extra: tuple[str, ...] = ()) -> list[WorkerProcess]:
    """Launch ``count`` workers at once (they start in parallel) and return without waiting."""
    out = []
    for _ in range(count):
        wid = "w-" + uuid.uuid4().hex[:8]
        log_path = log_dir / f"{wid}.log"
        cmd = [
            sys.executable,
            "-m",
            "msao",
            "-vv",
            "cloud",
            "--bundle",
            str(bundle_dir),
            "--broker",
            broker.url,
            "--worker-id",
            wid,
            "--threads",
            "1",
            *extra,
        ]
        proc = subprocess.Popen(cmd, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
        out.append(WorkerProcess(wid, proc, log_path))
    return out


def wait_online(link: CloudLink, workers: list[WorkerProcess], timeout_s: float = 60.0) -> None:
    ids = {w.worker_id for w in workers}
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        online = {w.worker_id for w in link.workers()}
        if ids <= online:
            return
        for w in workers:
            if w.process.poll() is not None:
                pytest.fail(f"worker {w.worker_id} exited with {w.process.returncode}:\n{w.log()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"workers {sorted(ids - {w.worker_id for w in link.workers()})} not online after {timeout_s} s")


def open_link(broker: Broker, **options) -> CloudLink:
    edge_id = "edge-" + uuid.uuid4().hex[:8]
    client = ClientOptions(broker.url, f"msao-{edge_id}", session_expiry_s=30)
    link = CloudLink(LinkOptions(edge_id, client, **options)).start()
    assert link.client.wait_connected(10), f"edge link could not connect to {broker.url}"
    return link


def stop_all(workers: list[WorkerProcess]) -> None:
    for w in workers:
        w.stop()
