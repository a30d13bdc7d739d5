"""`msao edge` as a process: start it as a slower device if asked, wait until it is ready, query its HTTP endpoints.

Two ways to make it a slower device, for two questions:

- ``throttle``: a cgroup CPU quota (``CpuThrottle``). Real throughput limits on every line of
  the daemon, but the verdict moves with the machine's load, and it needs root and cgroup v1.
- ``dilation``: the daemon holds each piece of edge compute ``k`` times as long as it took
  (``MSAO_RUNTIME_EDGE_DILATION``). Load on the machine changes the measured time, not the
  ratio to the cloud, so a test that asks "does a slow edge offload?" gets the same answer on a
  busy CI machine; it works everywhere, without root.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from testbed.process import ManagedProcess, msao_command
from testbed.throttle import CpuThrottle

__all__ = ["EdgeDaemon"]

DILATION_ENV = "MSAO_RUNTIME_EDGE_DILATION"
DILATION_PROFILE_ENV = "MSAO_RUNTIME_EDGE_DILATION_PROFILE"


class EdgeDaemon(ManagedProcess):
    """One `msao -v edge ARGS` process logging to ``log_path``, its HTTP API on loopback ``http_port``.

    Args:
        args: the arguments after ``edge`` (it must serve HTTP on ``http_port``).
        env: the daemon's environment (None: this process's).
        throttle: a started ``CpuThrottle`` the process joins (the caller owns its lifetime).
        dilation: emulate an edge this many times slower (None: its own speed).
        dilation_profile: instead, a device profile file with one factor per kind of edge work ("": none).
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        http_port: int,
        env: Mapping[str, str] | None = None,
        throttle: CpuThrottle | None = None,
        dilation: float | None = None,
        verbosity: str = "-v",
        dilation_profile: str = "",
    ):
        self.args = list(args)
        self.http_port = http_port
        self.throttle = throttle
        self.dilation = dilation
        self.dilation_profile = str(Path(dilation_profile).resolve()) if dilation_profile else ""
        self.verbosity = verbosity
        environment = dict(env if env is not None else os.environ)
        if dilation is not None:
            environment[DILATION_ENV] = str(dilation)
        if self.dilation_profile:
            environment[DILATION_PROFILE_ENV] = self.dilation_profile
        super().__init__(msao_command([verbosity, "edge", *self.args]), log_path, env=environment, name="msao edge")
        if throttle is not None:
            throttle.add(self.pid)

    def get(self, path: str, timeout_s: float = 10.0) -> tuple[int, dict]:
        """(HTTP status, JSON body) of GET ``path`` on the daemon's HTTP intake."""
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout_s)
        try:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            return r.status, json.loads(body)
        finally:
            c.close()

    def wait_ready(self, timeout_s: float = 120.0, collaborative: bool = False) -> dict:
        """/readyz's body once it answers 200 (and, with ``collaborative``, the daemon sees a cloud worker)."""
        last: dict = {}

        def ready() -> bool:
            nonlocal last
            try:
                status, last = self.get("/readyz")
            except OSError:
                return False
            return status == 200 and (not collaborative or last.get("mode") == "collaborative")

        self.wait_until(ready, timeout_s, "collaborative" if collaborative else "ready", poll_s=0.1)
        return last

    def restarted(self, log_path: Path) -> EdgeDaemon:
        """The same daemon (same edge id, so the same MQTT sessions; same device emulation) started again."""
        return EdgeDaemon(
            self.args, log_path, self.http_port, self.env, self.throttle, self.dilation, self.verbosity, self.dilation_profile
        )
