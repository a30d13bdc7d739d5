"""Each response is charged for its own cloud jobs only, whatever else shares the link.

Real parts: Mosquitto, an `msao cloud` worker process, the edge runtime in this process. The
broker-side truth comes from a second MQTT client that sees every job and every result the
broker carries, keyed by the job id (the MQTT 5 correlation data).
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from PIL import Image

from msao.cloud_bridge.link import CloudLink, LinkOptions
from msao.cloud_bridge.mqtt_options import ClientOptions
from msao.cloud_bridge.remote_runner import RemoteOptions, RemoteRunner
from msao.cloud_bridge.stats import TransferStats
from msao.edge_runtime.requests import EdgeRequest
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions
from msao.engines.bundle import load_bundle
from msao.errors import CloudError
from testbed import start_workers, stop_all, wait_online


class _BrokerTap:
    """Every PUBLISH the broker delivers, as payload sizes per correlation id (job id), split into jobs and results."""

    def __init__(self, broker_url: str):
        host, port = broker_url.removeprefix("mqtt://").split(":")
        self.jobs: dict[str, int] = {}
        self.results: dict[str, int] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tap-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.client.subscribe("msao/#", qos=1)
        assert self._subscribed.wait(10), "the tap's subscription was never acknowledged"

    def _on_message(self, _c, _u, msg) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        if not corr:
            return
        job = corr.decode("ascii", "replace")
        with self._lock:
            book = self.jobs if "/cloud/jobs/" in msg.topic else self.results
            book[job] = book.get(job, 0) + len(msg.payload)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _png_of_size(data, i: int, pad_bytes: int) -> bytes:
    """An easy-VQA image re-saved with an ancillary text chunk of ``pad_bytes`` random bytes (decoders skip it)."""
    rgb = Image.open(io.BytesIO(data.image_pngs[data.image_ids[i]])).convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    png = out.getvalue()
    text = b"pad\x00" + np.random.default_rng(i).integers(65, 90, pad_bytes, dtype=np.uint8).tobytes()
    chunk = len(text).to_bytes(4, "big") + b"tEXt" + text + zlib.crc32(b"tEXt" + text).to_bytes(4, "big")
    return png[:33] + chunk + png[33:]  # after the IHDR chunk


@pytest.fixture(scope="module")
def cloud(broker, tmp_path_factory, cloud_bundle_dir: Path):
    workers = start_workers(broker.url, cloud_bundle_dir, tmp_path_factory.mktemp("accounting"), count=1)
    yield workers
    stop_all(workers)


def test_two_concurrent_speculative_requests_are_each_charged_their_own_jobs(broker, cloud, models, calibration, easyvqa_test):
    tap = _BrokerTap(broker.url)
    edge_id = "edge-" + uuid.uuid4().hex[:8]
    link = CloudLink(LinkOptions(edge_id, ClientOptions(broker.url, f"msao-{edge_id}", keepalive_s=5))).start()
    rt = None
    try:
        wait_online(link, cloud)
        rt = EdgeRuntime(*models, link, calibration, RuntimeOptions(workers=2, probe_interval_s=0)).start()
        pads = (2_000, 30_000)  # two image sizes far apart: each job's size says whose it is
        requests = [
            EdgeRequest(f"acct{n}{uuid.uuid4().hex[:6]}", easyvqa_test.questions[n], _png_of_size(easyvqa_test, n, pad),
                        deadline_ms=20_000, policy="draft_verify_static")
            for n, pad in enumerate(pads)
        ]  # fmt: skip
        for _ in range(3):  # a few rounds, both requests in flight together each time
            jobs_before = set(tap.jobs)
            with ThreadPoolExecutor(2) as pool:
                responses = list(pool.map(rt.answer, requests))
            assert all(r.status == "ok" and r.answered_by == "cloud" for r in responses), responses
            end = time.monotonic() + 5
            while time.monotonic() < end and len(set(tap.results) - jobs_before) < 2:
                time.sleep(0.01)
            new_jobs = sorted(set(tap.jobs) - jobs_before, key=lambda j: tap.jobs[j])
            assert len(new_jobs) == 2, (new_jobs, tap.jobs)  # one verification job per request
            for response, job in zip(responses, new_jobs):  # the smaller image's request sent the smaller job
                assert response.bytes_up == tap.jobs[job], (response.request_id, response.bytes_up, tap.jobs[job])
                assert response.bytes_down == tap.results[job], (response.request_id, response.bytes_down, tap.results[job])
    finally:
        if rt is not None:
            rt.stop()
        link.close()
        tap.close()


def test_a_failed_remote_step_reports_its_own_job_even_when_another_finished_meanwhile(broker, cloud_bundle_dir: Path):
    """The race behind a split's byte count: another thread's transfer lands between this job's failure and its report."""
    manifest = dataclasses.replace(load_bundle(cloud_bundle_dir).manifest, model_hash="0" * 64)  # a model no worker serves
    edge_id = "edge-" + uuid.uuid4().hex[:8]
    link = CloudLink(LinkOptions(edge_id, ClientOptions(broker.url, f"msao-{edge_id}", keepalive_s=5))).start()
    try:
        assert link.client.wait_connected(10)
        other = TransferStats("someone-else", "answer", "w", "ok", 1, 999_999, 77, 1, 999_999, 1.0)

        def another_thread_finishes(t: TransferStats) -> None:
            if t.kind == "split":  # on the adding thread, right after this job's record
                link.transfers.add(other)

        link.transfers.subscribe(another_thread_finishes)
        runner = RemoteRunner(link, manifest, manifest.split_points[0], options=RemoteOptions(deadline_s=0.4))
        d, t = manifest.model.hidden_size, 5
        feeds = {
            "hidden_states": np.zeros((1, t, d), np.float32),
            "position_ids": np.arange(t, dtype=np.int64)[None],
            "attention_mask": np.ones((1, t), np.int64),
        }
        with pytest.raises(CloudError):
            runner.infer(feeds)
        assert link.transfers.last is other  # the other transfer really came last
        assert runner.last_stats is not None and runner.last_stats.job_id == runner.job_ids[-1]
        assert runner.last_stats is not other and runner.last_stats.bytes_up != other.bytes_up  # (0 when load delays the send past the deadline)
    finally:
        link.close()
