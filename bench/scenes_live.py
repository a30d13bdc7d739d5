"""The scenes pair live, side by side: policies through the real daemon path over a shaped link.

    make bench-uploads             # upload forms: cloud_only vs msao, lte + congested, 300 test questions per link
    make bench-speculation-live    # token-level: cloud_only vs speculative on lte, describe questions (>= 3 tokens)

The paper's regime (the edge holds only the small model; ``large_on_edge = false``): a real
Mosquitto, a real `msao cloud` worker, the edge's link to the broker through the shaping proxy
at a testbed link profile, and the edge runtime in this process with a calibration of the pair
on *train* questions (``msao calibrate --dataset scenes``); ``--edge-dilation k`` makes the edge
k times slower than this CPU (``RuntimeOptions.edge_dilation``; ``--edge-dilation-profile FILE``:
one factor per kind of edge work, bench/profiles/dilation_orin-nx_vs_a100.toml), for an edge 10-20x slower
than the cloud. Every test question is asked once per policy, side by side, the order rotating
per question so no policy always runs on a warmer link. Reports per link and policy the client
p50/p95, uplink bytes per request, accuracy on the test answers, and the plan and upload mix,
each against the first policy; writes JSON and a PNG beside it and prints a Markdown table. A
benchmark, not a test: the numbers depend on this machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from bench.cells import dilation_factors, dilation_label
from msao.cloud_bridge.link import CloudLink, LinkOptions
from msao.cloud_bridge.mqtt_options import ClientOptions
from msao.edge_runtime.calibration import load_calibration
from msao.edge_runtime.local_model import LocalModel
from msao.edge_runtime.requests import EdgeRequest
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions
from msao.engines.bundle import load_bundle
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import ConfigError
from testbed import PROFILES, ShapingProxy, start_broker, start_workers, stop_all, wait_online


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _questions(dataset: str, family: str, limit: int, seed: int):
    from msao.datasets.vqa import load_vqa

    split = load_vqa(dataset, "test")
    rows = np.random.default_rng(seed).permutation(len(split.questions))
    if family != "all":
        families = getattr(split, "families", None)
        if families is None:
            raise SystemExit(f"--family {family}: {dataset} has no question families")
        rows = [i for i in rows if families[i].value == family]
    return [(split.image_pngs[int(split.image_ids[i])], split.questions[i], split.answers[i]) for i in rows[:limit]]


def _cell(rows: list[dict]) -> dict:
    ms = np.array([r["ms"] for r in rows])
    return {
        "requests": len(rows), "p50_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)),
        "uplink_bytes_per_request": float(np.mean([r["bytes_up"] for r in rows])),
        "accuracy": float(np.mean([r["correct"] for r in rows])), "errors": sum(r["status"] != "ok" for r in rows),
        "plans": dict(Counter(r["plan_kind"] for r in rows).most_common()), "uploads": dict(Counter(r["upload"] or "-" for r in rows).most_common()),
        "fallbacks": sum(bool(r["fallback"]) for r in rows),
        "completion_tokens_mean": float(np.mean([r["completion_tokens"] for r in rows])),
        "edge_compute_ms_p50": float(np.median([r["edge_ms"] for r in rows])), "cloud_wait_ms_p50": float(np.median([r["cloud_ms"] for r in rows])),
        "blocks_mean": float(np.mean([r["blocks"] for r in rows])),
    }  # fmt: skip


def _blocks(reason: str) -> int:
    """Verification blocks of a speculative answer, from its reason ("token-level: N blocks ..."); 0 for other plans."""
    m = re.search(r"token-level: (\d+) blocks", reason)
    return int(m.group(1)) if m else 0


def run(
    edge_dir: Path, cloud_dir: Path, calibration: Path, dataset: str, links: list[str], limit: int, seed: int,
    policies: tuple[str, ...] = ("cloud_only", "msao"), family: str = "all", edge_dilation: float = 1.0, edge_dilation_profile: str = "",
) -> dict:  # fmt: skip
    cal = load_calibration(calibration)
    if cal.dataset != dataset:
        raise SystemExit(f"{calibration} was calibrated on {cal.dataset}, not {dataset}: run `msao calibrate --dataset {dataset}`")
    be = OnnxRuntimeBackend(OrtOptions(threads=1))
    edge = LocalModel(load_bundle(edge_dir), be)
    large = LocalModel(load_bundle(cloud_dir), be, resident=False)  # the paper's regime: only the manifest on the edge
    questions = _questions(dataset, family, limit, seed)
    root = Path(tempfile.mkdtemp(prefix="msao-bench-uploads-"))
    broker = start_broker(root / "broker")
    workers = start_workers(broker.url, cloud_dir, root, count=1, verbosity="-v")
    proxy = ShapingProxy("127.0.0.1", broker.port).start()
    cells: dict[str, dict] = {}
    try:
        for name in links:
            proxy.set_shape(PROFILES[name])
            edge_id = "bench-" + uuid.uuid4().hex[:8]
            link = CloudLink(LinkOptions(edge_id, ClientOptions(f"mqtt://127.0.0.1:{proxy.port}", f"msao-{edge_id}", keepalive_s=10))).start()
            rt = EdgeRuntime(edge, large, link, cal, RuntimeOptions(workers=1, probe_interval_s=2.0, edge_dilation=edge_dilation,
                                                                   edge_dilation_profile=edge_dilation_profile)).start()
            try:
                wait_online(link, workers)
                link.probe(large.manifest.model_hash, 64 * 1024, deadline_s=10)  # the link estimate starts from the shaped link
                rows: dict[str, list[dict]] = {p: [] for p in policies}
                t0 = time.perf_counter()
                for i, (png, q, truth) in enumerate(questions):
                    for policy in policies[i % len(policies) :] + policies[: i % len(policies)]:
                        req = EdgeRequest(f"b{uuid.uuid4().hex[:12]}", q, png, policy=policy, deadline_ms=30_000)
                        t = time.perf_counter()
                        r = rt.answer(req)
                        rows[policy].append({
                            "ms": (time.perf_counter() - t) * 1e3, "bytes_up": r.bytes_up, "correct": r.answer == truth, "status": r.status,
                            "plan_kind": r.plan.split(" ")[0], "upload": r.upload, "fallback": r.fallback,
                            "completion_tokens": r.completion_tokens, "edge_ms": r.timings_ms.get("local", 0.0),
                            "cloud_ms": r.timings_ms.get("cloud", 0.0), "blocks": _blocks(r.reason),
                        })  # fmt: skip
                cells[name] = {p: _cell(rows[p]) for p in policies}
                c = cells[name][policies[0]]
                for p in policies[1:]:
                    m = cells[name][p]
                    _log(
                        f"{name}: {len(questions)} questions in {time.perf_counter() - t0:.0f} s; {p}/{policies[0]} p50 {m['p50_ms'] / c['p50_ms']:.3f}, "
                        f"uplink {m['uplink_bytes_per_request'] / max(1.0, c['uplink_bytes_per_request']):.3f}, accuracy {m['accuracy']:.4f} vs {c['accuracy']:.4f}"
                    )
            finally:
                rt.stop()
                link.close()
    finally:
        proxy.stop()
        stop_all(workers)
        broker.stop()
        edge.close()
        large.close()
    return {
        "benchmark": "scenes_live", "dataset": dataset, "edge": edge.manifest.name, "cloud": large.manifest.name, "calibration": str(calibration),
        "calibration_questions": cal.questions, "regime": "large_on_edge = false", "questions": len(questions), "seed": seed, "cells": cells,
        "policies": list(policies), "family": family, "edge_dilation": edge_dilation, "edge_dilation_profile": edge_dilation_profile,
        "dilation": dilation_factors(edge_dilation, edge_dilation_profile),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip


def table(result: dict) -> str:
    lines = [
        f"{result['dataset']} ({result['family']}), {result['questions']} test questions per link, edge {result['edge']} "
        f"(dilation {dilation_label(result)}), cloud {result['cloud']} ({result['regime']}), calibration on {result['calibration_questions']} train questions",
        "",
        "| link | policy | p50 ms | p95 ms | uplink KB / request | accuracy | plans | uploads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, cell in result["cells"].items():
        for policy, c in cell.items():
            mix = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
            lines.append(
                f"| {name} | {policy} | {c['p50_ms']:.1f} | {c['p95_ms']:.1f} | {c['uplink_bytes_per_request'] / 1e3:.1f} | {c['accuracy']:.4f} | "
                f"{mix(c['plans'])} | {mix(c['uploads'])} |"
            )
    base = result["policies"][0]
    lines += ["", f"| link | policy | p50 / {base} | uplink / {base} | accuracy − {base}, points |", "|---|---|---|---|---|"]
    for name, cell in result["cells"].items():
        c = cell[base]
        for p in result["policies"][1:]:
            m = cell[p]
            lines.append(
                f"| {name} | {p} | {m['p50_ms'] / c['p50_ms']:.3f} | {m['uplink_bytes_per_request'] / max(1.0, c['uplink_bytes_per_request']):.3f} | "
                f"{100 * (m['accuracy'] - c['accuracy']):+.1f} |"
            )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(result["cells"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    x = np.arange(len(links))
    w = 0.8 / len(result["policies"])
    for j, policy in enumerate(result["policies"]):
        axes[0].bar(x + w * j, [result["cells"][n][policy]["p50_ms"] for n in links], w, label=policy)
        axes[1].bar(x + w * j, [result["cells"][n][policy]["uplink_bytes_per_request"] / 1e3 for n in links], w, label=policy)
    for ax, title in zip(axes, ("client p50 (ms)", "uplink per request (KB)")):
        ax.set_xticks(x + w * (len(result["policies"]) - 1) / 2, links)
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle(f"{result['edge']} ({dilation_label(result)}) + {result['cloud']}, {result['questions']} {result['dataset']} ({result['family']}) questions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--edge", type=Path, default=Path("bundles/msao-scenes-edge"))
    ap.add_argument("--cloud", type=Path, default=Path("bundles/msao-scenes-cloud"))
    ap.add_argument("--calibration", type=Path, required=True, help="a calibration of the pair on the dataset's train questions")
    ap.add_argument("--dataset", choices=("scenes", "easy-vqa"), default="scenes")
    ap.add_argument("--links", default="lte,congested", help=f"comma-separated link profiles ({', '.join(PROFILES)})")
    ap.add_argument("--questions", type=int, default=300, help="test questions per link (each asked once per policy)")
    ap.add_argument("--seed", type=int, default=0, help="which test questions")
    ap.add_argument("--policies", default="cloud_only,msao", help="comma-separated policies, the first the baseline of the ratios")
    ap.add_argument("--family", default="all", help="scenes question family only (describe: answers of >= 3 tokens), or all")
    ap.add_argument("--edge-dilation", type=float, default=1.0, help="make the edge this many times slower than this CPU")
    ap.add_argument("--edge-dilation-profile", default="", metavar="FILE",
                    help="instead, one factor per kind of edge work from a device profile (bench/profiles/dilation_orin-nx_vs_a100.toml)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/uploads.json"))
    a = ap.parse_args(argv)
    from msao.edge_runtime.plans import POLICIES

    links = [s for s in a.links.split(",") if s]
    policies = tuple(p for p in a.policies.split(",") if p)
    unknown = [s for s in links if s not in PROFILES]
    if unknown or a.questions < 1 or len(policies) < 2 or set(policies) - set(POLICIES) or a.edge_dilation < 1:
        ap.error(
            f"unknown link profiles {unknown} (known: {list(PROFILES)})" if unknown else
            f"--policies needs two or more of {list(POLICIES)}" if len(policies) < 2 or set(policies) - set(POLICIES) else
            "--questions must be >= 1 and --edge-dilation >= 1"
        )  # fmt: skip
    if a.edge_dilation_profile and a.edge_dilation != 1:
        ap.error("--edge-dilation or --edge-dilation-profile, not both")
    try:
        RuntimeOptions(edge_dilation_profile=a.edge_dilation_profile)
    except ConfigError as exc:
        ap.error(str(exc))
    result = run(a.edge, a.cloud, a.calibration, a.dataset, links, a.questions, a.seed, policies, a.family, a.edge_dilation,
                 a.edge_dilation_profile)  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, a.out.with_suffix(".png"))
    print(table(result))
    _log(f"wrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
