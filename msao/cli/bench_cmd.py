"""``msao bench``: the benchmark lives in the source tree; ``--simulate`` runs its scaled simulation.

The real benchmark is process-level (a broker, a cloud worker, a throttled edge daemon per
policy, shaped links): ``make bench`` from a checkout. ``msao bench --simulate`` drives msao's
real scheduler with a real model pair's published per-segment figures (``bench/profiles/``)
over the same link profiles, and labels everything it writes SIMULATION. Both live in
``bench/``, which is not installed with the package: this command finds the checkout msao runs
from (an editable install, or the current directory) and says so when there is none.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--simulate", action="store_true",
        help="run the scaled SIMULATION (msao's scheduler + a real model pair's published figures); without it, this command points to `make bench`",
    )  # fmt: skip
    p.add_argument("--profile", metavar="FILE", help="simulation profile (default bench/profiles/llava15-7b-13b_orin-nx_vs_a100.toml)")
    p.add_argument("--out", metavar="JSON", help="results file (default bench/results/simulate-<profile name>.json)")
    p.add_argument(
        "--requests",
        type=int,
        default=1000,
        metavar="N",
        help="requests per policy per link profile (default 1000; more = tighter percentiles, slower)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated requests and noise (default 0)")
    p.add_argument("--links", metavar="A,B", help="comma-separated link profiles (default: all of bench.shaping_proxy.PROFILES)")
    p.add_argument(
        "--load-requests", type=int, default=400, metavar="N",
        help="arrivals per offered rate in the throughput search (default 400; fewer = faster, noisier p95)",
    )  # fmt: skip
    p.add_argument(
        "--accuracy-slack", type=float, metavar="X",
        help="the scheduler's accuracy slack (default: msao's, 0.01 = one point): plans this far below the best may be chosen",
    )  # fmt: skip
    p.add_argument("--records", action="store_true", help="keep every simulated request in the JSON (tens of MB at the defaults)")


def _simulator():
    """``bench.simulate`` from the checkout msao runs from; ``ConfigError`` with the fix when there is none."""
    import importlib
    import sys
    from pathlib import Path

    import msao
    from msao.errors import ConfigError

    try:
        return importlib.import_module("bench.simulate")
    except ModuleNotFoundError as exc:
        if exc.name not in ("bench", "bench.simulate"):
            raise
    for root in (Path(msao.__file__).resolve().parents[1], Path.cwd()):
        if (root / "bench" / "simulate.py").is_file():
            sys.path.insert(0, str(root))
            sys.modules.pop("bench", None)
            return importlib.import_module("bench.simulate")
    raise ConfigError(
        "the simulation lives in the source tree (bench/), which is not installed with msao; "
        "clone the repository and run `msao bench --simulate` (or `python -m bench.simulate`) from its root"
    )


def run(args: argparse.Namespace) -> int:
    import sys

    if not args.simulate:
        print(
            "msao bench: the benchmark is process-level and runs from a source checkout: `make bench` (about 10 minutes on 2 cores) "
            "or `make bench-full`; see docs/benchmarks.md.\n"
            "`msao bench --simulate` runs the scaled SIMULATION instead (docs/simulation.md).",
            file=sys.stderr,
        )
        return 2
    return int(_simulator().run_from_args(args))
