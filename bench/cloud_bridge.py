"""Cloud bridge numbers: codec vs memcpy, zstd on real fp16 hidden states, loopback job round trips vs floors.

    make bench-bridge      # = python bench/cloud_bridge.py --bundle bundles/msao-tiny-cloud

Writes JSON (default bench/results/cloud_bridge.json) and prints Markdown tables. Starts its
own Mosquitto (``set_tcp_nodelay true``) on a free loopback port and one ``msao cloud``
worker; both are stopped at the end. Every timing is warmed up; medians (p50) and p95 are
reported, with the machine's load average so concurrent work is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from msao.cloud_bridge.codec import compress_payload, payload_from_tensors, tensors_from_payload
from testbed import CloudWorker, ManagedProcess, start_broker

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"1KB": 1_000, "100KB": 100_000, "1MB": 1_000_000, "10MB": 10_000_000}


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _time(fn, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# -- 1. codec throughput vs a plain memory copy ---------------------------------------------------


def _codec_row(label: str, x: np.ndarray, n: int) -> dict:
    tensors = {"hidden_states": x}
    payload = payload_from_tensors(tensors)
    zpayload = compress_payload(payload)
    enc = _time(lambda: payload_from_tensors(tensors), n)
    dec = _time(lambda: tensors_from_payload(payload), n)
    cpy = _time(lambda: x.copy(), n)  # the floor: one allocation + one copy of the same bytes
    zenc = _time(lambda: compress_payload(payload_from_tensors(tensors)), max(3, n // 4))
    zdec = _time(lambda: tensors_from_payload(zpayload), max(3, n // 4))
    gbs = lambda ts: x.nbytes / np.median(ts) / 1e9  # noqa: E731
    return dict(
        size=label, bytes=x.nbytes, encode_gbps=gbs(enc), decode_gbps=gbs(dec), memcpy_gbps=gbs(cpy),
        encode_decode_gbps=x.nbytes / (np.median(enc) + np.median(dec)) / 1e9,
        zstd1_encode_gbps=gbs(zenc), zstd1_decode_gbps=gbs(zdec), zstd1_ratio=len(payload) / len(zpayload),
    )  # fmt: skip


def bench_codec(reps: int) -> list[dict]:
    """Encode, decode and a plain copy of random fp16 activations (what a split job carries)."""
    rng = np.random.default_rng(0)
    rows = []
    for label, nbytes in {**SIZES, "64MB": 64_000_000}.items():
        x = rng.standard_normal(nbytes // 2).astype(np.float16).reshape(-1, 125)  # (T, D) fp16 activations
        rows.append(_codec_row(label, x, reps if nbytes < 10_000_000 else max(3, reps // 4)))
    return rows


# -- 2. zstd on real hidden states of the cloud bundle ---------------------------------------------


def bench_zstd(bundle_dir: Path, images: int) -> list[dict]:
    import zstandard

    from msao.datasets.easyvqa import load_easy_vqa
    from msao.engines.bundle import load_bundle
    from msao.engines.generation import Generator
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions

    gen = Generator(load_bundle(bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    data = load_easy_vqa("test")
    questions = ["what color is the shape?", "what shape is in the image?", "is there a circle?"]
    by_layer: dict[int, list[bytes]] = {k: [] for k in gen.bundle.manifest.split_points}
    for i in range(images):
        enc = gen.encode_image(gen.pixels_from_bytes(data.image_pngs[i]))
        prefix, suffix = gen.prompt_ids(questions[i % len(questions)])
        emb = gen.runners["text_embed"].infer({"input_ids": np.concatenate([prefix, suffix])[None]})["embeddings"]
        hidden = np.concatenate([emb[:, : len(prefix)], enc.tokens[None], emb[:, len(prefix) :]], axis=1)
        pos = np.arange(hidden.shape[1], dtype=np.int64)[None]
        for k in by_layer:
            stack = gen.stack(k)
            stack.reset()
            h = stack.run(hidden, pos, np.ones((1, hidden.shape[1]), np.int64))
            by_layer[k].append(payload_from_tensors({"hidden_states": h.astype(np.float16)}))
    gen.close()
    rows = []
    for k, bodies in by_layer.items():
        raw = sum(len(b) for b in bodies)
        for level in (1, 3, 9):
            cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
            comp = [cctx.compress(b) for b in bodies]
            tc = np.median(_time(lambda: [cctx.compress(b) for b in bodies], 5))  # noqa: B023
            td = np.median(_time(lambda: [dctx.decompress(c) for c in comp], 5))  # noqa: B023
            rows.append(
                dict(
                    layer=k, level=level, payloads=len(bodies), mean_payload_bytes=raw / len(bodies),
                    ratio=raw / sum(len(c) for c in comp), compress_mbps=raw / tc / 1e6, decompress_mbps=raw / td / 1e6,
                )
            )  # fmt: skip
    return rows


# -- 3. loopback round trips -------------------------------------------------------------------------


_RESPONDER = """
import socket, sys
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
c.on_socket_open = lambda cl, ud, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def reply(cl, ud, m):
    p = Properties(PacketTypes.PUBLISH)
    p.CorrelationData = m.properties.CorrelationData
    cl.publish(m.properties.ResponseTopic, b"ok", qos=1, properties=p)
c.on_message = reply
c.connect("127.0.0.1", int(sys.argv[1]))
c.subscribe("bench/request", 1)
c.loop_start()
import time; time.sleep(0.5); print("ready", flush=True)
while True: time.sleep(3600)
"""


def _request_response(port: int, reps: int) -> list[dict]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    got: queue.Queue = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, ud, m: got.put(m)
    c.on_socket_open = lambda cl, ud, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe("bench/response", 1)
    time.sleep(0.3)
    rows = []
    for label, nbytes in SIZES.items():
        data = os.urandom(nbytes)
        n = reps if nbytes < 10_000_000 else max(5, reps // 5)
        ts = []
        for i in range(n + 3):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = "bench/response", str(i).encode()
            t0 = time.perf_counter()
            c.publish("bench/request", data, qos=1, properties=props)
            got.get(timeout=30)
            if i >= 3:
                ts.append((time.perf_counter() - t0) * 1e3)
        rows.append(dict(size=label, bytes=nbytes, n=n, p50_ms=_pct(ts, 50), p95_ms=_pct(ts, 95)))
    c.loop_stop()
    return rows


def bench_round_trips(bundle_dir: Path, reps: int) -> dict:
    from msao.cloud_bridge.link import CloudLink, LinkOptions
    from msao.cloud_bridge.mqtt_options import ClientOptions
    from msao.engines.bundle import load_bundle

    model_hash = load_bundle(bundle_dir).manifest.model_hash
    tmp = Path(tempfile.mkdtemp(prefix="msao-bench-"))
    broker = start_broker(tmp / "broker")
    port, url = broker.port, broker.url
    worker = CloudWorker("bench-w1", bundle_dir, url, tmp / "worker.log", extra=("--max-payload-mb", "64"), verbosity="-v")
    out: dict = {"job_probe": [], "paho_self_echo": [], "mosquitto_rr": []}
    try:
        link = CloudLink(LinkOptions("bench-edge", ClientOptions(url, "msao-bench-edge"))).start()
        link.wait_for_workers(model_hash, 1, 60)
        for label, nbytes in SIZES.items():
            n = reps if nbytes < 10_000_000 else max(5, reps // 5)
            walls, rtts, chunks = [], [], 0
            for i in range(n + 3):
                t0 = time.perf_counter()
                s = link.probe(model_hash, nbytes, deadline_s=30)
                if i >= 3:
                    walls.append((time.perf_counter() - t0) * 1e3)
                    rtts.append(s.rtt_ms)
                    chunks = s.chunks_up
            out["job_probe"].append(
                dict(
                    size=label,
                    bytes=nbytes,
                    n=n,
                    chunks=chunks,
                    p50_ms=_pct(walls, 50),
                    p95_ms=_pct(walls, 95),
                    wire_rtt_p50_ms=_pct(rtts, 50),
                )
            )
        link.close()

        # floor 1: bare MQTT 5 request/response with the same library and topology as a job (requester ->
        # broker -> responder process -> broker -> requester), without msao's codec, chunking or worker
        responder = ManagedProcess([sys.executable, "-c", _RESPONDER, str(port)], tmp / "responder.log", name="responder")
        if not responder.wait_for_log("ready", 30):
            raise responder.failure("did not subscribe")
        out["paho_request_response"] = _request_response(port, reps)
        responder.stop(10)

        # floor 2: a raw paho client publishing to a topic it subscribes to (no codec, no worker; the
        # broker forwards the whole payload back, so twice the bytes of a probe)
        got: queue.Queue = queue.Queue()
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_message = lambda cl, ud, m: got.put(m)
        c.on_socket_open = lambda cl, ud, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.subscribe("bench/echo", 1)
        time.sleep(0.3)
        for label, nbytes in SIZES.items():
            data = os.urandom(nbytes)
            n = reps if nbytes < 10_000_000 else max(5, reps // 5)
            ts = []
            for i in range(n + 3):
                t0 = time.perf_counter()
                c.publish("bench/echo", data, qos=1)
                got.get(timeout=30)
                if i >= 3:
                    ts.append((time.perf_counter() - t0) * 1e3)
            out["paho_self_echo"].append(dict(size=label, bytes=nbytes, n=n, p50_ms=_pct(ts, 50), p95_ms=_pct(ts, 95)))
        c.loop_stop()

        # floor 3: mosquitto_rr (a new process per request: connect + subscribe + publish + receive).
        # mosquitto_rr 2.0.11 sends 0 bytes with -f/-s, and Linux caps one argv string at 128 KiB, so
        # only payloads that fit -m are measured.
        for label, nbytes in {"0B": 0, **SIZES}.items():
            if nbytes > 128 * 1024 - 1:
                out["mosquitto_rr"].append(dict(size=label, bytes=nbytes, skipped="mosquitto_rr cannot send it (see docstring)"))
                continue
            msg = "a" * nbytes
            cmd = [
                "mosquitto_rr",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-t",
                "bench/rr",
                "-e",
                "bench/rr",
                "-q",
                "1",
                "--nodelay",
                "-W",
                "10",
                "-N",
                "-m",
                msg,
            ]
            ts = _time(lambda: subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True), reps)  # noqa: B023
            out["mosquitto_rr"].append(dict(size=label, bytes=nbytes, n=reps, p50_ms=_pct(ts, 50) * 1e3, p95_ms=_pct(ts, 95) * 1e3))
    finally:
        worker.stop(20)
        broker.stop()
    return out


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |\n" for r in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="bundles/msao-tiny-cloud", help="cloud bundle: hidden states for zstd, the worker's model")
    p.add_argument("--out", default="bench/results/cloud_bridge.json", help="JSON results file")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per point (fewer for 10 MB)")
    p.add_argument("--images", type=int, default=60, help="easy-VQA test images whose hidden states feed the zstd numbers")
    args = p.parse_args()
    load_start = os.getloadavg()
    t0 = time.time()
    result = {
        "command": "make bench-bridge",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.machine(),
            "python": platform.python_version(),
        },
        "codec": bench_codec(args.reps),
        "zstd_hidden_states": bench_zstd(Path(args.bundle), args.images),
        "round_trips": bench_round_trips(Path(args.bundle), args.reps),
    }
    result["machine"]["loadavg_start"] = load_start
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"machine: {result['machine']}\n")
    print(
        _table(
            result["codec"],
            [
                "size",
                "encode_gbps",
                "decode_gbps",
                "encode_decode_gbps",
                "memcpy_gbps",
                "zstd1_encode_gbps",
                "zstd1_decode_gbps",
                "zstd1_ratio",
            ],
        )
    )
    print(
        _table(
            result["zstd_hidden_states"], ["layer", "level", "payloads", "mean_payload_bytes", "ratio", "compress_mbps", "decompress_mbps"]
        )
    )
    rt = result["round_trips"]
    print(_table(rt["job_probe"], ["size", "n", "chunks", "p50_ms", "p95_ms", "wire_rtt_p50_ms"]))
    print(_table(rt["paho_request_response"], ["size", "n", "p50_ms", "p95_ms"]))
    print(_table(rt["paho_self_echo"], ["size", "n", "p50_ms", "p95_ms"]))
    print(_table(rt["mosquitto_rr"], ["size", "n", "p50_ms", "p95_ms", "skipped"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
