"""``msao cloud``: serve bundles to edges over MQTT 5 (a cloud worker; ONNX Runtime in-process).

Run as many as the load needs, on one or many hosts: they share jobs through the broker's
shared subscription (give each worker on a host its own ``--metrics`` port). Stop with Ctrl-C
or SIGTERM: running jobs finish, status goes offline.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from msao.cli.common import add_broker_options

DEFAULT_BUNDLE = "bundles/msao-tiny-cloud"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bundle", action="append", metavar="DIR",
        help=f"bundle folder to serve (repeat for several models; jobs are routed by model hash). Default: {DEFAULT_BUNDLE} (`make export`)",
    )  # fmt: skip
    p.add_argument(
        "--worker-id", metavar="ID",
        help="this worker's id in topics and status (A-Z a-z 0-9 _ -); must be unique: a second worker with the same id "
        "takes over the first one's connection. Default: cloud-<host>-<pid>",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="jobs run at once, each on its own thread (default 1). More helps only with free cores or GPU headroom; "
        "keep workers x threads <= cores",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=1, metavar="N",
        help="ONNX Runtime intra-op threads per job (default 1; 0 = ONNX Runtime decides). More cuts one job's latency "
        "but oversubscribes cores when --workers > 1",
    )  # fmt: skip
    p.add_argument(
        "--queue-size", type=int, default=8, metavar="N",
        help="jobs that may wait beyond the running ones (default 8). A job arriving at a full queue gets an immediate "
        "'busy' result so its edge falls back instead of waiting; larger = more waiting, fewer fallbacks",
    )  # fmt: skip
    p.add_argument(
        "--max-sessions", type=int, default=64, metavar="N",
        help="KV caches kept for split decode steps (default 64); more = more memory. The least recently used is "
        "evicted and its next decode step fails with session_unknown (the edge re-runs prefill or falls back)",
    )  # fmt: skip
    p.add_argument(
        "--max-session-mb", type=float, default=1024.0, metavar="MB",
        help="memory the speculation sessions may hold together, each counted at its KV cache's full budget (default 1024); "
        "the least recently used is evicted to make room, and a session larger than all of it is refused with too_large",
    )  # fmt: skip
    p.add_argument(
        "--session-idle-s", type=float, default=60.0, metavar="S",
        help="drop a KV session unused this long (default 60 s); shorter frees memory sooner but breaks slow conversations",
    )  # fmt: skip
    p.add_argument(
        "--max-payload-mb", type=float, default=64.0, metavar="MB",
        help="largest job accepted, after decompression (default 64 MB); more = more memory per job. A bigger job is "
        "refused (a too_large result, or unanswered when even its wire size is over) and its edge falls back",
    )  # fmt: skip
    p.add_argument(
        "--providers", metavar="LIST",
        help="ONNX Runtime execution providers in priority order, comma-separated (e.g. CUDAExecutionProvider,"
        "CPUExecutionProvider; needs msao[cloud-gpu] for CUDA). Default: the best available. The log says which each segment uses",
    )  # fmt: skip
    p.add_argument(
        "--metrics", metavar="HOST:PORT",
        help="serve Prometheus metrics (jobs, busy refusals, queue, compute time) at http://HOST:PORT/metrics (default off; "
        "unauthenticated: keep it on loopback, e.g. 127.0.0.1:9465, one port per worker on a host; port 0 = any free port, logged)",
    )  # fmt: skip
    add_broker_options(p, broker_default=os.environ.get("MSAO_BROKER_URL", "mqtt://127.0.0.1:1883"))


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from msao.cloud_bridge.codec import CodecLimits
    from msao.cloud_bridge.model_server import ModelServer
    from msao.cloud_bridge.mqtt_options import ClientOptions, TlsOptions
    from msao.cloud_bridge.sessions import SessionTable
    from msao.cloud_bridge.worker import CloudWorker, WorkerOptions
    from msao.engines.bundle import load_bundle
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    from msao.errors import ConfigError
    from msao.prometheus import MetricsListener, parse_listen_address

    for name in ("workers", "queue_size", "max_sessions"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_payload_mb <= 0 or args.session_idle_s <= 0 or args.max_session_mb <= 0 or args.threads < 0:
        raise ConfigError("--max-payload-mb, --session-idle-s and --max-session-mb must be > 0, --threads >= 0")
    worker_id = (
        args.worker_id or "cloud-" + "".join(c if c.isalnum() or c in "_-" else "-" for c in socket.gethostname())[:40] + f"-{os.getpid()}"
    )
    max_bytes = int(args.max_payload_mb * 1024 * 1024)
    tls = (
        TlsOptions(args.ca_file, args.cert_file, args.key_file, bool(args.tls_insecure))
        if (args.ca_file or args.cert_file or args.tls_insecure)
        else None
    )
    client = ClientOptions(
        broker=args.broker, client_id=f"msao-{worker_id}", session_expiry_s=0, keepalive_s=args.keepalive_s or 30, tls=tls,
        username=args.username, password=os.environ.get("MSAO_MQTT_PASSWORD"), max_message_bytes=max_bytes,
    )  # fmt: skip
    options = WorkerOptions(
        worker_id=worker_id, client=client, threads=args.workers, queue_size=args.queue_size, limits=CodecLimits(max_payload_bytes=max_bytes),
        max_sessions=args.max_sessions, session_idle_s=args.session_idle_s,
    )  # fmt: skip
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip()) if args.providers else None
    # bound before the bundles load, so a port in use fails at once; 503 until the worker exists
    listener = MetricsListener(*parse_listen_address(args.metrics, "--metrics"), "--metrics").start() if args.metrics else None
    try:
        backend = OnnxRuntimeBackend(OrtOptions(threads=args.threads, providers=providers))
        sessions: SessionTable = SessionTable(args.max_sessions, args.session_idle_s, max_bytes=int(args.max_session_mb * (1 << 20)))
        servers = [ModelServer(load_bundle(Path(d)), backend, sessions) for d in (args.bundle or [DEFAULT_BUNDLE])]
        worker = CloudWorker(servers, options)
        if listener is not None:
            listener.serve(worker.metrics.registry)
        stop = threading.Event()

        def _stop(signum, frame) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        worker.start()
        while not stop.wait(1.0):
            pass
        worker.stop()
    finally:
        if listener is not None:
            listener.stop()
    return 0
