"""Per-segment latency profiles: measured, not assumed, on the machine that will run them.

The scheduler prices plans from these points (segment × batch × new tokens × past length),
interpolating in between; the exporter records one profile for the export machine and
``msao profile`` (later) adds one per device.
"""

from __future__ import annotations

import datetime as dt
import platform
import time

import numpy as np

from msao.engines.backend import Backend
from msao.engines.bundle import Bundle
from msao.engines.manifest import LatencyProfile, ProfilePoint, SegmentSpec

__all__ = ["device_name", "profile_bundle", "synthetic_feeds", "TEXT_TOKENS"]

TEXT_TOKENS = 16  # typical prompt text around the image (template + a short question)


def synthetic_feeds(
    spec: SegmentSpec, *, batch: int, seq: int, past: int, vocab: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Valid random feeds for ``spec`` at the given sizes: for timing, tracing and FLOP counts.

    Position ids continue after the past, the attention mask is all ones, ids are in the
    vocabulary, floats are standard normal.
    """
    sizes = {"batch": batch, "seq": seq, "past": past}
    feeds = {}
    for t in spec.inputs:
        shape = tuple(d if isinstance(d, int) else sum(sizes[p] for p in d.split("+")) for d in t.shape)
        if t.name == "position_ids":
            feeds[t.name] = np.ascontiguousarray(np.broadcast_to(np.arange(past, past + seq), shape)).astype(np.int64)
        elif t.name == "attention_mask":
            feeds[t.name] = np.ones(shape, np.int64)
        elif t.dtype == "int64":
            feeds[t.name] = rng.integers(0, vocab, shape).astype(np.int64)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def profile_bundle(bundle: Bundle, backend: Backend, repeats: int = 20, warmup: int = 3) -> LatencyProfile:
    """Time every segment at the shapes requests produce (batch 1).

    Decoder chunks are timed at prefill lengths for 100 %, 50 %, 25 % and 0 % of the image
    tokens kept, and for a decode step after a full prefill.
    """
    m = bundle.manifest
    n, text = m.model.image_tokens, TEXT_TOKENS
    rng = np.random.default_rng(0)
    shapes: dict[str, list[tuple[int, int]]] = {}
    for s in m.segments:
        if s.kind == "decoder":
            shapes[s.name] = [(text + n * q // 4, 0) for q in (4, 2, 1, 0)] + [(1, n + text)]
        elif s.kind == "text_embed":
            shapes[s.name] = [(text, 0), (1, 0)]
        elif s.kind in ("lm_head", "exit_head"):
            shapes[s.name] = [(1, 0)]
        else:
            shapes[s.name] = [(0, 0)]
    points = []
    for s in m.segments:
        with backend.open(bundle, s) as runner:
            for seq, past in shapes[s.name]:
                feeds = synthetic_feeds(s, batch=1, seq=seq, past=past, vocab=m.model.vocab_size, rng=rng)
                times = []
                for i in range(warmup + repeats):
                    t0 = time.perf_counter()
                    runner.infer(feeds)
                    if i >= warmup:
                        times.append((time.perf_counter() - t0) * 1e3)
                points.append(
                    ProfilePoint(s.name, 1, seq, past, round(float(np.median(times)), 4), round(float(np.percentile(times, 90)), 4))
                )
    return LatencyProfile(
        device=device_name(),
        backend=backend.describe(),
        threads=getattr(getattr(backend, "options", None), "threads", 0),
        measured_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        points=tuple(points),
    )


def device_name() -> str:
    """'NVIDIA Jetson AGX Orin ...' on a Jetson (device tree), else 'x86_64 CPU, 2 cores'."""
    import os

    try:
        with open("/proc/device-tree/model", "rb") as f:
            model = f.read().rstrip(b"\x00").decode(errors="replace").strip()
        if model:
            return model
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return f"{platform.machine()} CPU, {cores} cores"
