"""Fuzz the parsers of untrusted bytes for a fixed time each and print what ran: atheris on x86-64, Hypothesis elsewhere.

    .venv/bin/python -m tests.fuzz.run_fuzz --seconds 60                 # every target, 60 s each
    .venv/bin/python -m tests.fuzz.run_fuzz --seconds 10 --targets codec,chunks --engine hypothesis

Targets are in ``tests/fuzz/targets.py``; each starts from the bad-input corpus (``tests/corpus``)
plus a few valid inputs. atheris (libFuzzer, coverage-guided over the instrumented ``msao``
package) runs each target in its own process with an RSS limit, so a memory blow-up is a
finding too; findings are written to ``--out`` (default ``$TMPDIR/msao-fuzz-findings/``). Without atheris
(not installed, or not x86-64) a Hypothesis loop runs the same targets on random bytes and
mutations of the seeds for the same time. Exits 1 if any target found something.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RSS_LIMIT_MB = 2048  # libFuzzer kills (and reports) a run above this
PER_INPUT_TIMEOUT_S = 10


def seed_inputs(target: str) -> list[bytes]:
    """The corpus cases and valid inputs a target starts from."""
    from tests.corpus.corpus import load_cases
    from tests.corpus.make_corpus import GOOD_B64, GOOD_PNG, Q

    good_request = json.dumps({"question": Q, "image": GOOD_B64, "deadline_ms": 2000}).encode()
    if target == "edge_request":
        out = [b"\n".join(f"{k}={v}".encode() for k, v in c["properties"]) + b"\n\n" + c.data for c in load_cases("edge_request")]
        return out + [good_request, b"question=" + Q.encode() + b"\n\n" + GOOD_PNG]
    if target == "chat_body":
        return [c.data for c in load_cases("http_chat")]
    if target == "codec":
        import numpy as np

        from msao.cloud_bridge.codec import payload_from_tensors
        from msao.cloud_bridge.messages import JobHeader

        md = JobHeader("fuzz-job", "ab" * 32, "split", 4e9, segment="decoder[1:2]").to_metadata()
        good = payload_from_tensors({"hidden_states": np.ones((1, 2, 8), np.float32), "position_ids": np.arange(2)[None]}, md)
        return [c.data for c in load_cases("job")] + [good, payload_from_tensors({"x": np.arange(300, dtype=np.float16)}, md, compress=True)]
    if target == "chunks":
        return [b"\n".join(f"{ch['property']}|{ch['bytes']}".encode() for ch in c["chunks"]) for c in load_cases("chunk")] + [
            b"m:0:2:10:5|5\nm:1:2:10:5|5"
        ]
    if target == "image":
        return [c.data for c in load_cases("image")] + [GOOD_PNG]
    return [c["value"].encode("utf-8", "surrogatepass") for c in load_cases("topic")] + [b"cam-1", b"ab" * 32]


# -- atheris ------------------------------------------------------------------------------------


def atheris_unavailable_reason() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"atheris runs on x86-64 here, this is {platform.machine()}"
    try:
        import atheris  # noqa: F401
    except ImportError as exc:
        return f"atheris is not installed ({exc}); pip install atheris (a wheel exists for CPython 3.8-3.11 on x86-64 Linux)"
    return ""


def _atheris_child(target: str, seconds: float, out: Path, work: Path) -> None:
    """In a fresh process: instrument msao, then libFuzzer over one target until ``seconds`` pass."""
    import atheris

    with atheris.instrument_imports(include=["msao", "tests.fuzz.targets", "PIL"]):
        from tests.fuzz.targets import TARGETS

        if target == "image":  # Pillow's format plugins are Python: instrument them too (decode_image imports PIL lazily)
            from PIL import Image

            Image.init()
    fn = TARGETS[target]
    seeds = work / "seeds"
    seeds.mkdir()
    for i, data in enumerate(seed_inputs(target)):
        (seeds / f"seed-{i:04d}").write_bytes(data)
    (work / "new").mkdir()
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], f"-max_total_time={int(seconds)}", "-print_final_stats=1", f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-timeout={PER_INPUT_TIMEOUT_S}", "-max_len=131072", f"-artifact_prefix={out}/{target}-", str(work / "new"), str(seeds)]  # fmt: skip
    atheris.Setup(args, fn)
    atheris.Fuzz()


def run_atheris(target: str, seconds: float, out: Path) -> dict:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"msao-fuzz-{target}-") as work:
        cmd = [sys.executable, "-m", "tests.fuzz.run_fuzz", "--child", target, "--seconds", str(seconds), "--out", str(out), "--work", work]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds * 3 + 120)
    log = p.stdout + p.stderr
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", log) or re.search(r"Done (\d+) runs", log)
    cov = re.findall(r"cov: (\d+)", log)
    crash = re.search(r"(Uncaught Python exception|==\d+== ERROR: libFuzzer: [^\n]*)", log)
    finding = ""
    if p.returncode != 0 or crash:
        finding = crash.group(0) if crash else f"exit {p.returncode}"
        start = log.find("Traceback")
        if start >= 0:  # the Python traceback, up to libFuzzer's next report line
            tb = log[start:]
            cut = re.search(r"\n(==\d+==|INFO:|MS: )", tb)
            finding += "\n" + tb[: cut.start() if cut else 2000].rstrip()
        artifacts = sorted(out.glob(f"{target}-*"))
        if artifacts:
            finding += f"\ninput: {artifacts[-1]}"
    return {"target": target, "engine": "atheris", "seconds": round(time.monotonic() - t0, 1), "executions": int(m.group(1)) if m else 0,
            "coverage": int(cov[-1]) if cov else None, "finding": finding}  # fmt: skip


# -- Hypothesis fallback -------------------------------------------------------------------------


def run_hypothesis(target: str, seconds: float, out: Path) -> dict:
    """Batches of Hypothesis examples (random bytes, mutated seeds) until ``seconds`` pass."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from tests.fuzz.targets import TARGETS
    from tests.strategies import mutated

    fn = TARGETS[target]
    seeds = seed_inputs(target)
    count = [0]

    def run(data: bytes) -> None:
        count[0] += 1
        fn(data)

    strategy = st.binary(max_size=4096) | st.sampled_from(seeds).flatmap(mutated) | st.sampled_from(seeds).flatmap(mutated).flatmap(mutated)
    batch = settings(max_examples=500, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                     suppress_health_check=list(HealthCheck))(given(strategy)(run))  # fmt: skip
    t0 = time.monotonic()
    finding = ""
    while time.monotonic() - t0 < seconds:
        try:
            batch()
        except Exception as exc:  # a finding: Hypothesis has shrunk it; keep the message and stop this target
            finding = f"{type(exc).__name__}: {exc}"[:1500]
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{target}-hypothesis.txt").write_text(finding)
            break
    return {"target": target, "engine": "hypothesis", "seconds": round(time.monotonic() - t0, 1), "executions": count[0], "coverage": None,
            "finding": finding}  # fmt: skip


def main() -> int:
    if "--child" in sys.argv:  # before anything imports msao: atheris must instrument it on import
        child = argparse.ArgumentParser()
        for flag, kind in (("--child", str), ("--seconds", float), ("--out", Path), ("--work", Path)):
            child.add_argument(flag, type=kind, required=True)
        a, _ = child.parse_known_args()
        _atheris_child(a.child, a.seconds, a.out, a.work)
        return 0
    from tests.fuzz.targets import TARGETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="time per target (default 60)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    ap.add_argument(
        "--engine", choices=("auto", "atheris", "hypothesis"), default="auto", help="auto: atheris where it runs, else Hypothesis"
    )
    ap.add_argument(
        "--out", type=Path, default=Path(tempfile.gettempdir()) / "msao-fuzz-findings", help="where findings (inputs) are written"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        ap.error(f"unknown targets {unknown}; choose from {list(TARGETS)}")
    reason = atheris_unavailable_reason()
    engine = args.engine if args.engine != "auto" else ("hypothesis" if reason else "atheris")
    if engine == "atheris" and reason:
        ap.error(reason)
    if reason and args.engine == "auto":
        print(f"fuzz: {reason}; using the Hypothesis loop", flush=True)
    results = []
    for t in targets:
        print(f"fuzz: {t} with {engine} for {args.seconds:g} s ...", flush=True)
        results.append((run_atheris if engine == "atheris" else run_hypothesis)(t, args.seconds, args.out))
    print(f"\n{'target':<14}{'engine':<12}{'seconds':>9}{'executions':>12}{'exec/s':>9}{'coverage':>10}  finding")
    for r in results:
        rate = r["executions"] / r["seconds"] if r["seconds"] else 0.0
        cov = "" if r["coverage"] is None else str(r["coverage"])
        print(
            f"{r['target']:<14}{r['engine']:<12}{r['seconds']:>9.1f}{r['executions']:>12}{rate:>9.0f}{cov:>10}  {r['finding'].splitlines()[0] if r['finding'] else 'none'}"
        )
    for r in results:
        if r["finding"]:
            print(f"\n{r['target']}: {r['finding']}")
    if args.json:
        args.json.write_text(json.dumps({"engine": engine, "python": platform.python_version(), "results": results}, indent=1) + "\n")
    return 1 if any(r["finding"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
