"""SIMULATION: msao's real scheduler driven by a real model pair's published figures, at real scale.

    python -m bench.simulate                                # the shipped LLaVA-1.5 7B/13B, Orin NX vs A100 profile (make bench-sim)
    python -m bench.simulate --profile FILE --requests 1000 --seed 0 --out bench/results/simulate-NAME.json

A benchmark tool, run from a checkout like ``bench.run``: it shares the benchmark's link profiles,
policies, oracle and summary code, which an installed msao (the wheel a Jetson gets) must not
carry, so it is no ``msao`` subcommand and uses only msao's public names.

Not a measurement. What is real: the ``Scheduler`` (its candidates, cost model and ``choose``),
its ``Manifest`` / ``LatencyProfile`` / ``SegmentClock`` / ``Calibration`` types, the link
profiles (``testbed.PROFILES``) and the benchmark's definitions of the oracle, the
best baseline and the goals (``bench.summary``). What is simulated: the segment times (the
profile's published, derived or assumed figures, ``bench.simprofile``), the requests (seeded
draws: answer length, compute spread, link jitter, image size, difficulty) and the queues
(``bench.simworld``). Each request's realised latency comes from the same formulas as the
estimate, with that request's draws: so this validates msao's *decisions* under its model, not
the model. Accuracy is the profile's table (VQAv2 here), not answers.

Per link profile: every policy (the benchmark's baselines, ``static_split`` at every split point,
msao) on the same N requests one at a time; the hindsight oracle (per request, the fastest
correct answer among every plan msao could have chosen, else cloud-only's); throughput as the
highest Poisson arrival rate whose p95 latency stays within the benchmark's bound, with FIFO
queues on the edge accelerator, the link and ``servers`` cloud accelerators, msao re-deciding
per request from the queues (edge load, cloud wait) as the daemon does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from bench.run import POLICIES, BenchConfig
from bench.simprofile import DEFAULT_PROFILE, ROOT, SimProfile, load_sim_profile
from bench.simworld import Draws, Job, Link, closed_loop_ms, draw_requests, job_from_plan, run_open_loop
from bench.summary import goals_for_profile, oracle_metrics, profile_summary
from msao.edge_runtime.estimates import LinkSnapshot
from msao.edge_runtime.scheduler import CostInputs, Plan, Scheduler, SchedulerOptions
from msao.errors import ConfigError, MsaoError
from testbed import PROFILES

__all__ = ["NOTICE", "PAPER", "SimOptions", "build_scheduler", "draft_commit_share", "inputs", "link_from_profile", "run_simulation", "format_table", "main", "mix_key"]

NOTICE = (
    "SIMULATION, not a measurement: msao's real scheduler and cost model, driven by published (or derived, or assumed: "
    "each labelled in the profile) per-segment figures of a real model pair, with seeded noise. It tests msao's decisions "
    "under its own cost model; it does not test the cost model, the runtime or the network code."
)
# The paper's headline claims (docs/FIELD_NOTES: secondary summaries of arXiv 2604.02945; the benchmark issue).
PAPER = {"p50_vs_best_baseline": 0.70, "throughput_vs_cloud_only": (1.5, 2.3), "accuracy_minus_cloud_only_points": -0.2}
NOT_SIMULATED = ("edge_flops_per_request", "cloud_flops_per_request", "edge_cpu_s_per_request", "cloud_cpu_s_per_request",
                 "edge_peak_rss_mb", "encoder_skipped", "fallbacks", "errors")  # fmt: skip


@dataclass(frozen=True)
class SimOptions:
    """One simulation run.

    Attributes:
        requests: requests per policy per link (closed loop, one at a time).
        load_requests: arrivals per offered rate in the throughput search (open loop).
        links: link profiles (names in ``testbed.PROFILES``).
        accuracy_slack: the scheduler's accuracy slack (None: ``SchedulerOptions``' default).
        records: keep per-request records in the result (large).
    """

    requests: int = 1000
    seed: int = 0
    load_requests: int = 400
    links: tuple[str, ...] = tuple(PROFILES)
    accuracy_slack: float | None = None
    records: bool = False


def link_from_profile(name: str) -> Link:
    shape = PROFILES[name]
    return Link(name, shape.delay_ms, shape.jitter_ms, shape.bandwidth_bps or 1e12)


def build_scheduler(p: SimProfile, accuracy_slack: float | None = None) -> Scheduler:
    """msao's ``Scheduler`` over the profile's models, clocks and tables; keep ratios = the profile's, prune_only at the one nearest the benchmark's."""
    ratios = p.edge.keep_ratios
    prune = min(ratios[1:] or ratios, key=lambda r: abs(r - BenchConfig().prune_ratio))
    kw = {} if accuracy_slack is None else {"accuracy_slack": accuracy_slack}
    edge_clock, large_clock, cloud_clock = p.clocks()
    return Scheduler(SchedulerOptions(keep_ratios=ratios, prune_ratio=prune, **kw), p.edge.manifest, edge_clock, p.large.manifest,
                     large_clock, cloud_clock, p.calibration)  # fmt: skip


def inputs(p: SimProfile, link: Link, d: Draws, edge_load: float = 1.0, cloud_queue_ms: float = 0.0) -> CostInputs:
    """What the scheduler sees for request ``d``: the link's nominal RTT and rate (a converged estimate), this image's size."""
    return CostInputs(
        LinkSnapshot(link.rtt_ms, link.bandwidth_bps, True), True, cloud_queue_ms, edge_load, p.mas_ms, d.image_bytes, p.deadline_ms
    )


def draft_commit_share(s: Scheduler, plan: Plan) -> float:
    """P(the edge's draft is committed) for a draft/verify plan, from the calibration (0: always verified)."""
    pair = s.pair
    if (
        plan.kind != "draft_verify"
        or pair is None
        or plan.keep_ratio not in pair.keep_ratios
        or plan.commit_threshold not in pair.thresholds
    ):
        return 0.0
    return pair.commit_share[pair.row(plan.keep_ratio)][pair.thresholds.index(plan.commit_threshold)]


def mix_key(plan: Plan) -> str:
    """A plan's label in a plan mix: its kind, a split with its layer (``split@k``), as ``Plan.describe`` begins.

    From the plan's fields, never from parsing ``describe()``; ``kind`` may be a string or a ``str`` enum.
    """
    if plan.kind == "split":
        return f"split@{plan.split_layer}"
    return str(plan.kind.value) if isinstance(plan.kind, Enum) else str(plan.kind)


def _record(d: Draws, plan: Plan, job: Job, ms: float) -> dict:
    """One request in the benchmark's record format (bench.cells), so bench.summary's definitions apply unchanged."""
    return {
        "index": d.index, "correct": job.correct, "http_status": 200, "status": "ok", "latency_ms": round(ms, 3), "daemon_ms": ms,
        "mas_ms": job.mas_ms, "plan": plan.describe(), "answered_by": job.answered_by, "fallback": False, "bytes_up": job.bytes_up,
        "bytes_down": job.bytes_down, "flops_edge": 0, "flops_cloud": 0, "est_latency_ms": round(plan.est_latency_ms, 3),
        "est_accuracy": plan.est_accuracy, "est_uplink_bytes": plan.est_uplink_bytes, "image_bytes": d.image_bytes, "edge_busy_ms": job.busy_ms("edge"),
        "cloud_busy_ms": job.busy_ms("cloud"),
    }  # fmt: skip


def _cell(records: list[dict]) -> dict:
    return {"records": records, "wall_s": 0.0, "edge_cpu_s": 0.0, "cloud_cpu_s": 0.0, "edge_peak_rss_bytes": 0}


def _runs(s: Scheduler) -> list[tuple[str, str, int | None]]:
    """(cell name, policy, split layer): the benchmark's policies, static_split once per split point."""
    assert s.large is not None
    out: list[tuple[str, str, int | None]] = []
    for policy in POLICIES:
        if policy == "static_split":
            out += [(f"static_split@{k}", policy, k) for k in s.large.split_points]
        else:
            out.append((policy, policy, None))
    return out


def _closed_loop(p: SimProfile, s: Scheduler, link: Link, draws: list[Draws]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every policy and every candidate plan on every request; (policy cells, candidate-plan cells)."""
    cells: dict[str, list[dict]] = {name: [] for name, _, _ in _runs(s)}
    plans: dict[str, list[dict]] = {}
    for d in draws:
        x = inputs(p, link, d)
        for name, policy, k in _runs(s):
            plan = s.choose(x, policy, split_layer=k)
            job = job_from_plan(s, plan, link, d, p.mas_ms, draft_commit_share(s, plan))
            cells[name].append(_record(d, plan, job, closed_loop_ms(job)))
        for plan in s.candidates(x):
            if plan.kind == "draft_verify" and draft_commit_share(s, plan) >= 1.0:
                continue  # always commits: the edge plan at the same ratio, same latency (the oracle lists it as that)
            job = job_from_plan(s, plan, link, d, p.mas_ms, draft_commit_share(s, plan))
            plans.setdefault(f"plan {plan.describe()}", []).append(_record(d, plan, job, closed_loop_ms(job)))
    return {k: _cell(v) for k, v in cells.items()}, {k: _cell(v) for k, v in plans.items()}


def _max_rate(
    p: SimProfile, s: Scheduler, link: Link, draws: list[Draws], policy: str, k: int | None, n: int, bound_ms: float, seed: int
) -> dict:
    """The highest Poisson arrival rate (req/s) whose p95 latency is within ``bound_ms``: doubling, then bisection."""
    gaps = np.random.default_rng(seed + 1).exponential(1.0, n)  # unit-rate gaps, scaled per rate (common random numbers)
    unit = np.cumsum(gaps)

    def run(rate: float) -> tuple[float, float, Counter]:
        arrivals = [float(a) for a in unit * 1e3 / rate]
        mix: Counter = Counter()

        def make_job(i: int, now: float, state) -> Job:
            d = draws[i % len(draws)]
            plan = s.choose(inputs(p, link, d, 1.0 + state.edge_users(), state.cloud_wait_ms()), policy, split_layer=k)
            mix[mix_key(plan)] += 1
            return job_from_plan(s, plan, link, d, p.mas_ms, draft_commit_share(s, plan))

        lat = run_open_loop(arrivals, make_job, {"edge": 1, "uplink": 1, "downlink": 1, "cloud": p.cloud_servers})
        span_s = max(a + m for a, m in zip(arrivals, lat)) / 1e3
        return float(np.percentile(lat, 95)), n / span_s, mix

    lo, hi, best = 0.0, None, {"rate_per_s": 0.0, "throughput_per_s": 0.0, "latency_ms_p95": None, "plan_mix": {}}
    rate = 0.5
    for _ in range(40):
        if hi is not None and hi - lo <= max(0.02 * lo, 0.01):
            break
        p95, thr, mix = run(rate)
        if p95 <= bound_ms:
            lo = rate
            best = {"rate_per_s": round(rate, 3), "throughput_per_s": round(thr, 3), "latency_ms_p95": round(p95, 1),
                    "plan_mix": dict(mix.most_common())}  # fmt: skip
        else:
            hi = rate
        rate = rate * 2 if hi is None else (lo + hi) / 2
        if hi is None and rate > 1e4:
            break
    return best


def _strip(summary: dict) -> None:
    for m in summary["metrics"].values():
        for key in NOT_SIMULATED:
            m.pop(key, None)
    summary.get("msao_ratios", {}).pop("cloud_cpu_vs_cloud_only", None)


def _extras(cell: dict, mean_tokens: float) -> dict:
    rec = cell["records"]
    n = max(1, len(rec))
    return {
        "plan_mix_detail": dict(Counter(r["plan"] for r in rec).most_common()),
        "edge_busy_ms_per_request": round(sum(r["edge_busy_ms"] for r in rec) / n, 2),
        "cloud_busy_ms_per_request": round(sum(r["cloud_busy_ms"] for r in rec) / n, 2),
        "closed_loop_tokens_per_s": round(1e3 * mean_tokens / max(1e-9, float(np.mean([r["latency_ms"] for r in rec]))), 2),
    }


def _paper(summary: dict) -> dict:
    r = summary.get("msao_ratios", {})
    m = summary["metrics"]
    cloud = m.get("cloud_only", {}).get("latency_ms_p50")
    thr = r.get("throughput_vs_cloud_only")
    return {
        "p50_vs_best_baseline": {"simulated": r.get("p50_vs_best_baseline"), "paper": PAPER["p50_vs_best_baseline"]},
        "p50_vs_cloud_only": {
            "simulated": round(m["msao"]["latency_ms_p50"] / cloud, 4) if cloud else None,
            "paper": "< 0.5 (secondary summaries)",
        },
        "throughput_vs_cloud_only": {"simulated": thr, "paper": list(PAPER["throughput_vs_cloud_only"])},
        "accuracy_minus_cloud_only_points": {
            "simulated": r.get("accuracy_minus_cloud_only_points"),
            "paper": PAPER["accuracy_minus_cloud_only_points"],
        },
    }


def run_simulation(p: SimProfile, o: SimOptions = SimOptions(), progress=lambda _m: None) -> dict:
    """Every policy and the oracle under every link profile; the result as JSON-ready data (labelled SIMULATION)."""
    unknown = [x for x in o.links if x not in PROFILES]
    if unknown:
        raise ConfigError(f"unknown link profiles {unknown}; known: {list(PROFILES)} (testbed.PROFILES)")
    s = build_scheduler(p, o.accuracy_slack)
    draws = draw_requests(o.requests, o.seed, p.answer_tokens_pmf, p.image_bytes_mean, p.image_bytes_sigma, p.edge_cv, p.cloud_cv)
    bound = BenchConfig().load_p95_bound_ms
    result: dict = {
        "simulation": True,
        "notice": NOTICE,
        "profile": {
            "name": p.name,
            "title": p.title,
            "path": p.path,
            "benchmark": p.benchmark,
            "edge_device": p.edge_device,
            "cloud_device": p.cloud_device,
            "figures": [asdict(f) for f in p.figures],
        },
        "config": {
            **asdict(o),
            "scheduler": asdict(s.options),
            "load_p95_bound_ms": bound,
            "text_tokens_real": p.text_tokens,
            "mean_answer_tokens": p.mean_answer_tokens,
            "cloud_servers": p.cloud_servers,
        },
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "links": {},
    }
    for name in o.links:
        link = link_from_profile(name)
        progress(f"SIMULATION {p.name} / {name}: rtt {link.rtt_ms:g} ms ± {2 * link.jitter_ms:g}, {link.bandwidth_bps / 1e6:g} Mbit/s")
        cells, plan_cells = _closed_loop(p, s, link, draws)
        throughput, load = {}, {}
        for cell, policy, k in _runs(s):
            load[cell] = _max_rate(p, s, link, draws, policy, k, min(o.load_requests, max(50, o.requests)), bound, o.seed)
            throughput[cell] = load[cell]["throughput_per_s"]
        summary = profile_summary(cells, throughput)
        summary["oracle_baselines_only"] = summary["oracle"]  # bench.summary's oracle: over the measured baselines
        summary["oracle"] = oracle_metrics({**{k: v for k, v in cells.items() if k != "msao"}, **plan_cells})  # over every plan msao could choose
        ratios = summary.get("msao_ratios", {})
        if summary["oracle"]["latency_ms_p50"]:
            ratios["p50_vs_oracle"] = round(summary["metrics"]["msao"]["latency_ms_p50"] / summary["oracle"]["latency_ms_p50"], 4)
        _strip(summary)
        for cell_name, cell in cells.items():
            summary["metrics"][cell_name].update(_extras(cell, p.mean_answer_tokens))
            summary["metrics"][cell_name]["tokens_per_s_at_max_rate"] = round(throughput[cell_name] * p.mean_answer_tokens, 2)
        summary["goals"] = goals_for_profile(name, summary)
        entry = {"link": {"rtt_ms": link.rtt_ms, "jitter_ms_one_way": link.jitter_ms, "bandwidth_bps": link.bandwidth_bps},
                 "summary": summary, "load": load, "paper": _paper(summary)}  # fmt: skip
        if o.records:
            entry["records"] = {k: v["records"] for k, v in cells.items()}
            entry["plan_records"] = {k: v["records"] for k, v in plan_cells.items()}
        result["links"][name] = entry
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


def _f(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mix(mix: dict, n: int) -> str:
    return ", ".join(f"{k} {100 * v / max(1, n):.0f} %" for k, v in list(mix.items())[:3])


def format_table(result: dict) -> str:
    """Markdown: one table per link profile, then msao against the paper's claims. Every heading says SIMULATION."""
    p = result["profile"]
    c = result["config"]
    out = [f"## SIMULATION: {p['title']}", "", f"> {result['notice']}", "",
           f"Profile `{p['name']}` ({p['benchmark']}); {c['requests']} requests per policy, seed {c['seed']}; scheduler accuracy slack "
           f"{c['scheduler']['accuracy_slack']:g}, keep ratios {', '.join(f'{r:.3g}' for r in c['scheduler']['keep_ratios'])}; "
           f"throughput: highest Poisson rate with p95 <= {c['load_p95_bound_ms']:g} ms ({c['cloud_servers']} cloud server(s), no batching)."]  # fmt: skip
    for name, entry in result["links"].items():
        s, link = entry["summary"], entry["link"]
        out += ["", f"### SIMULATION, {name}: RTT {link['rtt_ms']:g} ms (± {2 * link['jitter_ms_one_way']:g}), {link['bandwidth_bps'] / 1e6:g} Mbit/s", "",
                "| policy | plans (share) | p50 ms | p95 ms | accuracy | up KB/req | by cloud | max rate req/s (p95 ≤ bound) |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for cell, m in s["metrics"].items():
            mark = " (best baseline)" if cell == s.get("best_baseline") else ""
            out.append(
                f"| {cell}{mark} | {_mix(m['plan_mix_detail'], m['n'])} | {_f(m['latency_ms_p50'])} | {_f(m['latency_ms_p95'])} | "
                f"{100 * m['accuracy']:.1f} | {m['uplink_bytes_per_request'] / 1e3:.1f} | {m['answered_by_cloud']:.2f} | "
                f"{_f(s['throughput_per_s'].get(cell), 2)} |"
            )
        o = s["oracle"]
        out.append(
            f"| oracle (bound) | {_mix(o['chosen_from'], o['n'])} | {_f(o['latency_ms_p50'])} | {_f(o['latency_ms_p95'])} | {100 * o['accuracy']:.1f} | | | |"
        )
    out += ["", "### SIMULATION against the paper's claims", "",
            "| link | msao p50 / best baseline (paper 0.70) | best baseline | msao p50 / cloud-only | msao throughput / cloud-only (paper 1.5–2.3) | msao − cloud-only accuracy, points (paper −0.2) | msao p50 / oracle |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, entry in result["links"].items():
        s, pp = entry["summary"], entry["paper"]
        out.append(
            f"| {name} | {_f(pp['p50_vs_best_baseline']['simulated'], 3)} | {s.get('best_baseline') or '–'} | {_f(pp['p50_vs_cloud_only']['simulated'], 3)} | "
            f"{_f(pp['throughput_vs_cloud_only']['simulated'], 2)} | {_f(pp['accuracy_minus_cloud_only_points']['simulated'], 2)} | "
            f"{_f(s.get('msao_ratios', {}).get('p50_vs_oracle'), 3)} |"
        )
    return "\n".join(out)


def default_out(p: SimProfile) -> Path:
    return ROOT / "bench" / "results" / f"simulate-{p.name}.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.simulate",
        description="SIMULATION: msao's real scheduler driven by a real model pair's published per-segment figures, at real scale "
        "(docs/simulation.md). Not a measurement: the benchmark is `make bench`.",
    )
    p.add_argument("--profile", metavar="FILE", help="simulation profile (default bench/profiles/llava15-7b-13b_orin-nx_vs_a100.toml)")
    p.add_argument("--out", metavar="JSON", help="results file (default bench/results/simulate-<profile name>.json)")
    p.add_argument(
        "--requests", type=int, default=1000, metavar="N",
        help="requests per policy per link profile (default 1000; more = tighter percentiles, slower)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated requests and noise (default 0)")
    p.add_argument("--links", metavar="A,B", help="comma-separated link profiles (default: all of testbed.PROFILES)")
    p.add_argument(
        "--load-requests", type=int, default=400, metavar="N",
        help="arrivals per offered rate in the throughput search (default 400; fewer = faster, noisier p95)",
    )  # fmt: skip
    p.add_argument(
        "--accuracy-slack", type=float, metavar="X",
        help="the scheduler's accuracy slack (default: msao's, 0.01 = one point): plans this far below the best may be chosen",
    )  # fmt: skip
    p.add_argument("--records", action="store_true", help="keep every simulated request in the JSON (tens of MB at the defaults)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.simulate [...]``: 0 when the table and JSON are written, 1 on bad input (with the fix), 2 on bad flags."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_from_args(args)
    except MsaoError as exc:
        print(f"bench.simulate: error: {exc}", file=sys.stderr)
        return 1


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed flags: the table on stdout, progress on stderr, the JSON at ``--out``.

    Raises:
        ConfigError: a bad flag value, an unknown link profile, or a profile that is missing or malformed.
    """
    if args.requests < 1 or args.load_requests < 10:
        raise ConfigError(f"--requests must be >= 1 and --load-requests >= 10, got {args.requests} and {args.load_requests}")
    p = load_sim_profile(Path(args.profile) if args.profile else DEFAULT_PROFILE)
    links = tuple(x for x in (args.links or ",".join(PROFILES)).split(",") if x)
    o = SimOptions(requests=args.requests, seed=args.seed, load_requests=args.load_requests, links=links,
                   accuracy_slack=args.accuracy_slack, records=args.records)  # fmt: skip
    result = run_simulation(p, o, progress=lambda m: print(m, file=sys.stderr, flush=True))
    out = Path(args.out) if args.out else default_out(p)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    print(f"SIMULATION results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
