"""`make demo`: a broker, a cloud worker and the edge daemon on this machine, asked real easy-VQA questions.

Starts Mosquitto on a free port, `msao cloud` (the large built-in model) and `msao edge`
(both built-ins, the calibration, MQTT and HTTP intake; by default in the paper's regime, the
edge holding only the small model; time-dilated to a device 10x slower than
this machine, since on one machine the "edge" would otherwise be as fast as the "cloud"), sends a handful of easy-VQA test
questions over MQTT and over the OpenAI-compatible HTTP API, prints each answer with the plan
the scheduler took and why, then stops everything. Needs `make export` first (the Makefile
runs it).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=6, help="questions asked over MQTT (default 6); two more go over HTTP")
    p.add_argument(
        "--edge-slowdown", type=float, default=10.0, metavar="K",
        help="the edge daemon emulates a device K times slower than this machine, as a Jetson is beside a cloud GPU "
             "(default 10; 1 = this machine's own speed)",
    )  # fmt: skip
    p.add_argument(
        "--large-on-edge", choices=("true", "false"), default="false",
        help="false (default): the paper's regime, the edge holds only the small model and the large one runs in the cloud; "
             "true: the large model is on the edge too (local-large and split plans)",
    )  # fmt: skip
    args = p.parse_args()
    if not (ROOT / "bundles" / "msao-tiny-cloud" / "manifest.json").exists():
        sys.exit("no bundles: run `make export` first")
    from msao.cloud_bridge.mqtt_options import ClientOptions
    from msao.datasets.easyvqa import load_easy_vqa
    from msao.edge_runtime.edge_client import EdgeClient
    from testbed import CloudWorker, EdgeDaemon, TestbedError, free_port, start_broker

    tmp = Path(tempfile.mkdtemp(prefix="msao-demo-"))
    http_port = free_port()
    started: list = []
    try:
        broker = start_broker(tmp / "broker")
        started.append(broker)
        print(f"==> Mosquitto on {broker.url}")
        print("==> msao cloud (worker: msao-tiny-cloud on ONNX Runtime)")
        cloud = CloudWorker("demo-cloud", ROOT / "bundles" / "msao-tiny-cloud", broker.url, tmp / "cloud.log", verbosity="-v", threads=None)
        started.append(cloud)
        regime = "only the edge model on the edge" if args.large_on_edge == "false" else "the large model on the edge too"
        print(f"==> msao edge (edge model msao-tiny-edge, large model msao-tiny-cloud, {regime}; HTTP on 127.0.0.1:{http_port};"
              f" {args.edge_slowdown:g}x slower than this machine, time-dilated)")  # fmt: skip
        edge = EdgeDaemon(
            ["--broker", broker.url, "--edge-id", "demo-edge", "--http", f"127.0.0.1:{http_port}", "--large-on-edge", args.large_on_edge],
            tmp / "edge.log", http_port,
            dilation=args.edge_slowdown if args.edge_slowdown != 1 else None,
        )  # fmt: skip
        started.append(edge)
        ready = edge.wait_ready(180, collaborative=True)
        print(f"    ready: mode {ready['mode']}, policy {ready['policy']}, edge x{ready['edge_scale']} its profile")

        test = load_easy_vqa("test")
        picks = list(range(0, 40 * args.questions, 40))[: args.questions]
        print(f"\n==> {len(picks)} easy-VQA test questions over MQTT (msao/v1/edge/demo-edge/request)")
        right = 0
        with EdgeClient(ClientOptions(broker.url, EdgeClient.new_client_id()), "demo-edge") as client:
            for i in picks:
                reply = client.ask(test.image_pngs[test.image_ids[i]], test.questions[i], deadline_ms=5000)
                r = reply.response
                right += r.answer == test.answers[i]
                print(f"  {test.questions[i]:<40} -> {r.answer:<9} (truth {test.answers[i]:<9}) by the {r.answered_by:<5} "
                      f"plan {r.plan:<36} {reply.round_trip_ms:6.1f} ms")  # fmt: skip
                print(f"      why: {r.reason}")
        print(f"\n==> 2 more over HTTP (POST http://127.0.0.1:{http_port}/v1/chat/completions, OpenAI format)")
        for i in (picks[-1] + 7, picks[-1] + 13):
            url = "data:image/png;base64," + base64.b64encode(test.image_pngs[test.image_ids[i]]).decode()
            body = {"model": "msao", "messages": [{"role": "user", "content": [
                {"type": "text", "text": test.questions[i]}, {"type": "image_url", "image_url": {"url": url}}]}]}  # fmt: skip
            c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
            c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            out = json.loads(c.getresponse().read())
            c.close()
            m = out["msao"]
            print(f"  {test.questions[i]:<40} -> {out['choices'][0]['message']['content']:<9} (truth {test.answers[i]:<9}) "
                  f"by the {m['answered_by']:<5} plan {m['plan']}")  # fmt: skip
        print(f"\n{right}/{len(picks)} MQTT answers right. Logs: {tmp}")
    except TestbedError as e:
        sys.exit(f"the demo could not run: {e}")
    finally:
        for part in reversed(started):
            part.stop()
        print("==> stopped the edge daemon, the cloud worker and the broker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
