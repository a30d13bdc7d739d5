"""Real CPU throttling of a process with a cgroup v1 CPU quota: an edge device slower than the cloud.

A Jetson is several times slower than a datacenter GPU; here the edge daemon runs in a cgroup
whose CFS quota allows ``share`` of one core (e.g. 0.2 = a fifth), while the cloud worker runs
free. This kernel has cgroup v1 (``/sys/fs/cgroup/cpu/<group>/cpu.cfs_quota_us``); the quota
cannot go below 1,000 µs, so the period is the shortest that gives the share (1 ms / 5 ms for
20 %), which keeps throttling stalls short (FIELD_NOTES: a 10 ms period stalls up to ~17 ms).

Throttling emulates throughput, not a slower chip's per-call latency shape: report latency
distributions, not only medians. Needs root; ``ThrottleUnavailable`` says why when it cannot work.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["CpuThrottle", "ThrottleUnavailable", "throttle_unavailable_reason"]

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
MIN_QUOTA_US = 1000


class ThrottleUnavailable(RuntimeError):
    pass


def throttle_unavailable_reason() -> str | None:
    """None when a cgroup v1 CPU quota can be set here, else why not (for skips and reports)."""
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {CGROUP_CPU} (cgroup v2 machines need cpu.max; not implemented)"
    if os.geteuid() != 0:
        return "creating a cgroup needs root"
    return None


class CpuThrottle:
    """A cgroup limiting its processes to ``share`` of one core. Use as a context manager.

    Args:
        share: fraction of one core, in (0, 1] (e.g. 0.25: a quarter).
        name: cgroup name suffix (a random one by default).
    """

    def __init__(self, share: float, name: str | None = None):
        if not 0 < share <= 8:
            raise ValueError(f"share must be in (0, 8] cores, got {share}")
        reason = throttle_unavailable_reason()
        if reason:
            raise ThrottleUnavailable(reason)
        self.path = CGROUP_CPU / f"msao-{name or uuid.uuid4().hex[:8]}"
        self._set_limits(share)
        self._created = False

    def _set_limits(self, share: float) -> None:
        self.share = share
        self.quota_us = MIN_QUOTA_US if share <= 1 else int(MIN_QUOTA_US * share)
        self.period_us = int(round(MIN_QUOTA_US / share)) if share <= 1 else MIN_QUOTA_US

    def __enter__(self) -> CpuThrottle:
        self.path.mkdir(exist_ok=True)
        self._created = True
        self._write_limits()
        return self

    def _write_limits(self) -> None:
        (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
        (self.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))

    def set_share(self, share: float) -> None:
        """Change the limit while the processes run (a device that slows down, e.g. under thermal throttling)."""
        if not 0 < share <= 8:
            raise ValueError(f"share must be in (0, 8] cores, got {share}")
        self._set_limits(share)
        if self._created:
            self._write_limits()

    def add(self, pid: int) -> None:
        """Move process ``pid`` (and the threads it starts from now on) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def throttled_us(self) -> int:
        """Total time the group's processes were held back by the quota (cpu.stat throttled_time, µs)."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "throttled_time":
                return int(value) // 1000
        return 0

    def usage_s(self) -> float:
        """CPU seconds used by the group's processes (cpuacct when mounted alongside, else 0)."""
        acct = Path("/sys/fs/cgroup/cpuacct") / self.path.name / "cpuacct.usage"
        return int(acct.read_text()) / 1e9 if acct.exists() else 0.0

    def __exit__(self, *exc: object) -> None:
        if not self._created:
            return
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    (CGROUP_CPU / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            self.path.rmdir()
        except OSError:
            pass
