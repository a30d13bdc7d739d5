"""Bad input to a real worker: each yields an error result or a logged drop, and the worker serves the next good job."""

from __future__ import annotations

import io
import json
import queue
import re
import struct
import time
import uuid

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.codec import payload_from_tensors, tensors_from_payload
from msao.cloud_bridge.link import new_job_id
from msao.cloud_bridge.messages import JobHeader, ResultHeader
from msao.cloud_bridge.mqtt_options import ClientOptions
from msao.cloud_bridge.topics import worker_job_topic
from msao.engines.bundle import load_bundle
from testbed import open_link, poll_until, start_workers, stop_all, wait_online

REPLY = "msao/v1/edge/bad-input-test/cloud/results"


@pytest.fixture(scope="module")
def model_hash(cloud_bundle_dir) -> str:
    return load_bundle(cloud_bundle_dir).manifest.model_hash


@pytest.fixture(scope="module")
def worker(broker, cloud_bundle_dir, tmp_path_factory):
    procs = start_workers(broker.url, cloud_bundle_dir, tmp_path_factory.mktemp("logs"), extra=("--max-payload-mb", "4"))
    link = open_link(broker.url)
    wait_online(link, procs)
    yield procs[0], link
    link.close()
    stop_all(procs)


class Raw:
    """Publishes arbitrary bytes as jobs and collects the results by job id."""

    def __init__(self, broker_url: str):
        self.results: queue.Queue = queue.Queue()
        self.client = BridgeClient(ClientOptions(broker_url, "raw-" + uuid.uuid4().hex[:8]), self.results.put)
        self.client.subscribe(REPLY)
        self.client.start()
        assert self.client.wait_connected(10)

    def send(self, topic: str, payload: bytes, job_id: str | None, response_topic: str | None = REPLY, expiry_s: float = 10) -> None:
        corr = job_id.encode() if job_id is not None else None
        self.client.publish(topic, payload, response_topic=response_topic, correlation_data=corr, expiry_s=expiry_s)

    def result(self, job_id: str, timeout_s: float = 10.0) -> ResultHeader | None:
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            try:
                msg = self.results.get(timeout=left)
            except queue.Empty:
                return None
            if msg.correlation_data == job_id.encode():
                return ResultHeader.from_metadata(tensors_from_payload(msg.payload).metadata)
        return None


@pytest.fixture(scope="module")
def raw(broker):
    r = Raw(broker.url)
    yield r
    r.client.stop()


def _job(model_hash: str, job_id: str, **over) -> dict[str, str]:
    fields = dict(job_id=job_id, model_hash=model_hash, kind="split", deadline_unix_s=time.time() + 10, segment="decoder[3:4]")
    fields.update(over)
    return JobHeader(**fields).to_metadata()


def _feeds(d: int = 128, t: int = 2) -> dict[str, np.ndarray]:
    return {
        "hidden_states": np.ones((1, t, d), np.float32),
        "position_ids": np.arange(t)[None],
        "attention_mask": np.ones((1, t), np.int64),
    }


def _assert_still_serving(raw: Raw, topic: str, model_hash: str) -> None:
    jid = new_job_id()
    raw.send(topic, payload_from_tensors(_feeds(), _job(model_hash, jid)), jid)
    res = raw.result(jid)
    assert res is not None and res.status == "ok", res


def _raw_safetensors(header: dict, data: bytes, hlen: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if hlen is None else hlen) + h + data


def _bomb(total: int, declare: bool) -> bytes:
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(buf, size=total if declare else -1, closefd=False) as w:
        for _ in range(total >> 20):
            w.write(bytes(1 << 20))
    return buf.getvalue()


CASES = {
    "truncated safetensors": (lambda h, j: payload_from_tensors(_feeds(), _job(h, j))[:-10], "bad_payload", "past the data|cover"),
    "header length larger than the payload": (lambda h, j: struct.pack("<Q", 5000) + b"{}", "bad_payload", "runs past the payload"),
    "shape and byte count disagree": (
        lambda h, j: _raw_safetensors(
            {"__metadata__": _job(h, j), "hidden_states": {"dtype": "F32", "shape": [1, 2, 128], "data_offsets": [0, 12]}}, b"\0" * 12
        ),
        "bad_payload",
        "needs 1024 bytes",
    ),  # fmt: skip
    "unknown dtype": (
        lambda h, j: _raw_safetensors(
            {"__metadata__": _job(h, j), "x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"
        ),
        "bad_payload",
        "F8_E4M3",
    ),  # fmt: skip
    "zstd bomb with declared size": (lambda h, j: _bomb(64 << 20, declare=True), "too_large", "declares 67108864 bytes"),
    "zstd bomb without declared size": (lambda h, j: _bomb(16 << 20, declare=False), "bad_payload", "does not declare its content size"),
    "wrong model hash": (lambda h, j: payload_from_tensors(_feeds(), _job("1" * 64, j)), "unknown_model", "has no model 111111111111"),
    "unknown segment range": (
        lambda h, j: payload_from_tensors(_feeds(), _job(h, j, segment="decoder[1:7]")),
        "unknown_segment",
        "split at one of",
    ),
    "unknown exit head": (lambda h, j: payload_from_tensors(_feeds(), _job(h, j, head="exit_head@3")), "unknown_segment", "exit_head@4"),
    "tensors that do not fit the segment": (
        lambda h, j: payload_from_tensors({**_feeds(), "hidden_states": np.ones((1, 2, 7), np.float32)}, _job(h, j)),
        "bad_input",
        "hidden_states: got shape",
    ),  # fmt: skip
    "missing tensor": (
        lambda h, j: payload_from_tensors({"hidden_states": np.ones((1, 2, 128), np.float32)}, _job(h, j)),
        "bad_input",
        "exactly the tensors",
    ),
    "header job id differs from correlation data": (
        lambda h, j: payload_from_tensors(_feeds(), _job(h, "someone-else")),
        "bad_job",
        "differs from CorrelationData",
    ),
    "unknown header key": (lambda h, j: payload_from_tensors(_feeds(), {**_job(h, j), "priority": "9"}), "bad_job", "unknown metadata keys"),
    "other layout version": (lambda h, j: payload_from_tensors(_feeds(), {**_job(h, j), "layout": "2"}), "bad_job", "layout '2'"),
    "decode step for a session the worker lacks": (
        lambda h, j: payload_from_tensors(
            {**_feeds(t=1), "attention_mask": np.ones((1, 5), np.int64)}, _job(h, j, session_id="nope", past_length=4)
        ),
        "session_unknown",
        "holds no KV session nope",
    ),  # fmt: skip
    "image that is not an image": (
        lambda h, j: payload_from_tensors(
            {"image": np.frombuffer(b"GIF89a-nope", np.uint8)}, _job(h, j, kind="answer", segment="", question="what?")
        ),
        "bad_input",
        "cannot decode image",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_job_gets_an_error_result_and_the_worker_keeps_serving(worker, raw, model_hash, case):
    proc, _ = worker
    make, code, match = CASES[case]
    topic = worker_job_topic(proc.worker_id, model_hash)
    jid = new_job_id()
    raw.send(topic, make(model_hash, jid), jid)
    res = raw.result(jid)
    assert res is not None, f"no result for {case!r}; worker log:\n{proc.log()[-2000:]}"
    assert (res.status, res.error_code) == ("error", code), res
    assert re.search(match, res.error), res.error
    _assert_still_serving(raw, topic, model_hash)


def test_job_past_its_deadline_is_dropped_and_logged(worker, raw, model_hash):
    proc, link = worker
    topic = worker_job_topic(proc.worker_id, model_hash)
    jid = new_job_id()
    raw.send(topic, payload_from_tensors(_feeds(), _job(model_hash, jid, deadline_unix_s=time.time() - 30)), jid)
    assert raw.result(jid, timeout_s=1.0) is None
    assert proc.wait_for_log(f"job {jid}: dropped, deadline passed", 5)
    _assert_still_serving(raw, topic, model_hash)
    assert poll_until(lambda: next(w for w in link.workers() if w.worker_id == proc.worker_id).expired_total >= 1, 10)  # next status


def test_job_without_response_topic_is_dropped_and_logged(worker, raw, model_hash):
    proc, _ = worker
    topic = worker_job_topic(proc.worker_id, model_hash)
    raw.send(topic, payload_from_tensors(_feeds(), _job(model_hash, "x1")), "x1", response_topic=None)
    raw.send(topic, payload_from_tensors(_feeds(), _job(model_hash, "x2")), None)
    assert proc.wait_for_log("no ResponseTopic or no valid CorrelationData", 5)
    _assert_still_serving(raw, topic, model_hash)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(st.binary(max_size=2048), st.binary(min_size=8, max_size=64).map(lambda b: b"\x28\xb5\x2f\xfd" + b)))
def test_random_bytes_get_an_error_result(worker, raw, model_hash, junk):
    proc, _ = worker
    jid = new_job_id()
    raw.send(worker_job_topic(proc.worker_id, model_hash), junk, jid)
    res = raw.result(jid)
    assert res is not None and res.status == "error" and res.error_code in ("bad_payload", "too_large"), res


def test_worker_survived_the_whole_corpus(worker, raw, model_hash):
    proc, _ = worker
    assert proc.alive()
    _assert_still_serving(raw, worker_job_topic(proc.worker_id, model_hash), model_hash)
    assert "Traceback" not in proc.log()  # every bad input was an expected, handled error
