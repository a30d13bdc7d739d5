"""Load held by a small fleet on loopback: several edge daemons, several cloud workers, one broker.

Two parts, both on real processes (``make bench-load``):

1. **Hold**: ``edges`` daemons x ``workers`` cloud workers; each daemon receives Poisson arrivals
   at ``rate_per_edge`` over its HTTP API for ``duration_s``, every request offloaded
   (``cloud_only``: the broker and the workers carry all of it). Reported: requests sent,
   answered ok, answered with an explicit error (``busy``, ``deadline``), and *lost* (no answer
   at all: must be 0); p50/p99 latency; CPU seconds per second of the broker, the workers and
   the daemons.
2. **Scaling**: the same fleet saturated (closed loop, many requests in flight) with 1, 2, ...
   workers: cloud answers per second, which the shared subscription should raise with each
   worker until the machine's cores are the limit (on a 2-core machine, soon).

Nothing here is throttled: the point is the message path and the workers, not the edge.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.cells import Item, ask, fire_at, poisson_times
from bench.run import workload
from testbed import EdgeDaemon, Stack, cpu_seconds

__all__ = ["hold_load", "scale_workers"]

ROOT = Path(__file__).resolve().parents[1]


def _edges(stack: Stack, count: int) -> list[EdgeDaemon]:
    """``count`` daemons, once every worker of ``stack`` is serving (a scaling point needs them all)."""
    end = time.monotonic() + 120
    logs = [stack.work / f"cloud-{i}.log" for i in range(len(stack.workers))]
    while not all(p.exists() and " serving " in p.read_text(errors="replace") for p in logs):
        if time.monotonic() > end:
            raise RuntimeError(f"cloud workers not serving after 120 s; see {logs}")
        time.sleep(0.2)
    extra = ("--workers", "4", "--queue-size", "64")
    return [stack.start_edge(f"load-{i}", "cloud_only", extra) for i in range(count)]


def _fleet_cpu(stack: Stack, edges: list[EdgeDaemon]) -> dict[str, float]:
    return {
        "broker": stack.broker_cpu_seconds(),
        "workers": stack.cloud_cpu_seconds(),
        "edges": sum(cpu_seconds(e.pid) for e in edges),
    }


def hold_load(stack: Stack, edges: list[EdgeDaemon], items: list[Item], rate_per_edge: float, duration_s: float, seed: int = 0) -> dict:
    """Poisson arrivals at every edge for ``duration_s``; every request accounted for."""
    schedule = [
        (t, edge, items[(n * 7 + e) % len(items)])
        for e, edge in enumerate(edges)
        for n, t in enumerate(poisson_times(rate_per_edge, duration_s, seed + e))
    ]
    cpu0 = _fleet_cpu(stack, edges)
    results, elapsed = fire_at(schedule, {"policy": "cloud_only", "deadline_ms": 10_000}, timeout_s=30.0)
    cpu1 = _fleet_cpu(stack, edges)
    ok = [ms for ms, status, m in results if status == 200 and m.get("status") == "ok"]
    answered = [m for _, status, m in results if m.get("error_code") != "connection"]
    errors: dict[str, int] = {}
    for m in answered:
        if m.get("status") != "ok":
            errors[m.get("error_code", "?")] = errors.get(m.get("error_code", "?"), 0) + 1
    return {
        "edges": len(edges),
        "workers": len(stack.workers),
        "rate_per_s": round(rate_per_edge * len(edges), 3),
        "duration_s": round(elapsed, 2),
        "sent": len(schedule),
        "answered_ok": len(ok),
        "answered_error": errors,
        "lost": len(schedule) - len(answered),  # no answer at all: the connection failed or the thread never finished
        "latency_ms_p50": round(float(np.percentile(ok, 50)), 2) if ok else None,
        "latency_ms_p99": round(float(np.percentile(ok, 99)), 2) if ok else None,
        "cpu_s_per_s": {k: round((cpu1[k] - cpu0[k]) / elapsed, 3) for k in cpu0},
    }


def scale_workers(stack: Stack, edges: list[EdgeDaemon], items: list[Item], in_flight: int, duration_s: float) -> dict:
    """Closed loop with ``in_flight`` requests outstanding across the edges: cloud answers per second."""
    done: list[int] = []
    by_cloud = [0]
    stop_at = time.perf_counter() + duration_s
    lock = threading.Lock()

    def loop(k: int) -> None:
        n = k
        while time.perf_counter() < stop_at:
            edge = edges[n % len(edges)]
            try:
                _, status, m = ask(edge, items[n % len(items)], {"policy": "cloud_only", "deadline_ms": 10_000}, timeout_s=30.0)
            except OSError:
                status, m = 0, {}
            with lock:
                done.append(status)
                by_cloud[0] += status == 200 and m.get("answered_by") == "cloud"
            n += in_flight

    t0 = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(loop, range(in_flight)))
    elapsed = time.perf_counter() - t0
    return {"workers": len(stack.workers), "cloud_answers_per_s": round(by_cloud[0] / elapsed, 2), "requests": len(done)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edges", type=int, default=4)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--rate-per-edge", type=float, default=10.0, help="requests per second to each edge (Poisson)")
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--scale-duration-s", type=float, default=20.0, help="each worker count's saturation run")
    p.add_argument("--in-flight", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    args = p.parse_args()
    edge_b, cloud_b = ROOT / "bundles" / "msao-tiny-edge", ROOT / "bundles" / "msao-tiny-cloud"
    items = workload(200, seed=3)
    work = args.out.parent / (args.out.stem + "-work")
    out: dict = {"cores": os.cpu_count(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": vars(args) | {"out": str(args.out)}}
    print(f"==> hold: {args.edges} edges x {args.workers} workers, {args.rate_per_edge * args.edges:.0f} req/s for {args.duration_s:.0f} s")
    with Stack(work / "hold", edge_b, cloud_b, None, workers=args.workers, edge_share=None) as stack:
        edges = _edges(stack, args.edges)
        try:
            hold_load(stack, edges, items, args.rate_per_edge, 3.0, seed=99)  # warm-up, not reported
            out["hold"] = hold_load(stack, edges, items, args.rate_per_edge, args.duration_s)
        finally:
            for e in edges:
                e.stop()
    print(json.dumps(out["hold"], indent=1))
    out["scaling"] = []
    for w in range(1, args.workers + 1):
        print(f"==> scaling: {w} worker(s), {args.in_flight} requests in flight for {args.scale_duration_s:.0f} s")
        with Stack(work / f"scale-{w}", edge_b, cloud_b, None, workers=w, edge_share=None) as stack:
            edges = _edges(stack, args.edges)
            try:
                scale_workers(stack, edges, items, args.in_flight, 3.0)  # warm-up
                out["scaling"].append(scale_workers(stack, edges, items, args.in_flight, args.scale_duration_s))
            finally:
                for e in edges:
                    e.stop()
        print(json.dumps(out["scaling"][-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0 if out["hold"]["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
