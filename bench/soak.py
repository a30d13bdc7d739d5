"""The soak: a paper-regime fleet at a steady rate for hours, a broker restart and a worker crash along the way.

    make soak                                   # 120 minutes (not in CI)
    python -m bench.soak --minutes 10 --sample-s 20    # a quick look

Four edge daemons (``--large-on-edge false``, dilated per kind of work as an Orin NX) share one
cloud worker over a shaped lte link; each gets Poisson arrivals at a steady rate for the whole
run. A third of the way in the broker restarts (no state survives); two thirds in the worker is
SIGKILLed and, after ``--worker-down-s``, a fresh one takes its place, as a supervisor would.
Every ``--sample-s`` the RSS, open file descriptors and thread count of every process (edges,
worker, broker, and this client with the shaping proxy) are sampled, with the window's answers.

**Pass** = nothing lost (every request answered, ok or with an error the client can act on)
and no growth after warm-up: per process, since its last start and past the warm-up, the
median of the last third of the samples stays within 10 % (+ 8 MiB) of the first third's for
RSS, and within max(4, 10 %) for descriptors and threads. The client is sampled but not judged:
it keeps every outcome, so it grows by design. Writes JSON and a PNG (bench/results/soak.*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.cells import Item, ask_or_connection_error, dilation_factors, poisson_times
from bench.fleet import EDGE_ARGS
from bench.run import ORIN_PROFILE, PAPER_POLICIES, ROOT, workload
from testbed import PROFILES, Stack, process_resources

__all__ = ["SoakConfig", "run_soak", "trend"]

RSS_SLACK_BYTES = 8 * 2**20
RELATIVE_SLACK = 0.10
COUNT_SLACK = 4


@dataclass(frozen=True)
class SoakConfig:
    """One soak run (the results JSON records it whole).

    Attributes:
        minutes / sample_s: how long, and how often every process is sampled.
        rate_per_edge: Poisson requests per second offered to each edge, steady.
        broker_restart_at / worker_kill_at: when, as fractions of the run (None: not at all).
        worker_down_s: how long the cloud stays gone after the kill, before its replacement starts.
        warmup_minutes: samples this soon after a process (re)started are not judged (caches fill).
    """

    minutes: float = 120.0
    sample_s: float = 60.0
    edges: int = 4
    rate_per_edge: float = 2.0
    policy: str = "msao"
    link: str = "lte"
    dilation_profile: str = str(ROOT / ORIN_PROFILE)
    edge_bundle: Path = ROOT / "bundles" / "msao-scenes-edge"
    cloud_bundle: Path = ROOT / "bundles" / "msao-scenes-cloud"
    calibration: Path | None = ROOT / "bundles" / "calibration-scenes.json"
    dataset: str = "scenes"
    broker_restart_at: float | None = 1 / 3
    worker_kill_at: float | None = 2 / 3
    worker_down_s: float = 10.0
    warmup_minutes: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.sample_s <= 0 or self.rate_per_edge <= 0 or self.edges < 1:
            raise ValueError("minutes, sample_s and rate_per_edge must be positive and edges >= 1")
        if self.policy not in PAPER_POLICIES:
            raise ValueError(f"policy {self.policy!r}: one of {list(PAPER_POLICIES)} (the edges hold only the small model)")
        if self.link not in PROFILES:
            raise ValueError(f"link {self.link!r}: one of {sorted(PROFILES)}")
        for at in (self.broker_restart_at, self.worker_kill_at):
            if at is not None and not 0 < at < 1:
                raise ValueError("broker_restart_at and worker_kill_at are fractions of the run, between 0 and 1")


def trend(samples: list[tuple[float, float]], slack: float) -> dict:
    """Whether a series grows: the median of its last third against its first third's, within 10 % + ``slack``.

    Medians of thirds, not a fitted slope alone, so one spike (a burst of requests, a GC pause)
    neither hides a leak nor invents one; the least-squares slope per hour is reported beside.
    """
    if len(samples) < 3:
        return {"judged": False, "why": f"{len(samples)} samples after warm-up (3 needed)"}
    t = np.array([s[0] for s in samples])
    v = np.array([s[1] for s in samples], dtype=float)
    third = max(1, len(v) // 3)
    early, late = float(np.median(v[:third])), float(np.median(v[-third:]))
    bound = early * (1 + RELATIVE_SLACK) + slack
    slope = float(np.polyfit(t, v, 1)[0]) * 60 if len(set(t)) > 1 else 0.0
    return {"judged": True, "early": early, "late": late, "bound": round(bound, 1), "slope_per_hour": round(slope, 3), "ok": late <= bound}


class _Driver(threading.Thread):
    """Sends the whole schedule, each request on its own thread, and keeps a compact outcome of each."""

    def __init__(self, schedule: list[tuple[float, int, object, Item]], policy: str):
        super().__init__(name="soak-driver", daemon=True)
        self.schedule, self.policy = schedule, policy
        self.outcomes: list[dict] = []
        self.sent = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.start_time = 0.0

    def run(self) -> None:
        self.start_time = time.perf_counter()
        for t, edge, daemon, item in self.schedule:
            wait = self.start_time + t - time.perf_counter()
            if wait > 0 and self.stopping.wait(wait):
                return
            self.sent += 1
            threading.Thread(target=self._one, args=(t, edge, daemon, item), daemon=True).start()

    def _one(self, t: float, edge: int, daemon, item: Item) -> None:
        ms, status, m = ask_or_connection_error(daemon, item, {"policy": self.policy, "deadline_ms": 20_000}, timeout_s=60.0)
        outcome = {
            "t_s": round(t, 3), "edge": edge, "ms": round(ms, 1), "ok": status == 200 and m.get("status") == "ok",
            "error_code": m.get("error_code", ""), "answered_by": m.get("answered_by", ""), "fallback": bool(m.get("fallback")),
            "correct": m.get("answer") == item.truth,
        }  # fmt: skip
        with self.lock:
            self.outcomes.append(outcome)


def _sample(processes: dict[str, int]) -> dict[str, dict]:
    out = {}
    for role, pid in processes.items():
        try:
            r = process_resources(pid)
        except OSError:
            continue  # between a kill and its replacement
        out[role] = {"pid": pid, "rss_mb": round(r.rss_bytes / 2**20, 2), "fds": r.open_fds, "threads": r.threads}
    return out


def run_soak(config: SoakConfig, work: Path) -> dict:
    """The run: start the fleet, drive it, sample it, break it twice, judge it."""
    c = config
    duration_s = 60.0 * c.minutes
    items = workload(2000, c.seed, c.dataset)
    events: list[dict] = []
    samples: list[dict] = []
    with Stack(work, c.edge_bundle, c.cloud_bundle, c.calibration, workers=1, edge_share=None, edge_dilation=None,
               edge_dilation_profile=c.dilation_profile) as stack:  # fmt: skip
        stack.shape(PROFILES[c.link])
        daemons = [stack.start_edge(f"soak-{i}", c.policy, EDGE_ARGS) for i in range(c.edges)]
        schedule = sorted(
            ((t, e, d, items[(n * c.edges + e) % len(items)]) for e, d in enumerate(daemons)
             for n, t in enumerate(poisson_times(c.rate_per_edge, duration_s, c.seed + e))),
            key=lambda s: s[0],
        )  # fmt: skip
        faults = sorted(
            [(c.broker_restart_at * duration_s, "broker restart")] * (c.broker_restart_at is not None)
            + [(c.worker_kill_at * duration_s, "worker kill")] * (c.worker_kill_at is not None)
        )  # fmt: skip
        assert stack.broker is not None
        driver = _Driver(schedule, c.policy)
        driver.start()
        seen = 0
        try:
            next_sample = 0.0
            while True:
                now = time.perf_counter() - driver.start_time
                if faults and now >= faults[0][0]:
                    _, what = faults.pop(0)
                    t0 = time.perf_counter()
                    if what == "broker restart":
                        stack.broker.restart()
                    else:
                        stack.workers[0].kill()
                        time.sleep(c.worker_down_s)
                        stack.replace_worker(0)
                    events.append({"t_min": round(now / 60, 3), "what": what, "took_s": round(time.perf_counter() - t0, 2)})
                    print(f"  {now / 60:.1f} min: {what}", file=sys.stderr, flush=True)
                    continue
                if now >= next_sample:
                    processes = {f"edge-{i}": d.pid for i, d in enumerate(daemons)}
                    processes |= {"worker": stack.workers[0].pid, "broker": stack.broker.process.pid, "client": os.getpid()}
                    with driver.lock:
                        window = driver.outcomes[seen:]
                        seen = len(driver.outcomes)
                    ms = [o["ms"] for o in window if o["ok"]]
                    samples.append({
                        "t_min": round(now / 60, 3), "processes": _sample(processes), "answered": len(window), "ok": len(ms),
                        "p50_ms": round(float(np.median(ms)), 1) if ms else None, "p95_ms": round(float(np.percentile(ms, 95)), 1) if ms else None,
                        "by_cloud": round(sum(o["answered_by"] == "cloud" for o in window) / max(1, len(window)), 3),
                    })  # fmt: skip
                    s = samples[-1]
                    print(f"  {now / 60:.1f} min: {s['answered']} answered (p95 {s['p95_ms']} ms, by cloud {s['by_cloud']}), "
                          f"edge-0 RSS {s['processes'].get('edge-0', {}).get('rss_mb')} MB", file=sys.stderr, flush=True)  # fmt: skip
                    next_sample += c.sample_s
                if now >= duration_s and not driver.is_alive():
                    break
                time.sleep(min(0.5, max(0.01, min(next_sample, faults[0][0] if faults else next_sample) - now)))
            deadline = time.monotonic() + 90.0  # the last requests' answers (a 20 s deadline each, a 60 s client timeout)
            while time.monotonic() < deadline:
                with driver.lock:
                    if len(driver.outcomes) >= driver.sent:
                        break
                time.sleep(0.2)
        finally:
            driver.stopping.set()
            for d in daemons:
                stack.stop_edge(d)
    return _verdict(c, driver, samples, events)


def _verdict(c: SoakConfig, driver: _Driver, samples: list[dict], events: list[dict]) -> dict:
    with driver.lock:
        outcomes = list(driver.outcomes)
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o["ok"]:
            errors[o["error_code"] or "?"] = errors.get(o["error_code"] or "?", 0) + 1
    lost = driver.sent - len(outcomes) + errors.get("connection", 0)
    judged: dict[str, dict] = {}
    roles = sorted({r for s in samples for r in s["processes"]} - {"client"})
    for role in roles:
        series = [(s["t_min"], s["processes"][role]) for s in samples if role in s["processes"]]
        last_pid = series[-1][1]["pid"]
        started = min(t for t, p in series if p["pid"] == last_pid)  # since its last (re)start
        settled = [(t, p) for t, p in series if p["pid"] == last_pid and t >= started + min(c.warmup_minutes, c.minutes / 4)]
        judged[role] = {
            "rss_mb": trend([(t, p["rss_mb"]) for t, p in settled], RSS_SLACK_BYTES / 2**20),
            "fds": trend([(t, p["fds"]) for t, p in settled], COUNT_SLACK),
            "threads": trend([(t, p["threads"]) for t, p in settled], COUNT_SLACK),
        }
    growth = sorted(f"{role} {what}" for role, j in judged.items() for what, v in j.items() if v["judged"] and not v["ok"])
    ms = [o["ms"] for o in outcomes if o["ok"]]
    return {
        "benchmark": "soak", "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items()},
        "regime": "paper", "dilation": dilation_factors(1.0, c.dilation_profile), "edges": c.edges, "workers": 1,
        "sent": driver.sent, "answered_ok": sum(o["ok"] for o in outcomes), "answered_error": errors, "lost": lost,
        "accuracy": round(sum(o["correct"] for o in outcomes) / max(1, driver.sent), 4),
        "fallbacks": sum(o["fallback"] for o in outcomes),
        "p50_ms": round(float(np.median(ms)), 1) if ms else None, "p95_ms": round(float(np.percentile(ms, 95)), 1) if ms else None,
        "events": events, "samples": samples, "trend": judged, "growth": growth, "passed": lost == 0 and not growth,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    roles = sorted({r for s in samples for r in s["processes"]})
    for ax, key, label in zip(axes, ("rss_mb", "fds", "threads"), ("resident memory (MB)", "open file descriptors", "threads")):
        for j, role in enumerate(roles):
            pts = [(s["t_min"], s["processes"][role]) for s in samples if role in s["processes"]]
            runs: list[list] = []  # one line per process: a restarted one (a new pid) starts a new line
            for t, proc in pts:
                if not runs or runs[-1][-1][1]["pid"] != proc["pid"]:
                    runs.append([])
                runs[-1].append((t, proc))
            for k, run in enumerate(runs):
                ax.plot([t for t, _ in run], [p[key] for _, p in run], marker=".", color=f"C{j}", label=role if k == 0 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(ncol=len(roles), fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    t = [s["t_min"] for s in samples]
    axes[3].plot(t, [s["p50_ms"] for s in samples], marker=".", label="p50")
    axes[3].plot(t, [s["p95_ms"] for s in samples], marker=".", label="p95")
    axes[3].set_ylabel("latency per window (ms)")
    axes[3].set_xlabel("minutes")
    axes[3].legend(fontsize=9)
    axes[3].grid(alpha=0.3)
    for ax in axes:
        for e in result["events"]:
            ax.axvline(e["t_min"], color="grey", linestyle="--", linewidth=1)
    for e in result["events"]:
        axes[3].annotate(e["what"], (e["t_min"], 0.98), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=9)
    verdict = "passed" if result["passed"] else "FAILED: " + ", ".join(result["growth"] + ([f"{result['lost']} lost"] if result["lost"] else []))
    axes[0].set_title(f"soak: {result['edges']} edges x 1 worker, {result['config']['link']}, {result['sent']} requests, {verdict}", pad=28)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=120.0)
    ap.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples of every process")
    ap.add_argument("--edges", type=int, default=4)
    ap.add_argument("--rate", type=float, default=2.0, help="requests per second to each edge")
    ap.add_argument("--policy", default="msao")
    ap.add_argument("--link", default="lte")
    ap.add_argument("--worker-down-s", type=float, default=10.0)
    ap.add_argument("--warmup-minutes", type=float, default=10.0, help="samples this soon after a process started are not judged")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    a = ap.parse_args(argv)
    try:
        config = SoakConfig(a.minutes, a.sample_s, a.edges, a.rate, a.policy, a.link, worker_down_s=a.worker_down_s,
                            warmup_minutes=a.warmup_minutes)  # fmt: skip
    except ValueError as exc:
        ap.error(str(exc))
    if config.calibration is not None and not config.calibration.exists():
        ap.error(f"no calibration at {config.calibration}: run `make bundles/calibration-scenes.json`")
    result = run_soak(config, a.out.parent / (a.out.stem + "-work"))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    plot(result, a.out.with_suffix(".png"))
    print(f"soak: {result['sent']} sent, {result['answered_ok']} ok, errors {result['answered_error']}, lost {result['lost']}; "
          f"growth: {', '.join(result['growth']) or 'none'}; {'PASSED' if result['passed'] else 'FAILED'}")  # fmt: skip
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
