"""Token-level speculation, offline: identity, acceptance per position and block size, cloud passes per answer token.

    make bench-speculation   # = python bench/speculation.py --edge bundles/msao-scenes-edge --cloud bundles/msao-scenes-cloud

For each question of the dataset's test split (scenes: the describe family by default, the one
whose answers take three or more tokens) the edge model drafts and the cloud model's
``VerifySession`` verifies, in this process through ``speculate`` (the daemon's loop) with the
session called directly instead of over MQTT: the network is left out on purpose, because the
figures here (does the answer equal the cloud's greedy answer; how many drafts are accepted;
how many forward passes the cloud runs per answer token) do not depend on it. Latency on a
shaped link is the live benchmark's (bench/run.py, policy ``speculative``).

A block is one cloud forward pass (the first one is the prefill, with or without drafts);
cloud-only decoding runs one pass per answer token (the end token included). Fixed-k cells send
k drafts with the prompt; "adaptive" sizes every block with ``block_size`` (the first from the
prior acceptance); the daemon's form sends the prompt alone first, so the cloud's prefill
overlaps the edge's, at the price of one more pass. Writes JSON and
a PNG beside it, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from msao.edge_runtime.token_speculation import BlockReply, speculate
from msao.engines.bundle import load_bundle
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.engines.pipeline import RequestPipeline
from msao.engines.speculation import TokenSequence, VerifySession

ROUND_TRIP_MS = 60.0  # for the adaptive k only: lte's round trip of a small job (testbed.PROFILES)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _questions(dataset: str, family: str, limit: int):
    if dataset == "scenes":
        from msao.datasets.scenes import load_scenes

        split = load_scenes("test")
        idx = [i for i, f in enumerate(split.families) if family in ("all", f.value)][:limit]
        return [(split.image_pngs[int(split.image_ids[i])], split.questions[i]) for i in idx]
    from msao.datasets.easyvqa import load_easy_vqa

    split = load_easy_vqa("test")
    return [(split.image_pngs[int(split.image_ids[i])], split.questions[i]) for i in range(min(limit, len(split.questions)))]


def run(edge_dir: Path, cloud_dir: Path, dataset: str, family: str, limit: int, blocks: list[int], budget: int) -> dict:
    be = OnnxRuntimeBackend(OrtOptions(threads=1))
    edge, cloud = RequestPipeline(load_bundle(edge_dir), be), RequestPipeline(load_bundle(cloud_dir), be)
    pool = ThreadPoolExecutor(1)
    questions = _questions(dataset, family, limit)
    cells: dict[str, dict] = {}
    runs = [(f"k={k}", k, k) for k in blocks] + [("adaptive", None, None), ("daemon (prompt first)", 0, None)]
    for name, first_block, k in runs:
        mismatches = tokens = passes = drafted = accepted = 0
        per_position = np.zeros((2, 16), np.int64)  # [blocks reaching position i, of them accepted there]
        t0 = time.perf_counter()
        for png, q in questions:
            rgb = edge.decode(png)[0]
            enc_edge, enc_cloud = edge.encode(rgb), cloud.encode(rgb)
            want = cloud.generator().generate(enc_cloud, q, max_new_tokens=budget).token_ids
            session = {"s": None}

            def verify(drafts, committed, restart, ahead, enc=enc_cloud, q=q, session=session):
                if restart:
                    session["s"] = VerifySession(cloud.generator(), enc, q, keep=None, max_new_tokens=budget)
                v = session["s"].verify(np.asarray(drafts, np.int64), ahead)
                return BlockReply(v.token_ids, v.token_probs, v.committed, v.finish_reason)

            gen = edge.generator()
            seq = TokenSequence(gen)
            first = seq.start(enc_edge, q, capacity=budget)[-1]
            out = speculate(seq, first, verify, pool.submit, budget=budget, eos=gen.eos, round_trip_ms=ROUND_TRIP_MS, edge_step_ms=1.0,
                            first_block=first_block, fixed_block=k)  # fmt: skip
            mismatches += out.token_ids != want or bool(out.fallback)
            tokens += len(out.token_ids)
            passes += out.blocks
            drafted += out.drafted
            accepted += out.accepted
            for size, acc in zip(out.block_sizes, out.block_accepted):
                for i in range(min(size, 16)):
                    per_position[0, i] += 1
                    per_position[1, i] += i < acc
        reach = per_position[0]
        cells[name] = {
            "questions": len(questions), "mismatches": int(mismatches), "answer_tokens": int(tokens), "cloud_passes": int(passes),
            "cloud_passes_per_token": passes / tokens if tokens else 0.0, "cloud_only_passes_per_token": 1.0,
            "acceptance": accepted / drafted if drafted else 0.0,
            "acceptance_per_position": [float(per_position[1, i] / reach[i]) for i in range(16) if reach[i]],
            "seconds": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        _log(f"{name}: {cells[name]['cloud_passes_per_token']:.3f} passes/token, acceptance {cells[name]['acceptance']:.3f}, "
             f"{mismatches} mismatches")  # fmt: skip
    pool.shutdown()
    return {
        "benchmark": "speculation", "dataset": dataset, "family": family, "edge": edge.manifest.name, "cloud": cloud.manifest.name,
        "max_new_tokens": budget, "round_trip_ms_for_adaptive_k": ROUND_TRIP_MS, "cells": cells,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": os.getloadavg()},
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip


def table(result: dict) -> str:
    lines = [
        f"{result['dataset']} ({result['family']}), edge {result['edge']}, cloud {result['cloud']}",
        "",
        "| blocks | questions | mismatches | acceptance | cloud passes / token | acceptance at positions 1..4 |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in result["cells"].items():
        pos = ", ".join(f"{a:.2f}" for a in c["acceptance_per_position"][:4])
        lines.append(
            f"| {name} | {c['questions']} | {c['mismatches']} | {c['acceptance']:.3f} | {c['cloud_passes_per_token']:.3f} | {pos} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in result["cells"].items():
        ax[0].plot(range(1, len(c["acceptance_per_position"]) + 1), c["acceptance_per_position"], marker="o", label=name)
    ax[0].set(xlabel="draft position in its block", ylabel="share accepted", title="Acceptance per position", ylim=(0, 1.05))
    ax[0].legend(fontsize=8, loc="upper right")
    names = list(result["cells"])
    ax[1].bar(names, [result["cells"][n]["cloud_passes_per_token"] for n in names])
    ax[1].axhline(1.0, color="grey", linestyle="--", label="cloud-only (1 pass per token)")
    ax[1].axhline(0.4, color="green", linestyle=":", label="goal (0.4)")
    ax[1].set(ylabel="cloud forward passes per answer token", title="Cloud passes per answer token", ylim=(0, 1.25))
    ax[1].tick_params(axis="x", labelrotation=30)
    ax[1].legend(loc="upper left")
    fig.suptitle(f"Token-level speculation, {result['dataset']} {result['family']}: {result['edge']} drafts, {result['cloud']} verifies")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edge", type=Path, required=True, help="the drafting bundle")
    p.add_argument("--cloud", type=Path, required=True, help="the verifying bundle")
    p.add_argument("--dataset", choices=("scenes", "easy-vqa"), default="scenes")
    p.add_argument("--family", default="describe", help="scenes question family, or 'all' (default describe)")
    p.add_argument("--limit", type=int, default=500, help="questions (default 500)")
    p.add_argument("--blocks", default="1,2,3,4,6", help="fixed block sizes to measure beside the adaptive one")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("bench/results/speculation.json"))
    a = p.parse_args(argv)
    result = run(a.edge, a.cloud, a.dataset, a.family, a.limit, [int(k) for k in a.blocks.split(",")], a.max_new_tokens)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, a.out.with_suffix(".png"))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
