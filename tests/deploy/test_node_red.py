"""The shipped Node-RED flow (deploy/node-red/flows.json) against real parts: Mosquitto, `msao edge`, Node-RED.

The flow is run as a user would import it, pointed at the test broker and edge id through the
environment variables it documents. Node-RED is not a Python dependency: ``make node-red``
installs it under build/node-red (or ``MSAO_NODE_RED`` names a node-red executable); without it
this module skips, saying so, and nothing is installed at test time.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from msao.cloud_bridge.topics import edge_status_topic
from testbed import EdgeDaemon, ManagedProcess, free_port, poll_until, wait_port
from tests.edge_runtime.test_mqtt_intake import SCHEMAS, Requester, schema_errors

ROOT = Path(__file__).resolve().parents[2]
FLOW = ROOT / "deploy" / "node-red" / "flows.json"
NODE_RED = os.environ.get("MSAO_NODE_RED") or str(ROOT / "build" / "node-red" / "node_modules" / ".bin" / "node-red")

pytestmark = pytest.mark.skipif(
    not os.access(NODE_RED, os.X_OK),
    reason=f"Node-RED is not installed at {NODE_RED}: run `make node-red` (npm install node-red@4.1.8 into build/node-red) "
    "or set MSAO_NODE_RED to a node-red executable",
)


class NodeRed:
    """Node-RED on a loopback port with a copy of the shipped flow (the copy is what Node-RED may rewrite)."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.port = free_port()
        user = root / "node-red"
        user.mkdir()
        shutil.copy(FLOW, user / "flows.json")
        command = [NODE_RED, "--userDir", str(user), "--port", str(self.port), "-D", "uiHost=127.0.0.1", "flows.json"]
        self.process = ManagedProcess(command, root / "node-red.log", env={**os.environ, **env}, name="node-red")
        wait_port(self.port, self.process, 120)
        self.process.wait_until(lambda: "Connected to broker" in self.process.log(), 60, "its flow connected to the broker")

    def call(self, method: str, path: str, body: dict | None = None, timeout_s: float = 60) -> tuple[int, dict | str]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data, {"content-type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def status_of_edge(self) -> dict:
        status, body = self.call("GET", "/msao/status")
        assert status == 200 and isinstance(body, dict), f"GET /msao/status: {status} {body}"
        return body

    def stop(self) -> None:
        self.process.stop(15)


def test_the_shipped_flow_asks_the_edge_over_mqtt_and_answers_http_and_inject_and_follows_the_status(
    broker, edge_bundle_dir, easyvqa_test, tmp_path
):
    d = easyvqa_test
    i = d.questions.index("what color is the shape?")
    question, answer, png = d.questions[i], d.answers[i], d.image_pngs[int(d.image_ids[i])]
    (tmp_path / "shape.png").write_bytes(png)
    response_schema = json.loads((SCHEMAS / "edge-response.schema.json").read_text())
    edge_id = "nr-" + uuid.uuid4().hex[:8]
    http_port = free_port()
    args = ["--broker", broker.url, "--edge-id", edge_id, "--http", f"127.0.0.1:{http_port}", "--bundle", str(edge_bundle_dir),
            "--large-bundle", "", "--calibration", ""]  # fmt: skip
    daemon = EdgeDaemon(args, tmp_path / "edge.log", http_port)
    watcher = Requester(broker, f"msao/v1/edge/{edge_id}/response/node-red", edge_status_topic(edge_id))
    env = {"MSAO_MQTT_HOST": "127.0.0.1", "MSAO_MQTT_PORT": str(broker.port), "MSAO_EDGE_ID": edge_id,
           "MSAO_SAMPLE_IMAGE": str(tmp_path / "shape.png")}  # fmt: skip
    node_red = None
    try:
        daemon.wait_ready()
        node_red = NodeRed(tmp_path, env)
        # the daemon's retained status, as the flow's status subscription keeps it
        assert poll_until(lambda: node_red.status_of_edge()["state"] == "online", 60, 0.2), node_red.status_of_edge()
        seen = node_red.status_of_edge()
        assert (seen["edge_id"], seen["ready"], seen["mode"]) == (edge_id, True, "edge-only")

        # http in -> JSON request with a base64 image -> mqtt out ... mqtt in -> http response
        status, body = node_red.call("POST", "/msao/ask", {"question": question, "image": base64.b64encode(png).decode()})
        assert status == 200 and isinstance(body, dict), f"POST /msao/ask: {status} {body}\n{node_red.process.log()[-2000:]}"
        assert not schema_errors(response_schema, body), schema_errors(response_schema, body)
        assert (body["status"], body["answer"], body["answered_by"]) == ("ok", answer, "edge"), body
        assert body["request_id"].startswith("nr-") and body["context"] == {"via": "node-red", "http_id": body["request_id"]}

        # a request the daemon refuses comes back as an HTTP error with the daemon's JSON
        status, body = node_red.call("POST", "/msao/ask", {"question": question})
        assert status == 400 and isinstance(body, dict) and body["error_code"] == "bad_image", (status, body)

        # inject -> file in (MSAO_SAMPLE_IMAGE) -> mqtt out; the answer arrives on the flow's response topic
        status, _ = node_red.call("POST", "/inject/msao_inject")
        assert status == 200, f"the admin API did not trigger the inject node: {status}"
        got = watcher.wait(lambda g: any(x.body.get("context") == {"via": "node-red-inject"} for x in g if "/response/" in x.topic))
        (injected,) = [x.body for x in got if "/response/" in x.topic and x.body.get("context") == {"via": "node-red-inject"}]
        assert (injected["status"], injected["answer"]) == ("ok", answer) and injected["request_id"].startswith("nr-inject-")

        # the daemon dies: the broker's Last Will reaches the flow
        daemon.kill()
        assert poll_until(lambda: node_red.status_of_edge()["state"] == "offline", 30, 0.2), node_red.status_of_edge()
        assert node_red.status_of_edge()["updated_unix_s"] == 0  # the Will, not a clean stop
    finally:
        if node_red is not None:
            node_red.stop()
        daemon.stop()
        watcher.close()
