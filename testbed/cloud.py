"""`msao cloud` worker processes, and an in-process edge link to watch them come online."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from msao.cloud_bridge.link import CloudLink, LinkOptions
from msao.cloud_bridge.mqtt_options import ClientOptions
from testbed.process import ManagedProcess, TestbedError, msao_command

__all__ = ["CloudWorker", "open_link", "start_workers", "stop_all", "wait_online"]


class CloudWorker(ManagedProcess):
    """One `msao cloud` process logging (at debug level by default) to a file the caller can read.

    ``threads`` is its ONNX Runtime thread count (None: the worker's default); one keeps
    several workers on a two-core machine from fighting over cores.
    """

    def __init__(
        self,
        worker_id: str,
        bundle_dir: Path,
        broker_url: str,
        log_path: Path,
        extra: Sequence[str] = (),
        verbosity: str = "-vv",
        env: Mapping[str, str] | None = None,
        threads: int | None = 1,
    ):
        self.worker_id = worker_id
        args = [verbosity, "cloud", "--bundle", str(bundle_dir), "--broker", broker_url, "--worker-id", worker_id]
        args += [*(["--threads", str(threads)] if threads is not None else []), *extra]
        super().__init__(msao_command(args), log_path, env=env, name=f"msao cloud {worker_id}")

    def stop(self, timeout_s: float = 15.0) -> int:
        return super().stop(timeout_s)


def start_workers(
    broker_url: str, bundle_dir: Path, log_dir: Path, count: int = 1, extra: Sequence[str] = (), prefix: str = "w-", verbosity: str = "-vv"
) -> list[CloudWorker]:
    """``count`` workers started at once (they load in parallel); returns without waiting for them."""
    workers = []
    for _ in range(count):
        worker_id = prefix + uuid.uuid4().hex[:8]
        workers.append(CloudWorker(worker_id, bundle_dir, broker_url, log_dir / f"{worker_id}.log", extra, verbosity))
    return workers


def wait_online(link: CloudLink, workers: Sequence[CloudWorker], timeout_s: float = 60.0) -> None:
    """Until ``link`` has seen every worker's online status; raise with a dead worker's log or the missing ids."""
    ids = {w.worker_id for w in workers}
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if ids <= {w.worker_id for w in link.workers()}:
            return
        for w in workers:
            if not w.alive():
                raise w.failure("exited before coming online")
        time.sleep(0.05)
    raise TestbedError(f"workers {sorted(ids - {w.worker_id for w in link.workers()})} not online after {timeout_s} s")


def open_link(broker_url: str, **options) -> CloudLink:
    """A started edge-side ``CloudLink`` with a fresh edge id, connected (or an error naming the broker)."""
    edge_id = "edge-" + uuid.uuid4().hex[:8]
    link = CloudLink(LinkOptions(edge_id, ClientOptions(broker_url, f"msao-{edge_id}", session_expiry_s=30), **options)).start()
    if not link.client.wait_connected(10):
        link.close()
        raise TestbedError(f"edge link could not connect to {broker_url}")
    return link


def stop_all(workers: Sequence[CloudWorker]) -> None:
    for w in workers:
        w.stop()
