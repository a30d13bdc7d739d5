"""Chunking: payloads above the broker's Maximum Packet Size round-trip in chunks and are never published whole."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msao.cloud_bridge.chunking import ChunkHeader, Reassembler, split_payload
from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.link import new_job_id
from msao.cloud_bridge.messages import JobHeader
from msao.cloud_bridge.mqtt_options import ClientOptions
from msao.cloud_bridge.remote_runner import RemoteOptions, RemoteRunner
from msao.engines.bundle import load_bundle
from msao.engines.generation import DecoderStack, Generator
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import CodecError, PayloadTooLarge
from testbed import open_link, poll_until, start_workers, stop_all, wait_online
from tests.cloud_bridge import SMALL_MAX_PACKET


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 5000), chunk=st.integers(1, 700), seed=st.integers(0, 2**32 - 1), dup=st.booleans())
def test_chunks_reassemble_to_the_payload_in_any_order_with_duplicates(size, chunk, seed, dup):
    payload = random.Random(seed).randbytes(size)
    parts = list(split_payload(payload, chunk, "m1"))
    assert all(len(p) <= chunk for _, p in parts) and sum(len(p) for _, p in parts) == size
    rng = random.Random(seed)
    order = parts + (parts[:1] if dup else [])
    rng.shuffle(order)
    r = Reassembler(max_message_bytes=5000)
    done = [out for h, p in order if (out := r.add("t", ChunkHeader.from_property(h.to_property()), p)) is not None]
    # a one-chunk message has no reassembly state, so its duplicate is a duplicate message (job ids de-duplicate those)
    assert len(done) == (2 if dup and len(parts) == 1 else 1) and bytes(done[0]) == payload and len(r) == 0


def test_reassembly_refuses_messages_over_the_limit_before_allocating():
    r = Reassembler(max_message_bytes=1000)
    with pytest.raises(PayloadTooLarge, match="announces 10000000 bytes"):
        r.add("t", ChunkHeader("m", 0, 10000, 10_000_000, 1000), b"x" * 1000)
    assert r.buffered_bytes == 0


def test_reassembly_bounds_messages_in_flight_and_buffered_bytes():
    r = Reassembler(max_message_bytes=1000, max_partial_messages=2, max_buffered_bytes=1000)
    r.add("t", ChunkHeader("a", 0, 2, 600, 300), b"x" * 300)
    with pytest.raises(PayloadTooLarge, match="reassembly buffers would hold 1200"):
        r.add("t", ChunkHeader("b", 0, 2, 600, 300), b"x" * 300)
    r2 = Reassembler(max_message_bytes=1000, max_partial_messages=1)
    r2.add("t", ChunkHeader("a", 0, 2, 20, 10), b"x" * 10)
    with pytest.raises(PayloadTooLarge, match="already in reassembly"):
        r2.add("t", ChunkHeader("b", 0, 2, 20, 10), b"x" * 10)


def test_stale_partial_messages_are_dropped_after_the_timeout():
    r = Reassembler(max_message_bytes=1000, timeout_s=5)
    r.add("t", ChunkHeader("a", 0, 2, 20, 10), b"x" * 10, now=100.0)
    assert r.expire(now=104.0) == [] and len(r) == 1
    assert r.expire(now=106.0) == ["a"] and len(r) == 0 and r.dropped_total == 1
    assert r.add("t", ChunkHeader("a", 1, 2, 20, 10), b"y" * 10, now=106.5) is None  # a late chunk starts over, never completes stale data


@pytest.mark.parametrize(
    "header, data, match",
    [
        ("m:0:2:20:10", b"x" * 9, "has 9 bytes, its header says 10"),
        ("m:2:2:20:10", b"x" * 10, "out of range"),
        ("m:0:3:20:10", b"x" * 10, "cannot hold"),
        ("m:0:2:20", b"x" * 10, "is not"),
        ("m/x:0:2:20:10", b"x" * 10, "is not"),
    ],
)
def test_malformed_chunks_are_refused(header, data, match):
    with pytest.raises(CodecError, match=match):
        Reassembler(1000).add("t", ChunkHeader.from_property(header), data)


def test_a_late_duplicate_chunk_of_a_completed_message_is_ignored():
    r = Reassembler(1000)
    assert r.add("t", ChunkHeader("m", 0, 2, 20, 10), b"x" * 10) is None
    assert r.add("t", ChunkHeader("m", 1, 2, 20, 10), b"y" * 10) is not None
    assert r.add("t", ChunkHeader("m", 1, 2, 20, 10), b"y" * 10) is None and len(r) == 0


def test_chunk_disagreeing_with_its_message_is_refused():
    r = Reassembler(1000)
    r.add("t", ChunkHeader("m", 0, 2, 20, 10), b"x" * 10)
    with pytest.raises(CodecError, match="disagrees with the first chunk"):
        r.add("t", ChunkHeader("m", 1, 3, 30, 10), b"x" * 10)


# -- through a broker with max_packet_size = 16384 -------------------------------------------------


@pytest.fixture(scope="module")
def small_fleet(small_broker, cloud_bundle_dir, tmp_path_factory):
    procs = start_workers(small_broker.url, cloud_bundle_dir, tmp_path_factory.mktemp("logs"))
    link = open_link(small_broker.url)
    wait_online(link, procs)
    spy_sizes: list[int] = []
    spy = BridgeClient(ClientOptions(small_broker.url, "spy-" + new_job_id()[:8]), lambda m: spy_sizes.append(m.wire_bytes))
    spy.subscribe("msao/v1/#")  # sees every job, chunk, result and status as the broker forwards them
    spy.start()
    assert spy.wait_connected(10)
    yield procs[0], link, spy, spy_sizes
    spy.stop()
    link.close()
    stop_all(procs)


def test_client_reads_the_maximum_packet_size_from_connack(small_fleet, broker):
    _, link, _, _ = small_fleet
    assert link.client.max_packet_bytes == SMALL_MAX_PACKET
    plain = open_link(broker.url)  # Mosquitto 2.0 states none: the safe default applies
    try:
        assert plain.client.max_packet_bytes == plain.client.options.default_max_packet_bytes
    finally:
        plain.close()


def test_split_job_above_the_packet_limit_round_trips_in_chunks_never_whole(small_fleet, cloud_bundle_dir):
    worker, link, spy, spy_sizes = small_fleet
    gen = Generator(load_bundle(cloud_bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    rng = np.random.default_rng(1)
    t = 120
    hidden = rng.standard_normal((1, t, gen.info.hidden_size)).astype(np.float32)  # 61 KB, ~4 packets
    positions, mask = np.arange(t)[None], np.ones((1, t), np.int64)
    remote = RemoteRunner(link, gen.bundle.manifest, 2, head="none", options=RemoteOptions(transport_dtype="float32", logits="all"))
    got = remote.infer({"hidden_states": hidden, "position_ids": positions, "attention_mask": mask})["hidden_states_out"]
    tail = DecoderStack([gen.runners["decoder[2:3]"], gen.runners["decoder[3:4]"]], gen.info.num_kv_heads, gen.info.head_dim)
    tail.reset()
    want = tail.run(hidden, positions, mask)
    gen.close()
    assert np.abs(got - want).max() <= 1e-5
    s = remote.last_stats
    assert s.chunks_up >= 4 and s.bytes_up > SMALL_MAX_PACKET and s.bytes_down > SMALL_MAX_PACKET  # chunked both ways
    assert poll_until(lambda: spy.counters.chunks_in >= 8 and max(spy_sizes, default=0) > SMALL_MAX_PACKET, 10)  # the spy reassembled big messages...
    # ...that never crossed the broker whole: it disconnects any client sending a bigger packet
    assert link.client.counters.disconnects == 0 and "disconnected from" not in worker.log() and worker.alive()


def test_the_test_broker_really_disconnects_a_client_that_publishes_above_its_limit(small_broker):
    """The control for the test above: the limit is enforced, so no disconnect means no oversize packet."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    dropped = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, reconnect_on_failure=False)
    c.on_disconnect = lambda *a: dropped.append(a[3])
    c.connect("127.0.0.1", small_broker.port)
    c.loop_start()
    try:
        c.publish("test/whole", b"x" * (SMALL_MAX_PACKET + 100), qos=1)
        end = time.monotonic() + 5
        while not dropped and time.monotonic() < end:
            time.sleep(0.01)
        assert dropped, "broker accepted an oversize packet"
    finally:
        c.loop_stop()


def test_publish_never_sends_a_packet_above_the_broker_limit(small_fleet):
    _, link, _, _ = small_fleet
    got: list = []
    c = BridgeClient(ClientOptions(link.client.options.broker, "edge-" + new_job_id()[:8]), got.append)
    c.subscribe("test/chunks")
    c.start()
    assert c.wait_connected(10)
    try:
        for size in (0, 1, SMALL_MAX_PACKET - 200, SMALL_MAX_PACKET, 3 * SMALL_MAX_PACKET + 7, 200_000):
            payload = bytes(random.Random(size).randbytes(size))
            report = c.publish("test/chunks", payload, response_topic="x/y", correlation_data=b"id", expiry_s=5)
            end = time.monotonic() + 5
            while len(got) < 1 and time.monotonic() < end:
                time.sleep(0.01)
            msg = got.pop()
            assert bytes(msg.payload) == payload and msg.chunks == report.chunks and msg.correlation_data == b"id"
            assert (report.chunks > 1) == (size > SMALL_MAX_PACKET - 200)
        assert c.counters.disconnects == 0  # an oversize packet would have made the broker drop us
    finally:
        c.stop()


def test_job_header_survives_chunking(small_fleet, cloud_bundle_dir):
    worker, link, _, _ = small_fleet
    model_hash = load_bundle(cloud_bundle_dir).manifest.model_hash
    big = np.random.default_rng(2).integers(0, 255, 50_000, dtype=np.uint8)
    header = JobHeader(new_job_id(), model_hash, "answer", time.time() + 10, question="what color is the shape?")
    with pytest.raises(Exception, match="bad_input.*cannot decode image"):
        link.submit(header, {"image": big}, worker_id=worker.worker_id)
