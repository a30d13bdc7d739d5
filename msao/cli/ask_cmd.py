"""``msao ask``: one question about one image, answered by a running edge daemon or a local bundle.

With ``--broker`` the request goes over MQTT to ``msao edge`` (the answer carries the plan the
daemon took, its reason, MAS values, timings and bytes); with ``--bundle`` one local bundle
answers in this process (no daemon, no scheduler).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from msao.cli.common import add_broker_options, add_bundle_option, add_threads_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, metavar="PATH", help="JPEG or PNG file")
    p.add_argument("--question", required=True, help="the question, e.g. 'what color is the shape?'")
    p.add_argument("--json", action="store_true", help="print the whole answer (plan, confidence, timings, ...) as JSON")
    remote = p.add_argument_group("through a running edge daemon (msao edge)")
    remote.add_argument("--edge-id", default="edge-1", metavar="ID", help="the daemon's edge id (default edge-1)")
    remote.add_argument("--deadline-ms", type=float, default=5000.0, metavar="MS", help="the request's deadline (default 5000 ms)")
    remote.add_argument("--stream", metavar="ID", help="camera stream id: frames of one stream reuse unchanged image tokens")
    remote.add_argument("--policy", help="placement policy for this request (default: the daemon's)")
    add_broker_options(remote, broker_default=None, default_note="required for this mode")
    local = p.add_argument_group("with a local bundle in this process")
    add_bundle_option(local, required=False)
    local.add_argument("--exit-layer", type=int, help="answer from the early-exit head after this layer")
    local.add_argument("--max-new-tokens", type=int, default=16, help="generation bound (default 16)")
    add_threads_option(local)


def run(args: argparse.Namespace) -> int:
    from msao.errors import ConfigError, ImageError

    try:
        data = Path(args.image).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {args.image}: {exc.strerror}") from exc
    if (args.broker is None) == (args.bundle is None):
        raise ConfigError("give either --broker (ask a running `msao edge`) or --bundle (answer locally), not both or neither")
    if args.broker:
        return _remote(args, data)
    from msao.engines.bundle import load_bundle
    from msao.engines.generation import Generator
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions

    gen = Generator(load_bundle(args.bundle), OnnxRuntimeBackend(OrtOptions(threads=args.threads)))
    try:
        ans = gen.answer(data, args.question, exit_layer=args.exit_layer, max_new_tokens=args.max_new_tokens)
    finally:
        gen.close()
    print(json.dumps(asdict(ans)) if args.json else f"{ans.text}  (confidence {ans.confidence:.3f}, {ans.timings.total_ms:.1f} ms)")
    return 0


def _remote(args: argparse.Namespace, data: bytes) -> int:
    import os

    from msao.cloud_bridge.mqtt_options import ClientOptions, TlsOptions
    from msao.edge_runtime.edge_client import EdgeClient
    from msao.errors import RequestError

    tls = (
        TlsOptions(args.ca_file, args.cert_file, args.key_file, bool(args.tls_insecure))
        if (args.ca_file or args.cert_file or args.tls_insecure)
        else None
    )
    options = ClientOptions(
        broker=args.broker, client_id=EdgeClient.new_client_id(), keepalive_s=args.keepalive_s or 30, tls=tls,
        username=args.username, password=os.environ.get("MSAO_MQTT_PASSWORD"),
    )  # fmt: skip
    with EdgeClient(options, args.edge_id) as client:
        reply = client.ask(data, args.question, deadline_ms=args.deadline_ms, stream=args.stream, policy=args.policy)
    r = reply.response
    if args.json:
        print(json.dumps({**r.to_dict(), "round_trip_ms": round(reply.round_trip_ms, 3)}))
    elif r.status == "ok":
        print(
            f"{r.answer}  (confidence {r.confidence:.3f}, by the {r.answered_by} [{r.model}], plan {r.plan}, {reply.round_trip_ms:.1f} ms)"
        )
    if r.status != "ok":
        raise RequestError(f"the edge answered {r.status} ({r.error_code}): {r.error}", r.error_code or "internal")
    return 0
