"""`msao edge` as a real process for tests: start it, read its log, query its HTTP endpoints, stop or kill it."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.throttle import CpuThrottle

__all__ = ["Daemon"]

ROOT = Path(__file__).resolve().parents[1]


class Daemon:
    """One `msao -v edge ARGS` process logging to ``log_path``; optionally inside a CPU throttle."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str], http_port: int, throttle: CpuThrottle | None = None):
        self.args = args
        self.log_path = log_path
        self.env = env
        self.http_port = http_port
        self.throttle = throttle
        self.process = subprocess.Popen(
            [sys.executable, "-m", "msao", "-v", "edge", *args], stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
        if throttle is not None:
            throttle.add(self.process.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, dict]:
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            return r.status, json.loads(body) if path != "/metrics" else {"text": body.decode()}
        finally:
            c.close()

    def wait_ready(self, timeout_s: float = 120.0, collaborative: bool = False) -> dict:
        """Until /readyz is 200 (and, with ``collaborative``, the daemon sees a worker)."""
        end = time.monotonic() + timeout_s
        body: dict = {}
        while time.monotonic() < end:
            if self.process.poll() is not None:
                pytest.fail(f"msao edge exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                status, body = self.get("/readyz")
                if status == 200 and (not collaborative or body["mode"] == "collaborative"):
                    return body
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(f"msao edge not ready after {timeout_s} s (last /readyz: {body}):\n{self.log()[-4000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(5)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def restarted(self, log_path: Path) -> Daemon:
        """The same daemon (same edge id, so the same MQTT sessions) started again, logging to ``log_path``."""
        return Daemon(self.args, log_path, self.env, self.http_port, self.throttle)
