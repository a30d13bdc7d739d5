"""One benchmark cell: a policy under a link profile, driven over the edge daemon's HTTP API.

Closed loop (one request at a time, the latency a camera sees) for latency, accuracy, bytes,
FLOPs and CPU; open loop (Poisson arrivals at a rate) for throughput. Every request goes
through the same daemon code and plan interface; only ``msao.policy`` differs.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from msao.edge_runtime.dilation import Dilation
from testbed import EdgeDaemon, cpu_seconds, peak_rss_bytes

__all__ = [
    "Item", "ask", "ask_or_connection_error", "closed_loop", "dilation_factors", "dilation_label", "fire_at", "open_loop", "poisson_times",
]  # fmt: skip


@dataclass(frozen=True)
class Item:
    """One request of a workload."""

    index: int
    question: str
    truth: str
    png: bytes
    stream: str | None = None


def ask(daemon: EdgeDaemon, item: Item, fields: dict, timeout_s: float = 60.0) -> tuple[float, int, dict]:
    """POST one chat completion; (client latency ms, HTTP status, the ``msao`` response or the error)."""
    url = "data:image/png;base64," + base64.b64encode(item.png).decode("ascii")
    msao = {"deadline_ms": 20_000, **fields}
    if item.stream:
        msao["stream"] = item.stream
    body = json.dumps({"model": "msao", "messages": [{"role": "user", "content": [
        {"type": "text", "text": item.question}, {"type": "image_url", "image_url": {"url": url}}]}], "msao": msao})  # fmt: skip
    c = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=timeout_s)
    t0 = time.perf_counter()
    try:
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        out = json.loads(r.read())
        ms = (time.perf_counter() - t0) * 1e3
    finally:
        c.close()
    return ms, r.status, out.get("msao") or {"status": "error", "error_code": str(r.status), "error": json.dumps(out)[:300]}


def ask_or_connection_error(daemon: EdgeDaemon, item: Item, fields: dict, timeout_s: float = 60.0) -> tuple[float, int, dict]:
    """``ask``, with a request that never reached the daemon (its connection failed) as an answer of ``error_code`` ``connection``.

    What the load tests count as lost: the daemon answered nothing, not even an error.
    """
    try:
        return ask(daemon, item, fields, timeout_s)
    except OSError as exc:
        return 0.0, 0, {"status": "error", "error_code": "connection", "error": str(exc)}


def _record(item: Item, ms: float, status: int, m: dict) -> dict:
    timings = m.get("timings_ms", {}) or {}
    return {
        "index": item.index, "truth": item.truth, "answer": m.get("answer", ""), "correct": m.get("answer") == item.truth,
        "http_status": status, "status": m.get("status", "error"), "error_code": m.get("error_code", ""),
        "latency_ms": round(ms, 3), "daemon_ms": timings.get("total", 0.0), "mas_ms": timings.get("mas", 0.0),
        "plan": m.get("plan", ""), "answered_by": m.get("answered_by", ""), "fallback": bool(m.get("fallback")),
        "bytes_up": m.get("bytes_up", 0), "bytes_down": m.get("bytes_down", 0),
        "flops_edge": m.get("flops_edge", 0), "flops_cloud": m.get("flops_cloud", 0),
        "kept_tokens": (m.get("mas") or {}).get("kept_tokens"), "encoder_skipped": bool((m.get("mas") or {}).get("encoder_skipped")),
    }  # fmt: skip


def closed_loop(daemon: EdgeDaemon, items: list[Item], fields: dict, cloud_cpu, warmup: int = 5, progress=None) -> dict:
    """Ask ``items`` one after another; per-request records and the cell's CPU and memory."""
    for item in items[:warmup]:  # the daemon's first answers teach its estimates; not measured
        ask(daemon, item, fields)
    edge0, cloud0 = cpu_seconds(daemon.pid), cloud_cpu()
    records = []
    t0 = time.perf_counter()
    for n, item in enumerate(items):
        ms, status, m = ask(daemon, item, fields)
        records.append(_record(item, ms, status, m))
        if progress is not None:
            progress(n + 1, len(items))
    wall = time.perf_counter() - t0
    return {
        "records": records,
        "wall_s": round(wall, 3),
        "edge_cpu_s": round(cpu_seconds(daemon.pid) - edge0, 4),
        "cloud_cpu_s": round(cloud_cpu() - cloud0, 4),
        "edge_peak_rss_bytes": peak_rss_bytes(daemon.pid),
    }


def poisson_times(rate_per_s: float, duration_s: float, seed: int = 0) -> list[float]:
    """Arrival times (s from the start) of a Poisson process at ``rate_per_s`` within ``duration_s``."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_per_s, size=int(rate_per_s * duration_s * 2) + 10)
    times = np.cumsum(gaps)
    return [float(t) for t in times[times <= duration_s]]


def fire_at(
    schedule: list[tuple[float, EdgeDaemon, Item]], fields: dict, timeout_s: float = 60.0, items: list[Item] | None = None
) -> tuple[list[tuple[float, int, dict]], float]:
    """Send each ``(t, daemon, item)`` at ``t`` s from now, each on its own thread, whatever the answers take.

    Returns every result ``ask`` gave, in the order they came (a request whose connection failed
    gets ``error_code`` ``connection``; one whose thread never finished has no result), and the
    elapsed seconds. ``items``: filled with each result's item, in the same order.
    """
    results: list[tuple[float, int, dict]] = []
    lock = threading.Lock()

    def fire(daemon: EdgeDaemon, item: Item) -> None:
        out = ask_or_connection_error(daemon, item, fields, timeout_s)
        with lock:
            results.append(out)
            if items is not None:
                items.append(item)

    threads = []
    start = time.perf_counter()
    for t, daemon, item in sorted(schedule, key=lambda s: s[0]):
        wait = start + t - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        th = threading.Thread(target=fire, args=(daemon, item), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join(60)
    return results, time.perf_counter() - start


def open_loop(daemon: EdgeDaemon, items: list[Item], fields: dict, rate_per_s: float, duration_s: float, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate_per_s`` for ``duration_s``; completed throughput and latency percentiles."""
    schedule = [(t, daemon, items[n % len(items)]) for n, t in enumerate(poisson_times(rate_per_s, duration_s, seed))]
    results, elapsed = fire_at(schedule, {**fields, "deadline_ms": 10_000})
    elapsed = max(duration_s, elapsed)
    ok = [ms for ms, status, m in results if status == 200 and m.get("status") == "ok"]
    return {
        "rate_per_s": rate_per_s,
        "offered": len(schedule),
        "completed_ok": len(ok),
        "busy": sum(1 for _, _, m in results if m.get("error_code") == "busy"),
        "throughput_per_s": round(len(ok) / elapsed, 3),
        "latency_ms_p50": round(float(np.percentile(ok, 50)), 3) if ok else None,
        "latency_ms_p95": round(float(np.percentile(ok, 95)), 3) if ok else None,
    }


def dilation_factors(factor: float, profile: str) -> dict[str, float]:
    """The emulated edge's factor per kind of work, for a results file: the device profile's, else ``factor`` for every kind."""
    return asdict(Dilation.load(profile) if profile else Dilation.uniform(factor))


def dilation_label(result: dict) -> str:
    """How slow a result's edge was, for its table and plot: ``x15``, or the profile's name and its factors."""
    if result.get("edge_dilation_profile"):
        return Path(result["edge_dilation_profile"]).stem + ": " + ", ".join(f"{k} x{v:g}" for k, v in result["dilation"].items())
    return f"x{result['edge_dilation']:g}"
