"""The side-by-side benchmark of one regime: every policy under every link profile, through the real daemon.

    python -m bench.run --quick                    # the resident regime, fewer requests per cell (~10 min on 2 cores)
    python -m bench.run --regime paper --quick     # the paper's regime (`make bench` runs both and the fleet: bench.suite)

Two regimes (``REGIMES``): **paper**, the edge holds only the small model (``--large-on-edge
false``; the scenes pair, dilated per kind of work as an Orin NX relates to an A100, so
``static_split`` is not a candidate); **resident**, the edge holds both models (the easy-VQA
pair, the edge a quarter of a core). For each profile: shape the link, measure its real RTT
and throughput through the emulation (probe jobs to the worker), then for each policy start a
fresh slowed edge daemon, warm it, ask the same test requests (closed loop), read its CPU and
memory; then an open-loop
load test for the policies whose throughput the goals compare; then the oracle, the best
baseline and the goals. Writes ``bench/results/<date>.json`` and plots next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.cells import Item, ask, closed_loop, dilation_factors, open_loop
from bench.summary import goals_for_profile, profile_summary
from msao.edge_runtime import plans
from msao.progress import progress_bar
from testbed import PROFILES, Stack

ROOT = Path(__file__).resolve().parents[1]
POLICIES = tuple(p for p in plans.POLICIES if p != "msao") + ("msao",)  # msao last: its cells are compared with the rest


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures (the JSON records it whole).

    Attributes:
        regime: ``paper`` (the edge daemons run with ``--large-on-edge false``) or ``resident``.
        edge_bundle / cloud_bundle / calibration: names under ``bundles``.
        profiles: link profiles (``testbed.PROFILES``).
        policies: placement policies; ``static_split`` runs once per split point of the large model.
        requests: easy-VQA test requests per cell (closed loop), after ``warmup`` unmeasured ones.
        edge_share: cores the edge daemon may use (cgroup quota): the edge/cloud speed ratio;
            None = no quota.
        edge_dilation: instead of (or with) the quota, the daemon holds its compute this many
            times as long (a slower device that machine load cannot make faster or slower
            relative to the cloud; no root needed); None = its own speed.
        edge_dilation_profile: instead, one factor per kind of edge work from a device profile
            (a path relative to the repository, or absolute).
        load_profiles / load_policies / load_rates / load_seconds: the open-loop throughput test.
        stream_questions: questions of the stream workload (0 = skip), asked with stream ids.
        dataset: whose test questions and stream (easy-vqa, scenes; ``msao.datasets.vqa``).
    """

    regime: str = "resident"
    edge_bundle: str = "msao-tiny-edge"
    cloud_bundle: str = "msao-tiny-cloud"
    calibration: str = "calibration.json"
    profiles: tuple[str, ...] = tuple(PROFILES)
    policies: tuple[str, ...] = POLICIES
    requests: int = 1000
    warmup: int = 10
    edge_share: float | None = 0.25
    edge_dilation: float | None = None
    edge_dilation_profile: str = ""
    prune_ratio: float = 0.25
    load_profiles: tuple[str, ...] = ("lte", "congested")
    load_policies: tuple[str, ...] = ("cloud_only", "msao")
    load_rates: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0, 80.0)
    load_seconds: float = 20.0
    load_p95_bound_ms: float = 2000.0
    stream_questions: int = 200
    seed: int = 0
    dataset: str = "easy-vqa"
    bundles: str = "bundles"
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.regime not in REGIMES:
            raise ValueError(f"regime {self.regime!r}: one of {list(REGIMES)}")
        if self.regime == "paper" and "static_split" in self.policies:
            raise ValueError("static_split runs the large model's first layers on the edge, which the paper regime does not hold")
        if self.edge_dilation_profile and self.edge_dilation:
            raise ValueError("edge_dilation or edge_dilation_profile, not both")

    @property
    def dilation_profile_path(self) -> str:
        """The device profile as an absolute path (the daemons run elsewhere); empty without one."""
        if not self.edge_dilation_profile:
            return ""
        path = Path(self.edge_dilation_profile)
        return str(path if path.is_absolute() else ROOT / path)

    @property
    def dilation(self) -> dict[str, float]:
        """The emulated edge's factor per kind of work (1 everywhere under a quota alone)."""
        return dilation_factors(self.edge_dilation or 1.0, self.dilation_profile_path)


REGIMES = ("paper", "resident")
PAPER_POLICIES = tuple(p for p in POLICIES if p != "static_split")  # an edge without the large model's layers cannot split
ORIN_PROFILE = "bench/profiles/dilation_orin-nx_vs_a100.toml"
PAPER = dict(
    regime="paper", dataset="scenes", edge_bundle="msao-scenes-edge", cloud_bundle="msao-scenes-cloud",
    calibration="calibration-scenes.json", edge_share=None, edge_dilation_profile=ORIN_PROFILE,
    policies=PAPER_POLICIES, load_profiles=(),
)  # fmt: skip
"""The paper's regime: only the small model on an Orin-NX-like edge; its throughput is the fleet's (bench.fleet)."""
QUICK = dict(requests=100, warmup=5, load_rates=(10.0, 20.0, 40.0, 80.0), load_seconds=6.0, stream_questions=60)


def workload(n: int, seed: int, dataset: str = "easy-vqa") -> list[Item]:
    """``n`` test questions of ``dataset`` (easy-vqa, scenes), seeded, spread over the whole set."""
    from msao.datasets.vqa import load_vqa

    data = load_vqa(dataset, "test")
    rows = np.random.default_rng(seed).permutation(len(data))[:n]
    pngs = data.image_pngs
    return [Item(int(i), data.questions[i], data.answers[i], pngs[int(data.image_ids[i])]) for i in rows]


def stream_workload(n: int, seed: int, dataset: str = "easy-vqa") -> list[Item]:
    """The first ``n`` questions of ``dataset``'s stream workload (frames of a camera that watches one scene), in order.

    easy-VQA: its images with sensor noise and shifts; scenes: objects drifting over a still background.
    """
    import io

    from PIL import Image

    if dataset == "scenes":
        from msao.datasets.scenes import SceneStreamOptions, scene_stream

        frames = scene_stream(SceneStreamOptions(scenes=max(1, n // 4 + 1), question_every=3, seed=seed)).frames
    else:
        from msao.datasets.streams import StreamOptions, stream_from_easy_vqa

        frames = stream_from_easy_vqa(StreamOptions(seed=seed)).frames
    items = []
    for frame in frames:
        if frame.question is None:
            continue
        png = io.BytesIO()
        Image.fromarray(frame.pixels).save(png, format="PNG")
        items.append(Item(len(items), frame.question, frame.answer, png.getvalue(), stream=f"scene-{frame.scene}"))
        if len(items) >= n:
            break
    return items


def measure_link(stack: Stack, model_hash: str) -> dict:
    """RTT (median of 1 KB probes) and uplink throughput (1 MB probes) through the shaping proxy, as the edge sees them."""
    from msao.cloud_bridge.link import CloudLink, LinkOptions
    from msao.cloud_bridge.mqtt_options import ClientOptions

    assert stack.proxy is not None
    edge_id = "probe-" + uuid.uuid4().hex[:6]
    link = CloudLink(LinkOptions(edge_id, ClientOptions(f"mqtt://127.0.0.1:{stack.proxy.port}", f"msao-{edge_id}"))).start()
    try:
        link.wait_for_workers(model_hash, timeout_s=60)
        rtts = [link.probe(model_hash, 1024, deadline_s=10).network_ms for _ in range(7)]
        ups = []
        for _ in range(3):
            t = link.probe(model_hash, 1_000_000, deadline_s=60)
            ups.append(8 * t.bytes_up / max(1e-6, (t.network_ms - float(np.median(rtts))) / 1e3))
        return {"rtt_ms": round(float(np.median(rtts)), 3), "uplink_mbps": round(float(np.median(ups)) / 1e6, 3)}
    finally:
        link.close()


def _progress(prefix: str):
    """A ``progress(done, total)`` callback drawing a bar with rate and ETA (silent when stderr is not a terminal)."""
    bar = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total, f"  {prefix}", "req")
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return show


def run_bench(config: BenchConfig, out: Path) -> dict:
    from msao.engines.bundle import load_bundle

    bundles = ROOT / config.bundles
    edge_b, cloud_b, cal = bundles / config.edge_bundle, bundles / config.cloud_bundle, bundles / config.calibration
    large = load_bundle(cloud_b).manifest
    items = workload(config.requests + config.warmup, config.seed, config.dataset)
    warm, measured = items[: config.warmup], items[config.warmup :]
    stream = stream_workload(config.stream_questions, config.seed, config.dataset) if config.stream_questions else []
    result: dict = {
        "config": asdict(config),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpus": len(__import__("os").sched_getaffinity(0)),
            "python": platform.python_version(),
        },
        "models": {"edge": load_bundle(edge_b).manifest.name, "large": large.name, "split_points": list(large.split_points)},
        "regime": config.regime,
        "profiles": {},
    }
    setting = {"regime": config.regime, "dilation": config.dilation, "edge_share": config.edge_share, "edges": 1, "workers": 1}
    edge_args = ("--large-on-edge", "false") if config.regime == "paper" else ()
    work = out.parent / (out.stem + "-work")
    with Stack(
        work,
        edge_b,
        cloud_b,
        cal if cal.exists() else None,
        edge_share=config.edge_share,
        edge_dilation=config.edge_dilation,
        edge_dilation_profile=config.dilation_profile_path,
    ) as stack:
        for profile in config.profiles:
            shape = PROFILES[profile]
            stack.shape(shape)
            print(
                f"==> profile {profile}: one-way delay {shape.delay_ms} ms ± {shape.jitter_ms} ms, {shape.bandwidth_bps / 1e6:g} Mbit/s",
                file=sys.stderr,
            )
            link = measure_link(stack, large.model_hash)
            print(
                f"    measured through the emulation: RTT {link['rtt_ms']:.1f} ms, uplink {link['uplink_mbps']:.1f} Mbit/s", file=sys.stderr
            )
            cells: dict[str, dict] = {}
            runs: list[tuple[str, str, dict]] = []
            for policy in config.policies:
                if policy == "static_split":
                    runs += [(f"static_split@{k}", policy, {"policy": policy, "split_layer": k}) for k in large.split_points]
                elif policy == "prune_only":
                    runs.append((policy, policy, {"policy": policy, "keep_ratio": config.prune_ratio}))
                else:
                    runs.append((policy, policy, {"policy": policy}))
            for name, policy, fields in runs:
                daemon = stack.start_edge(f"{profile}-{name}", policy, edge_args)
                try:
                    if name == runs[0][0]:
                        result["profiles"].setdefault(profile, {})["edge_profile"] = daemon.get("/readyz")[1]
                    for item in warm:  # the daemon's first answers teach its estimates; not measured
                        ask(daemon, item, fields)
                    cells[name] = closed_loop(
                        daemon, measured, fields, stack.cloud_cpu_seconds, warmup=0, progress=_progress(f"{profile} {name}")
                    ) | {"setting": setting}
                    if stream and name in ("msao", "edge_only"):
                        cells[f"{name}+stream"] = closed_loop(daemon, stream, fields, stack.cloud_cpu_seconds, warmup=0,
                                                             progress=_progress(f"{profile} {name} stream")) | {"setting": setting}  # fmt: skip
                finally:
                    stack.stop_edge(daemon)
            throughput: dict[str, float] = {}
            load: dict[str, list] = {}
            if profile in config.load_profiles:
                for policy in config.load_policies:
                    daemon = stack.start_edge(
                        f"{profile}-{policy}-load", policy, extra=(*edge_args, "--workers", "4", "--queue-size", "64")
                    )
                    try:
                        points = []
                        for rate in config.load_rates:
                            points.append(open_loop(daemon, measured, {"policy": policy}, rate, config.load_seconds, config.seed))
                            print(
                                f"  {profile} {policy} load {rate:g}/s -> {points[-1]['throughput_per_s']:.1f}/s, p95 {points[-1]['latency_ms_p95']} ms",
                                file=sys.stderr,
                            )
                        load[policy] = points
                        within = [
                            p["throughput_per_s"]
                            for p in points
                            if p["latency_ms_p95"] is not None and p["latency_ms_p95"] <= config.load_p95_bound_ms
                        ]
                        throughput[policy] = max(within) if within else 0.0
                    finally:
                        stack.stop_edge(daemon)
            stream_cells = {k: v for k, v in cells.items() if k.endswith("+stream")}
            main_cells = {k: v for k, v in cells.items() if not k.endswith("+stream")}
            summary = profile_summary(main_cells, throughput)
            summary["stream"] = {k: profile_summary({k: v}, {})["metrics"][k] for k, v in stream_cells.items()}
            summary["goals"] = goals_for_profile(profile, summary)
            result["profiles"][profile] = {**result["profiles"].get(profile, {}), "link": link, "shape": asdict(shape),
                                           "summary": summary, "load": load, "cells": cells}  # fmt: skip
            out.write_text(json.dumps(result, indent=1))  # partial results survive an interrupted run
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--regime",
        choices=REGIMES,
        default="resident",
        help="paper: the scenes pair, the edge holds only the small model, dilated as an Orin NX; resident: both models on the edge",
    )
    p.add_argument("--quick", action="store_true", help="100 requests per cell and a short load test (~10 min)")
    p.add_argument("--profiles", help=f"comma-separated subset of {','.join(PROFILES)}")
    p.add_argument("--policies", help=f"comma-separated subset of {','.join(POLICIES)}")
    p.add_argument("--requests", type=int, help="requests per cell (closed loop)")
    p.add_argument(
        "--edge-share", type=float, help="cores the edge daemon may use (default 0.25: the edge is ~4x slower than a cloud core)"
    )
    p.add_argument(
        "--edge-dilation",
        type=float,
        help="the edge daemon emulates a device this many times slower (with --edge-share 0: instead of the quota)",
    )
    p.add_argument(
        "--edge-dilation-profile", metavar="FILE", help=f"one factor per kind of edge work (the paper regime's default: {ORIN_PROFILE})"
    )
    p.add_argument("--dataset", choices=("easy-vqa", "scenes"), help="whose test questions and stream (default: the regime's)")
    p.add_argument("--no-load", action="store_true", help="skip the open-loop throughput test")
    p.add_argument("--no-stream", action="store_true", help="skip the stream workload")
    p.add_argument("--out", help="results JSON (default bench/results/<UTC date-time>.json)")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    kw: dict = {**(PAPER if args.regime == "paper" else {}), **(QUICK if args.quick else {})}
    if args.profiles:
        kw["profiles"] = tuple(x for x in args.profiles.split(",") if x)
    if args.policies:
        kw["policies"] = tuple(x for x in args.policies.split(",") if x)
    if args.requests:
        kw["requests"] = args.requests
    if args.edge_share is not None:
        kw["edge_share"] = args.edge_share or None  # 0: no quota
    if args.dataset:
        kw["dataset"] = args.dataset
    if args.edge_dilation:
        kw["edge_dilation"], kw["edge_dilation_profile"] = args.edge_dilation, ""
    if args.edge_dilation_profile:
        kw["edge_dilation_profile"], kw["edge_dilation"] = args.edge_dilation_profile, None
    if args.no_load:
        kw["load_profiles"] = ()
    if args.no_stream:
        kw["stream_questions"] = 0
    try:
        config = BenchConfig(**kw)
    except ValueError as exc:
        p.error(str(exc))
    unknown = [x for x in config.profiles if x not in PROFILES] + [x for x in config.policies if x not in POLICIES]
    if unknown:
        p.error(f"unknown profiles/policies {unknown}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_bench(config, out)
    if not args.no_plots:
        from bench.plots import write_plots

        for path in write_plots(result, out.parent / (out.stem + "-plots")):
            print(f"plot: {path}", file=sys.stderr)
    from bench.report import format_table

    print(format_table(result))
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
