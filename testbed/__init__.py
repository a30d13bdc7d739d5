"""The processes msao runs as, started the one way tests, the benchmark and the demo share.

A deployment is a Mosquitto broker, `msao cloud` workers, `msao edge` daemons and the network
between them; this package starts each of them (``Broker``, ``CloudWorker``, ``EdgeDaemon``),
shapes the edge's link (``ShapingProxy``), makes the edge a slower device (``CpuThrottle``, or
the daemon's own time dilation through ``EdgeDaemon``'s ``dilation``) and composes them into the
benchmark's ``Stack``. Nothing else launches these processes, so a readiness check or a shutdown
is fixed once for every caller.

It lives at the top of the repository, beside ``bench/`` and ``tests/``, not inside ``msao/``:
it writes cgroups, runs a system broker binary and assumes a source checkout, none of which an
installed edge or cloud may do, and the product never imports it.
"""

from testbed.broker import Broker, mosquitto_path, start_broker, start_broker_from_conf
from testbed.cloud import CloudWorker, open_link, start_workers, stop_all, wait_online
from testbed.edge import EdgeDaemon
from testbed.process import ManagedProcess, TestbedError, free_port, msao_command, poll_until, wait_port
from testbed.shaping import PROFILES, LinkShape, ShapingProxy
from testbed.stack import Stack
from testbed.stats import ProcessResources, cpu_seconds, peak_rss_bytes, process_resources
from testbed.throttle import CpuThrottle, ThrottleUnavailable, throttle_unavailable_reason

__all__ = [
    "Broker", "CloudWorker", "CpuThrottle", "EdgeDaemon", "LinkShape", "ManagedProcess", "PROFILES", "ProcessResources", "ShapingProxy",
    "Stack", "TestbedError", "ThrottleUnavailable", "cpu_seconds", "free_port", "mosquitto_path", "msao_command", "open_link",
    "peak_rss_bytes", "poll_until", "process_resources", "start_broker", "start_broker_from_conf", "start_workers", "stop_all", "throttle_unavailable_reason",
    "wait_online", "wait_port",
]  # fmt: skip
