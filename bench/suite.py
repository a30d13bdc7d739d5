"""The whole benchmark: the paper's regime, the resident regime and the fleet, in one run, one results file.

    make bench          # python -m bench.suite --quick   (<= 15 min on 2 cores)
    make bench-full     # python -m bench.suite           (about 80 minutes on 2 cores)

1. **paper**: the scenes pair, each edge daemon holding only the small model
   (``--large-on-edge false``) and dilated per kind of work as an Orin NX relates to an A100
   (bench/profiles/dilation_orin-nx_vs_a100.toml); every policy the regime allows under every
   link profile, the hindsight oracle and the best baseline (``bench.run``).
2. **resident**: the easy-VQA pair, the edge holding both models at a quarter of a core (or
   time-dilated where cgroups are not writable), as the earlier runs measured it.
3. **fleet**: four paper-regime edges on one cloud worker, cloud_only vs msao up a Poisson rate
   ladder (``bench.fleet``): the throughput goal, where the cloud is what saturates.

Writes ``bench/results/bench-<UTC time>.json`` (each regime's result whole, the fleet's, and
issue 19's goal table; every cell says its regime, dilation factors, edges and workers), the
same without per-request records as ``bench-<UTC time>-summary.json`` (what is committed), plots
per regime beside it, and prints the tables. Benchmarks, not tests: the numbers move with load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.fleet import FleetConfig, plot, report, run_fleet
from bench.report import format_table
from bench.run import ORIN_PROFILE, PAPER, ROOT, BenchConfig, run_bench
from bench.summary import paper_goals

__all__ = ["SuiteConfig", "full_suite", "goals_table", "quick_suite", "run_suite", "summary_only"]


@dataclass(frozen=True)
class SuiteConfig:
    """The three parts of one run; None skips a part."""

    paper: BenchConfig | None = field(default_factory=lambda: BenchConfig(**PAPER))
    resident: BenchConfig | None = field(default_factory=BenchConfig)
    fleet: FleetConfig | None = field(default_factory=lambda: FleetConfig(dilation_profile=str(ROOT / ORIN_PROFILE)))


def quick_suite() -> SuiteConfig:
    """`make bench`: every link in the paper regime, lte and congested in the resident one, a five-step fleet ladder to 104/s.

    The ladder's top is past where the full run saw both policies refuse (96/s, 2026-12-08), so
    the quick fleet finds a ceiling instead of reporting a lower bound.
    """
    paper = BenchConfig(**{**PAPER, "requests": 40, "warmup": 3, "stream_questions": 20})
    resident = BenchConfig(
        profiles=("lte", "congested"), requests=40, warmup=3, load_profiles=("lte",), load_rates=(10.0, 20.0, 40.0),
        load_seconds=5.0, stream_questions=20,
    )  # fmt: skip
    fleet = FleetConfig(dilation_profile=str(ROOT / ORIN_PROFILE), rates=(2.0, 8.0, 14.0, 20.0, 26.0), duration_s=8.0)
    return SuiteConfig(paper, resident, fleet)


def full_suite() -> SuiteConfig:
    """`make bench-full`: 300 requests per paper cell, the resident regime as bench.run runs it, the whole fleet ladder."""
    return SuiteConfig(paper=BenchConfig(**{**PAPER, "requests": 300}))


def run_suite(config: SuiteConfig, out: Path) -> dict:
    """Each part in turn; the JSON is rewritten after each, so an interrupted run keeps what it measured."""
    result: dict = {"benchmark": "suite", "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "regimes": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, bench in (("paper", config.paper), ("resident", config.resident)):
        if bench is not None:
            print(f"==> the {name} regime", file=sys.stderr)
            result["regimes"][name] = run_bench(bench, out.parent / f"{out.stem}-{name}.json")
            out.write_text(json.dumps(result, indent=1))
    if config.fleet is not None:
        print(f"==> the fleet: {config.fleet.edges} edges, 1 worker, {config.fleet.link}", file=sys.stderr)
        result["fleet"] = run_fleet(config.fleet, out.parent / f"{out.stem}-fleet-work")
    if "paper" in result["regimes"]:
        result["goals"] = paper_goals(result["regimes"]["paper"], result.get("fleet"))
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out.write_text(json.dumps(result, indent=1))
    out.with_name(out.stem + "-summary.json").write_text(json.dumps(summary_only(result), indent=1))
    for name in result["regimes"]:
        (out.parent / f"{out.stem}-{name}.json").unlink(missing_ok=True)  # the whole result is in ``out`` now
    return result


def summary_only(result: dict) -> dict:
    """The result without per-request records (megabytes per run): what a repository keeps; the tables need nothing more."""
    slim = json.loads(json.dumps(result))
    for regime in slim["regimes"].values():
        for profile in regime["profiles"].values():
            for cell in profile.get("cells", {}).values():
                cell.pop("records", None)
    return slim


def goals_table(rows: list[dict]) -> str:
    """Issue 19's goals as Markdown: value, bound, met."""
    lines = ["| goal | link | measured | bound | met |", "|---|---|---|---|---|"]
    for r in rows:
        met = ("–" if r["met"] is None else "yes" if r["met"] else "**no**") + (f" ({r['note']})" if r.get("note") else "")
        value = "–" if r["value"] is None else f"{r['value']:g}"
        lines.append(f"| {r['goal']} | {r['link']} | {value} | {'≤' if r['at_most'] else '≥'} {r['bound']:g} | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="`make bench`: fewer requests per cell, a shorter fleet ladder (<= 15 min)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: paper, resident, fleet")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/bench-<UTC date-time>.json)")
    ap.add_argument("--no-plots", action="store_true", help="write the JSON only")
    a = ap.parse_args(argv)
    skip = {s for s in a.skip.split(",") if s}
    if skip - {"paper", "resident", "fleet"}:
        ap.error(f"--skip takes paper, resident, fleet; got {sorted(skip)}")
    config = quick_suite() if a.quick else full_suite()
    config = replace(config, **{part: None for part in skip})
    if config.resident is not None:
        from testbed import throttle_unavailable_reason

        if (why := throttle_unavailable_reason()) is not None:
            print(f"    no CPU quota here ({why}): the resident edge is time-dilated x4 instead", file=sys.stderr)
            config = replace(config, resident=replace(config.resident, edge_share=None, edge_dilation=4.0))
    out = a.out or ROOT / "bench" / "results" / ("bench-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + ".json")
    result = run_suite(config, out)
    for name, regime in result["regimes"].items():
        print(f"\n## the {name} regime\n" + format_table(regime))
        if not a.no_plots:
            from bench.plots import write_plots

            for path in write_plots(regime, out.parent / f"{out.stem}-plots" / name):
                print(f"plot: {path}", file=sys.stderr)
    if "fleet" in result:
        print("\n## the fleet\n" + report(result["fleet"]))
        if not a.no_plots:
            (out.parent / f"{out.stem}-plots").mkdir(parents=True, exist_ok=True)
            plot(result["fleet"], out.parent / f"{out.stem}-plots" / "fleet.png")
    if "goals" in result:
        print("\n## issue 19's goals (paper regime)\n" + goals_table(result["goals"]))
    print(f"results: {out}", file=sys.stderr)
    return 0 if all(c["lost"] == 0 for c in result.get("fleet", {}).get("cells", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
