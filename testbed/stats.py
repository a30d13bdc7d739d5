"""What a testbed process has used so far, read from /proc: CPU seconds, memory, open files, threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessResources", "cpu_seconds", "peak_rss_bytes", "process_resources"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its reaped children (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks  # utime stime cutime cstime (fields 14-17)


def _status(pid: int) -> dict[str, str]:
    """/proc/PID/status as field -> value ("VmRSS" -> "131072 kB")."""
    return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)


def _kib_as_bytes(value: str) -> int:
    return int(value.split()[0]) * 1024


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the process's peak resident memory so far (0 once it has exited, unreaped)."""
    hwm = _status(pid).get("VmHWM")
    return _kib_as_bytes(hwm) if hwm is not None else 0


@dataclass(frozen=True)
class ProcessResources:
    """What a soak samples of one process: a leak shows as one of these climbing while the load stays flat."""

    rss_bytes: int
    open_fds: int
    threads: int


def process_resources(pid: int) -> ProcessResources:
    """VmRSS, the entries of /proc/PID/fd and the thread count of process ``pid`` (OSError once it is gone or a zombie)."""
    status = _status(pid)
    if "VmRSS" not in status:  # exited, not yet reaped: no memory left to report
        raise ProcessLookupError(f"process {pid} has exited")
    return ProcessResources(
        rss_bytes=_kib_as_bytes(status["VmRSS"]), open_fds=len(os.listdir(f"/proc/{pid}/fd")), threads=int(status["Threads"])
    )
