"""A whole deployment over mqtts:// with authentication and the shipped ACL: `msao cloud`, `msao edge`, `msao ask`.

The worker logs in as msao-cloud and the edge daemon as edge-a (passwords from
$MSAO_MQTT_PASSWORD, never the command line); one `msao ask` uses edge-a's password, another
only a client certificate whose CN is edge-a. The questions are real easy-VQA ones, answered by
the cloud model (policy cloud_only), so jobs, results, worker statuses, requests and answers
all cross the broker under the ACL. Then what another edge and a hostile job can and cannot do
to this deployment.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from msao.cloud_bridge.codec import payload_from_tensors, tensors_from_payload
from msao.cloud_bridge.link import CloudLink, LinkOptions, new_job_id
from msao.cloud_bridge.messages import JobHeader, ResultHeader
from msao.cloud_bridge.mqtt_options import ClientOptions, TlsOptions
from msao.cloud_bridge.topics import edge_request_topic, edge_response_topic, edge_results_topic, job_topic, worker_status_topic
from msao.engines.bundle import load_bundle
from testbed import CloudWorker, ManagedProcess, msao_command
from tests.security.probe import Probe
from tests.security.secure_broker import CLOUD_USER, SecureBroker

ROOT = Path(__file__).resolve().parents[2]
WORKER_ID = "w-sec"
SAMPLES = (0, 2)  # easy-VQA test questions the cloud model answers correctly


@dataclass
class Fleet:
    secure: SecureBroker
    worker_log: Path
    edge_log: Path
    model_hash: str
    images: dict[int, Path]


def _env(password: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSAO_")}  # no stray broker or config settings
    if password is not None:
        env["MSAO_MQTT_PASSWORD"] = password
    return env


@pytest.fixture(scope="module")
def fleet(secure: SecureBroker, built_bundles, easyvqa_test, tmp_path_factory) -> Iterator[Fleet]:
    edge_bundle, cloud_bundle = built_bundles
    logs = tmp_path_factory.mktemp("fleet")
    tls = ["--broker", secure.tls_url, "--ca-file", str(secure.pki.ca)]
    worker = CloudWorker(
        WORKER_ID, cloud_bundle, secure.tls_url, logs / "worker.log", extra=(tls[2:] + ["--username", CLOUD_USER]), verbosity="-v",
        env=_env(secure.passwords[CLOUD_USER]),
    )  # fmt: skip
    edge = ManagedProcess(
        msao_command(["-vv", "edge", "--edge-id", "edge-a", "--bundle", str(edge_bundle), "--large-bundle", str(cloud_bundle), *tls,
                      "--username", "edge-a", "--policy", "cloud_only", "--threads", "1", "--workers", "1"]),
        logs / "edge.log", _env(secure.passwords["edge-a"]), name="msao edge",
    )  # fmt: skip
    images = {}
    for i in SAMPLES:
        images[i] = logs / f"q{i}.png"
        images[i].write_bytes(easyvqa_test.image_pngs[int(easyvqa_test.image_ids[i])])
    try:
        with Probe(secure.tls_url, "edge-a", secure.passwords["edge-a"], secure.pki.ca) as watcher:
            watcher.subscribe(worker_status_topic(WORKER_ID))  # edges may read worker statuses
            end = time.monotonic() + 90
            while True:
                online = any(b'"online"' in m.payload for m in watcher.received(worker_status_topic(WORKER_ID)))
                edge_log = (logs / "edge.log").read_text(errors="replace")
                if online and "MQTT intake of edge edge-a" in edge_log and "as msao-edge-edge-a-link" in edge_log:
                    break
                for proc in (worker, edge):
                    if not proc.alive():
                        raise proc.failure("exited before the fleet was up")
                if time.monotonic() > end:
                    pytest.fail(f"fleet not up after 90 s (worker online: {online}):\n{edge_log[-3000:]}")
                time.sleep(0.1)
        yield Fleet(secure, logs / "worker.log", logs / "edge.log", load_bundle(cloud_bundle).manifest.model_hash, images)
    finally:
        edge.stop(20)
        worker.stop(20)


def test_cloud_answers_through_tls_password_and_certificate_logins(fleet: Fleet, easyvqa_test):
    s = fleet.secure
    common = ["ask", "--edge-id", "edge-a", "--json", "--policy", "cloud_only", "--deadline-ms", "30000", "--ca-file", str(s.pki.ca)]
    cert, key = s.pki.client("edge-a")
    runs = {
        "password": (
            [*common, "--broker", s.tls_url, "--username", "edge-a", "--image", str(fleet.images[SAMPLES[0]]),
             "--question", easyvqa_test.questions[SAMPLES[0]]],
            _env(s.passwords["edge-a"]), SAMPLES[0],
        ),
        "certificate": (
            [*common, "--broker", s.mtls_url, "--cert-file", str(cert), "--key-file", str(key), "--image", str(fleet.images[SAMPLES[1]]),
             "--question", easyvqa_test.questions[SAMPLES[1]]],
            _env(None), SAMPLES[1],
        ),
    }  # fmt: skip
    procs = {
        name: ManagedProcess(msao_command(args), fleet.worker_log.parent / f"ask-{name}.log", env, stdout_path=fleet.worker_log.parent / f"ask-{name}.json")
        for name, (args, env, _) in runs.items()
    }
    for name, proc in procs.items():
        code = proc.process.wait(90)
        assert code == 0, f"{name} login: msao ask failed ({code}):\n{proc.log()[-3000:]}"
        out = proc.stdout_path.read_text()
        r = json.loads(out)
        sample = runs[name][2]
        assert r["status"] == "ok" and r["answered_by"] == "cloud" and r["model"] == "msao-tiny-cloud" and r["bytes_up"] > 0, r
        assert r["answer"] == easyvqa_test.answers[sample], (name, easyvqa_test.questions[sample], r["answer"])


def test_another_edge_cannot_ask_this_edges_daemon(fleet: Fleet, easyvqa_test):
    s = fleet.secure
    image = fleet.images[SAMPLES[0]].read_bytes()

    def request(rid: str) -> bytes:
        doc = {
            "request_id": rid,
            "question": easyvqa_test.questions[SAMPLES[0]],
            "image": base64.b64encode(image).decode(),
            "deadline_ms": 30000,
        }
        return json.dumps(doc).encode()

    with (
        Probe(s.tls_url, "edge-b", s.passwords["edge-b"], s.pki.ca) as b,
        Probe(s.tls_url, "edge-a", s.passwords["edge-a"], s.pki.ca) as a_app,
    ):
        b.subscribe(edge_response_topic("edge-b") + "/#")
        a_app.subscribe(edge_response_topic("edge-a") + "/app")
        evil_id, own_id = "intruder-" + new_job_id(), "own-" + new_job_id()
        reason = b.publish(edge_request_topic("edge-a"), request(evil_id), response_topic=edge_response_topic("edge-b") + "/x")
        assert reason == "Not authorized"
        assert a_app.publish(edge_request_topic("edge-a"), request(own_id), response_topic=edge_response_topic("edge-a") + "/app") == "Success"
        answers = a_app.wait_for(own_id.encode(), timeout_s=60)
        assert answers and json.loads(answers[0].payload)["status"] == "ok", "edge-a's daemon did not answer its own client"
        log = fleet.edge_log.read_text(errors="replace")
        assert own_id in log, "the daemon's debug log does not name request ids; this test cannot see what it received"
        assert evil_id not in log, "edge-b's request reached edge-a's daemon"
        assert b.received(marker=evil_id.encode()) == []


def _send_job(fleet: Fleet, tensors: dict[str, np.ndarray], metadata: dict[str, str], job_id: str) -> ResultHeader:
    s = fleet.secure
    with Probe(s.tls_url, "edge-a", s.passwords["edge-a"], s.pki.ca) as edge:
        edge.subscribe(edge_results_topic("edge-a"))
        payload = payload_from_tensors(tensors, metadata)
        reason = edge.publish(
            job_topic(fleet.model_hash), payload, response_topic=edge_results_topic("edge-a"), correlation_data=job_id.encode()
        )
        assert reason == "Success", reason
        end = time.monotonic() + 30
        while time.monotonic() < end:
            for m in edge.received(edge_results_topic("edge-a")):
                if m.correlation_data == job_id.encode():
                    return ResultHeader.from_metadata(tensors_from_payload(m.payload).metadata)
            time.sleep(0.02)
    pytest.fail(f"no result for job {job_id} in 30 s:\n{fleet.worker_log.read_text()[-3000:]}")


def test_worker_refuses_a_job_that_carries_a_model_file(fleet: Fleet, built_bundles):
    """A job is named tensors + string metadata; a model file riding along as a tensor is refused, never loaded."""
    onnx = np.frombuffer((built_bundles[0] / "lm_head.onnx").read_bytes(), np.uint8)
    image = np.frombuffer(fleet.images[SAMPLES[0]].read_bytes(), np.uint8)
    job_id = new_job_id()
    header = JobHeader(job_id, fleet.model_hash, "answer", time.time() + 30, question="what shape is this?")
    result = _send_job(fleet, {"image": image, "model": onnx}, header.to_metadata(), job_id)
    assert (result.status, result.error_code) == ("error", "bad_input"), result
    assert "['image', 'model']" in result.error, result.error


def test_worker_refuses_a_job_naming_a_bundle_in_its_metadata(fleet: Fleet):
    job_id = new_job_id()
    header = JobHeader(job_id, fleet.model_hash, "answer", time.time() + 30, question="what shape is this?")
    image = np.frombuffer(fleet.images[SAMPLES[0]].read_bytes(), np.uint8)
    metadata = {**header.to_metadata(), "bundle": "/tmp/evil-bundle"}
    result = _send_job(fleet, {"image": image}, metadata, job_id)
    assert (result.status, result.error_code) == ("error", "bad_job"), result
    assert "unknown metadata keys ['bundle']" in result.error, result.error


def test_passwords_never_reach_the_logs(fleet: Fleet):
    logs = fleet.worker_log.read_text(errors="replace") + fleet.edge_log.read_text(errors="replace")  # the edge's at debug level
    assert "connected to mqtts://" in logs
    leaked = [user for user, password in fleet.secure.passwords.items() if password in logs]
    assert not leaked, f"the password of {leaked} appears in a daemon's log"


def test_a_result_redirected_to_another_edge_is_ignored_there(fleet: Fleet):
    """A worker answers on the job's ResponseTopic: edge-a can aim its own job's result at edge-b (the ACL lets
    workers write any edge's results topic), and edge-b's link drops it, since no job of its own has that id."""
    s = fleet.secure
    client = ClientOptions(
        s.tls_url, "msao-edge-edge-b-link", tls=TlsOptions(ca_file=str(s.pki.ca)), username="edge-b", password=s.passwords["edge-b"]
    )
    link = CloudLink(LinkOptions("edge-b", client)).start(timeout_s=5.0)
    try:
        assert link.client.wait_subscribed(5.0), link.client.last_connect_error
        with Probe(s.tls_url, "edge-a", s.passwords["edge-a"], s.pki.ca) as a:
            job_id = new_job_id()
            header = JobHeader(job_id, fleet.model_hash, "probe", time.time() + 30)
            reason = a.publish(job_topic(fleet.model_hash), payload_from_tensors({}, header.to_metadata()),
                               response_topic=edge_results_topic("edge-b"), correlation_data=job_id.encode())  # fmt: skip
            assert reason == "Success", reason
            end = time.monotonic() + 10
            while link.late_results == 0 and time.monotonic() < end:
                time.sleep(0.02)
        assert link.late_results == 1, "the redirected result did not reach edge-b's link (or was taken for one of its jobs)"
    finally:
        link.close()
