"""One child process with a log file: start, wait for a condition, stop politely, kill; and free ports.

Every launcher in the testbed is a ``ManagedProcess``, so they share one shutdown (SIGTERM,
then SIGKILL after a grace period) and one way of saying why a process did not come up: the
tail of its own log.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["ManagedProcess", "ROOT", "TestbedError", "free_port", "msao_command", "poll_until", "wait_port"]

ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL_CHARS = 4000


class TestbedError(RuntimeError):
    """A testbed process did not start, exited early or never reached the state asked for; the message carries its log."""

    __test__ = False  # a name starting with "Test" that pytest must not collect


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.01) -> bool:
    """True as soon as ``condition()`` holds, False if ``timeout_s`` passes first: a wait on a state, not on a clock."""
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(poll_s)
    return True


def msao_command(args: Sequence[str]) -> list[str]:
    """``python -m msao ARGS`` with this interpreter, so a child runs the checkout's msao from its venv."""
    return [sys.executable, "-m", "msao", *args]


class ManagedProcess:
    """``command`` running with its stdout and stderr in ``log_path`` (or stdout in ``stdout_path`` when given).

    Args:
        command: the argv.
        log_path: where stderr (and stdout, unless ``stdout_path``) goes; appended to, so a
            restarted process keeps its predecessor's lines.
        env: the child's environment (None: this process's).
        name: how errors name it ("mosquitto", "msao edge").
        stdout_path: a separate file for stdout (a command whose stdout is its result).
    """

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        stdout_path: Path | None = None,
    ):
        self.command = list(command)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.name = name or Path(self.command[0]).name
        self.stdout_path = stdout_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            out = open(stdout_path, "wb") if stdout_path is not None else log
            try:
                self.process = subprocess.Popen(self.command, stdout=out, stderr=log, cwd=ROOT, env=self.env)
            finally:
                if out is not log:
                    out.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def failure(self, what: str) -> TestbedError:
        """An error saying ``what`` went wrong, with the exit status (if it exited) and the tail of the log."""
        code = self.process.poll()
        status = f"exited with {code}" if code is not None else "still running"
        return TestbedError(f"{self.name} {what} ({status}); log {self.log_path}:\n{self.log()[-LOG_TAIL_CHARS:]}")

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
        """Poll ``condition`` until it holds; raise with the log if the process exits first or time runs out."""
        end = time.monotonic() + timeout_s
        while True:
            if condition():
                return
            if not self.alive():
                raise self.failure(f"exited while waiting until {what}")
            if time.monotonic() > end:
                raise self.failure(f"did not reach '{what}' in {timeout_s:.0f} s")
            time.sleep(poll_s)

    def wait_for_log(self, text: str, timeout_s: float) -> bool:
        """True once ``text`` is in the log; False if the process exits or time runs out first."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if text in self.log():
                return True
            if not self.alive():
                return text in self.log()
            time.sleep(0.005)
        return False

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout_s``; the exit status."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)

    def send_signal(self, sig: int) -> None:
        """SIGHUP (reload), SIGSTOP / SIGCONT (a stuck process), ...: what a fault or an operator sends."""
        self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or announced."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


def wait_port(port: int, process: ManagedProcess, timeout_s: float) -> None:
    """Until something accepts TCP connections on loopback ``port``; raise with ``process``'s log if it exits first."""

    def accepting() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    process.wait_until(accepting, timeout_s, f"port {port} accepts connections")
