"""Mosquitto on a free loopback port, from a config file of its own.

Brokers run as plain processes with ``set_tcp_nodelay true`` and no persistence (sessions live
as long as the process); ``max_packet_bytes`` sets ``max_packet_size`` to force chunking.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from testbed.process import ManagedProcess, TestbedError, free_port, wait_port

__all__ = ["Broker", "mosquitto_path", "start_broker", "start_broker_from_conf"]

START_TIMEOUT_S = 10.0


def mosquitto_path() -> str:
    """The mosquitto binary, or an error saying how to install it."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(exe):
        raise TestbedError("mosquitto is not installed: run `make broker` (Debian package mosquitto)")
    return exe


@dataclass
class Broker:
    """A running broker: ``url`` is what clients connect to, ``port`` the listener the testbed waited on."""

    url: str
    port: int
    max_packet_bytes: int | None
    conf: Path
    log_path: Path
    process: ManagedProcess

    def log(self) -> str:
        return self.process.log()

    def stop(self) -> None:
        self.process.stop(5)

    def restart(self) -> None:
        """A fresh broker on the same port (no state survives: persistence is off)."""
        self.stop()
        self.process = _launch(self.conf, self.log_path, self.port)


def _launch(conf: Path, log_path: Path, port: int) -> ManagedProcess:
    process = ManagedProcess([mosquitto_path(), "-c", str(conf)], log_path, name="mosquitto")
    try:
        wait_port(port, process, START_TIMEOUT_S)
    except TestbedError:
        process.kill()
        raise
    return process


def start_broker(root: Path, max_packet_bytes: int | None = None) -> Broker:
    """An anonymous plain-MQTT broker with its config and log in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true", "persistence false"]
    if max_packet_bytes:
        lines.append(f"max_packet_size {max_packet_bytes}")
    if os.geteuid() == 0:
        lines.append("user root")  # otherwise mosquitto drops to a 'mosquitto' user that may lack our tmp dir
    conf = root / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return start_broker_from_conf(conf, port, f"mqtt://127.0.0.1:{port}", max_packet_bytes)


def start_broker_from_conf(conf: Path, port: int, url: str, max_packet_bytes: int | None = None) -> Broker:
    """A broker from a config someone else wrote (TLS listeners, ACLs); ready once ``port`` accepts connections."""
    log_path = conf.with_suffix(".log")
    return Broker(url, port, max_packet_bytes, conf, log_path, _launch(conf, log_path, port))
