"""`make demo`: a broker, a cloud worker and the edge daemon on this machine, asked real easy-VQA questions.

Starts Mosquitto on a free port, `msao cloud` (the large built-in model) and `msao edge`
(both built-ins, the calibration, MQTT and HTTP intake), sends a handful of easy-VQA test
questions over MQTT and over the OpenAI-compatible HTTP API, prints each answer with the plan
the scheduler took and why, then stops everything. Needs `make export` first (the Makefile
runs it).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout_s: float = 30) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"{what} exited ({proc.returncode}); its log:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not open port {port} in {timeout_s:.0f} s; log: {log}")


def _get(port: int, path: str) -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=6, help="questions asked over MQTT (default 6); two more go over HTTP")
    args = p.parse_args()
    if not (ROOT / "bundles" / "msao-tiny-cloud" / "manifest.json").exists():
        sys.exit("no bundles: run `make export` first")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(mosquitto):
        sys.exit("mosquitto is not installed: `make broker` installs it")
    from msao.cloud_bridge.mqtt_options import ClientOptions
    from msao.datasets.easyvqa import load_easy_vqa
    from msao.edge_runtime.edge_client import EdgeClient

    tmp = Path(tempfile.mkdtemp(prefix="msao-demo-"))
    broker_port, http_port = _free_port(), _free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {broker_port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))  # fmt: skip
    broker_url = f"mqtt://127.0.0.1:{broker_port}"
    msao = [sys.executable, "-m", "msao", "-v"]
    procs: list[subprocess.Popen] = []
    logs = {name: tmp / f"{name}.log" for name in ("mosquitto", "cloud", "edge")}

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=open(logs[name], "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append(proc)
        return proc

    try:
        print(f"==> Mosquitto on {broker_url}")
        _wait_port(broker_port, spawn("mosquitto", [mosquitto, "-c", str(conf)]), "mosquitto", logs["mosquitto"])
        print("==> msao cloud (worker: msao-tiny-cloud on ONNX Runtime)")
        spawn("cloud", [*msao, "cloud", "--broker", broker_url, "--worker-id", "demo-cloud"])
        print(f"==> msao edge (edge model msao-tiny-edge, large model msao-tiny-cloud; HTTP on 127.0.0.1:{http_port})")
        edge = spawn("edge", [*msao, "edge", "--broker", broker_url, "--edge-id", "demo-edge", "--http", f"127.0.0.1:{http_port}"])
        _wait_port(http_port, edge, "msao edge", logs["edge"], timeout_s=120)
        end = time.monotonic() + 60
        while time.monotonic() < end and _get(http_port, "/readyz")[1].get("mode") != "collaborative":
            time.sleep(0.2)
        ready = _get(http_port, "/readyz")[1]
        print(f"    ready: mode {ready['mode']}, policy {ready['policy']}, edge x{ready['edge_scale']} its profile")

        test = load_easy_vqa("test")
        picks = list(range(0, 40 * args.questions, 40))[: args.questions]
        print(f"\n==> {len(picks)} easy-VQA test questions over MQTT (msao/v1/edge/demo-edge/request)")
        right = 0
        with EdgeClient(ClientOptions(broker_url, EdgeClient.new_client_id()), "demo-edge") as client:
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
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        print("==> stopped the edge daemon, the cloud worker and the broker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
