"""``msao edge``: the edge daemon (MQTT and HTTP intake, MAS, adaptive scheduler, cloud offload).

Configuration merges, in order: defaults, ``--config FILE`` (TOML), ``MSAO_*`` environment
variables, then these flags; ``--print-config`` shows the result and exits. With no
configuration at all, ``msao edge --broker mqtt://HOST:PORT`` serves the built-in bundles from
``bundles/`` (``make export`` writes them). Stop with Ctrl-C or SIGTERM: intakes close first,
queued requests are served (``runtime.drain_s``), the status goes offline.
"""

from __future__ import annotations

import argparse

from msao.cli.common import add_broker_options
from msao.edge_runtime.plans import POLICIES

# flag dest -> config key (flags left unset do not override the file or the environment)
FLAG_KEYS = {
    "edge_id": "edge.edge_id",
    "bundle": "edge.bundle",
    "large_bundle": "edge.large_bundle",
    "large_on_edge": "edge.large_on_edge",
    "calibration": "edge.calibration",
    "http": "edge.http",
    "cors_origins": "edge.cors_origins",
    "metrics": "edge.metrics",
    "mqtt_intake": "edge.mqtt_intake",
    "threads": "edge.threads",
    "image_cache_mb": "edge.image_cache_mb",
    "broker": "broker.url",
    "username": "broker.username",
    "ca_file": "broker.ca_file",
    "cert_file": "broker.cert_file",
    "key_file": "broker.key_file",
    "tls_insecure": "broker.tls_insecure",
    "keepalive_s": "broker.keepalive_s",
    "workers": "runtime.workers",
    "queue_size": "runtime.queue_size",
    "mas_always": "runtime.mas_always",
    "policy": "runtime.scheduler.policy",
    "accuracy_slack": "runtime.scheduler.accuracy_slack",
    "split_layer": "runtime.scheduler.split_layer",
    "prune_ratio": "runtime.scheduler.prune_ratio",
    "decode_ahead": "runtime.scheduler.decode_ahead",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration (sections edge, broker, runtime, runtime.scheduler, ...)")
    p.add_argument("--print-config", action="store_true", help="print the merged configuration as TOML and exit")
    p.add_argument("--edge-id", metavar="ID", help="this edge's id in MQTT topics (A-Z a-z 0-9 _ -; default edge-1)")
    p.add_argument("--bundle", metavar="DIR", help="the edge model's bundle (default bundles/msao-tiny-edge)")
    p.add_argument(
        "--large-bundle", metavar="DIR",
        help="the large (cloud) model's bundle, also held here for split and local plans and to name the cloud model "
        "(default bundles/msao-tiny-cloud; '' = edge-only)",
    )  # fmt: skip
    p.add_argument(
        "--large-on-edge", choices=("true", "false"),
        help="also run the large model on this edge (local-large and split plans; default true). false: the paper's regime, "
        "the edge holds only the small model and the large one runs in the cloud only",
    )  # fmt: skip
    p.add_argument(
        "--calibration", metavar="PATH",
        help="accuracy tables from `msao calibrate` (default bundles/calibration.json; without them drafts are never committed)",
    )  # fmt: skip
    p.add_argument(
        "--http", metavar="HOST:PORT",
        help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models), /healthz and /readyz here",
    )  # fmt: skip
    p.add_argument(
        "--api-key", metavar="KEY",
        help="require Authorization: Bearer KEY on the HTTP API's /v1/ routes (default $MSAO_API_KEY; unset = no authentication: "
        "keep --http on loopback then). The environment variable keeps the key out of process listings",
    )  # fmt: skip
    p.add_argument(
        "--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN",
        help="let browser pages from ORIGIN (https://host:port, or *) call the HTTP API; repeat for more",
    )  # fmt: skip
    p.add_argument(
        "--metrics", metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, on their own listener (default off; unauthenticated: "
        "keep it on loopback, e.g. 127.0.0.1:9464; port 0 = any free port, logged)",
    )  # fmt: skip
    p.add_argument(
        "--image-cache-mb", type=float, metavar="MIB",
        help="image tokens kept for images asked about again, per model (default 64; 0 = off): a follow-up question "
        "about the same image skips the vision encoder",
    )  # fmt: skip
    p.add_argument(
        "--no-mqtt-intake", dest="mqtt_intake", action="store_const", const=False,
        help="do not take requests from MQTT (the broker is still used for the cloud)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime threads per request (default 1; keep workers x threads <= cores)")
    p.add_argument(
        "--workers", type=int, metavar="N", help="requests served at once (default 2); more overlaps local work with cloud waits"
    )
    p.add_argument(
        "--queue-size", type=int, metavar="N",
        help="accepted requests that may wait (default 16); one more gets 'busy' at once instead of a long wait",
    )  # fmt: skip
    p.add_argument(
        "--policy", choices=POLICIES,
        help="placement policy (default msao: adaptive); the others are fixed baselines for comparison",
    )  # fmt: skip
    p.add_argument(
        "--accuracy-slack", type=float, metavar="A",
        help="msao: accept plans whose calibrated accuracy is at most A below the best (default 0.01); larger = faster, less accurate",
    )  # fmt: skip
    p.add_argument("--split-layer", type=int, metavar="K", help="static_split: run decoder layers [0, K) here (default 1)")
    p.add_argument("--prune-ratio", type=float, metavar="R", help="prune_only: share of image tokens kept (default 0.25)")
    p.add_argument(
        "--decode-ahead", type=int, metavar="N",
        help="speculative plans: tokens the cloud decodes after each verdict (default -1: as many as it decodes within a round "
        "trip; 0: verdicts only, each block a round trip)",
    )  # fmt: skip
    p.add_argument(
        "--mas-always", action="store_const", const=True,
        help="run MAS on every request to report its values, even when all tokens are kept (costs its time each request)",
    )  # fmt: skip
    add_broker_options(
        p, broker_default=None, default_note="default: the config file, $MSAO_BROKER_URL, or none: edge-only, no MQTT intake"
    )


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from msao.edge_runtime.config import config_to_toml, load_edge_config

    config = load_edge_config(args.config, flags={key: getattr(args, dest) for dest, key in FLAG_KEYS.items()})
    if args.print_config:
        print(config_to_toml(config))
        return 0
    from msao.edge_runtime.app import EdgeApp

    stop = threading.Event()

    def _stop(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    EdgeApp(config, api_key=args.api_key).run_forever(stop)
    return 0
