"""The scaled simulation (``python -m bench.simulate``, ``make bench-sim``) on the shipped profile, with few requests.

Checks what a reader of its numbers relies on: every figure says where it comes from; a job
with every draw at its mean costs exactly what the scheduler estimated (the simulated world is
the cost model plus noise, nothing else); every policy and link profile is in the result,
labelled SIMULATION; msao never takes a plan its own cost model rates worse than one it could
have taken; the oracle is never slower than any correct answer of any policy; the queues add
nothing at low load and serialise work at high load; the command's exit codes; the product never
imports the benchmark tree and the simulation only msao's public names.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import POLICIES
from bench.simprofile import DEFAULT_PROFILE, FIGURE_KINDS, load_sim_profile
from bench.simulate import SimOptions, build_scheduler, draft_commit_share, format_table, inputs, link_from_profile, mix_key, run_simulation
from bench.simworld import Job, closed_loop_ms, draw_requests, job_from_plan, mean_draws, run_open_loop
from msao.errors import ConfigError
from testbed import PROFILES

ROOT = Path(__file__).resolve().parents[2]
REL = 1e-9


@pytest.fixture(scope="module")
def profile():
    return load_sim_profile(DEFAULT_PROFILE)


@pytest.fixture(scope="module")
def result(profile):
    return run_simulation(profile, SimOptions(requests=60, load_requests=40, records=True))


SHIPPED = sorted(p for p in (ROOT / "bench" / "profiles").glob("*.toml") if not p.name.startswith("dilation_"))


def test_the_paper_pair_ships_for_both_jetsons():
    names = {p.stem for p in SHIPPED}
    assert {"qwen2-vl-2b_qwen25-vl-7b_orin-nx_vs_a100", "qwen2-vl-2b_qwen25-vl-7b_agx-orin_vs_a100"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_figure_of_every_shipped_profile_is_labelled_with_its_source(path):
    profile = load_sim_profile(path)
    assert len(profile.figures) >= 20 and profile.name == path.stem
    for f in profile.figures:
        assert f.kind in FIGURE_KINDS, f
        assert len(f.source) > 20, f
        if f.kind == "published":
            assert "[" in f.source or "http" in f.source, f"published figure {f.path} names no source: {f.source}"
        if f.kind == "derived":
            assert any(op in f.source for op in ("*", "/", "=")), f"derived figure {f.path} gives no formula: {f.source}"


def test_a_profile_number_without_a_source_is_refused(tmp_path):
    text = DEFAULT_PROFILE.read_text()
    broken = text.replace('value = 17.0\nkind = "published"\n', 'value = 17.0\nkind = "measured"\n', 1)
    broken = broken.replace(
        '[edge_device.mas_ms]\nvalue = 3.0\nkind = "derived"\nsource = ', '[edge_device.mas_ms]\nvalue = 3.0\nkind = "derived"\nnote = ', 1
    )
    assert 'kind = "measured"' in broken and "note = " in broken
    path = tmp_path / "broken.toml"
    path.write_text(broken)
    with pytest.raises(ConfigError) as exc:
        load_sim_profile(path)
    assert "edge_device.mas_ms: a figure needs exactly value, kind and source" in str(exc.value)
    assert "timing.large_on_cloud.decode_step_ms: kind 'measured' is not one of" in str(exc.value)


@pytest.mark.parametrize("link_name", list(PROFILES))
def test_with_every_draw_at_its_mean_each_plan_costs_exactly_its_estimate(profile, link_name):
    s = build_scheduler(profile)
    link = link_from_profile(link_name)
    d = mean_draws(profile.mean_answer_tokens, round(profile.image_bytes_mean))
    x = inputs(profile, link, d)
    plans = s.candidates(x) + [
        s.choose(x, policy, split_layer=k) for policy in POLICIES for k in (s.large.split_points if policy == "static_split" else (None,))
    ]
    assert {p.kind for p in plans} == {"edge", "local_large", "cloud", "split", "draft_verify", "speculative"}
    assert {p.upload for p in plans} == {"file", "jpeg@90", "jpeg@70", "jpeg@50"}  # the profile's upload forms are priced
    for plan in plans:
        if plan.kind == "cloud":  # what the world sends is what the plan priced, in every form
            assert job_from_plan(s, plan, link, d, profile.mas_ms, 0.0).bytes_up == pytest.approx(plan.est_uplink_bytes, rel=REL)
        share = draft_commit_share(s, plan)
        # a draft/verify plan commits with probability `share`: its estimate is the expectation over both outcomes
        committed = closed_loop_ms(job_from_plan(s, plan, link, dataclasses.replace(d, v=-1.0), profile.mas_ms, share))
        verified = closed_loop_ms(job_from_plan(s, plan, link, dataclasses.replace(d, v=2.0), profile.mas_ms, share))
        got = share * committed + (1 - share) * verified
        assert got == pytest.approx(plan.est_latency_ms, rel=REL), (
            f"{plan.describe()}: simulated {got} ms, estimated {plan.est_latency_ms} ms"
        )


def test_every_policy_and_link_profile_is_reported_and_labelled_simulation(result, profile):
    assert result["simulation"] is True and result["notice"].startswith("SIMULATION")
    assert set(result["links"]) == set(PROFILES)
    expected = {p for p in POLICIES if p != "static_split"} | {f"static_split@{k}" for k in profile.large.manifest.split_points}
    for name, entry in result["links"].items():
        s = entry["summary"]
        assert set(s["metrics"]) == expected, name
        assert set(s["throughput_per_s"]) == expected, name
        for cell, m in s["metrics"].items():
            assert m["n"] == 60 and m["latency_ms_p50"] > 0 and 0 <= m["accuracy"] <= 1, (name, cell)
            assert "edge_cpu_s_per_request" not in m  # not simulated: not reported
        assert s["oracle"]["n"] == 60 and s["best_baseline"] in expected
        assert set(entry["paper"]) == {
            "p50_vs_best_baseline",
            "p50_vs_cloud_only",
            "throughput_vs_cloud_only",
            "accuracy_minus_cloud_only_points",
        }
    json.loads(json.dumps(result))
    table = format_table(result)
    headings = [line for line in table.splitlines() if line.startswith("#")]
    assert len(headings) == 2 + len(PROFILES) and all("SIMULATION" in h for h in headings)


def test_msao_never_takes_a_plan_its_cost_model_rates_worse_than_another_it_could_take(result, profile):
    s = build_scheduler(profile)
    o = s.options
    draws = draw_requests(
        60, 0, profile.answer_tokens_pmf, profile.image_bytes_mean, profile.image_bytes_sigma, profile.edge_cv, profile.cloud_cv
    )
    for name, entry in result["links"].items():
        link = link_from_profile(name)
        records = entry["records"]
        for i, rec in enumerate(records["msao"]):
            x = inputs(profile, link, draws[i])
            assert rec["image_bytes"] == draws[i].image_bytes
            plans = s.candidates(x)
            floor = max(p.est_accuracy for p in plans) - o.accuracy_slack - 1e-9
            eligible = [p for p in plans if p.est_accuracy >= floor]
            fastest = min(p.est_latency_ms for p in eligible)
            assert rec["est_accuracy"] >= floor, (name, i, rec["plan"])
            assert rec["est_latency_ms"] <= fastest * (1 + o.latency_tolerance) + 1e-3, (name, i, rec["plan"])
            band = [p for p in eligible if p.est_latency_ms <= fastest * (1 + o.latency_tolerance) + 1e-9]
            assert round(rec["est_uplink_bytes"]) == min(round(p.est_uplink_bytes) for p in band), (name, i, rec["plan"])
            for cell, recs in records.items():  # no fixed policy offered an eligible plan the model rated clearly faster
                other = recs[i]
                if cell != "msao" and other["est_accuracy"] >= floor:
                    assert rec["est_latency_ms"] <= other["est_latency_ms"] * (1 + o.latency_tolerance) + 1e-3, (name, i, cell)


def test_the_oracle_is_never_slower_than_a_correct_answer_of_any_policy(result):
    for name, entry in result["links"].items():
        policies, plans = entry["records"], entry["plan_records"]
        n = len(policies["msao"])
        oracle = []
        for i in range(n):
            right = [recs[i]["latency_ms"] for recs in plans.values() if recs[i]["correct"]]
            oracle.append((min(right), True) if right else (policies["cloud_only"][i]["latency_ms"], policies["cloud_only"][i]["correct"]))
            for cell, recs in policies.items():
                if recs[i]["correct"]:
                    assert oracle[i][0] <= recs[i]["latency_ms"] + 1e-9, (name, i, cell)
        o = entry["summary"]["oracle"]
        assert o["accuracy"] == pytest.approx(sum(ok for _, ok in oracle) / n, abs=1e-4)
        assert all(o["accuracy"] >= m["accuracy"] for m in entry["summary"]["metrics"].values()), name
        ranked = sorted(ms for ms, _ in oracle)
        assert ranked[0] <= o["latency_ms_p50"] <= ranked[-1]


def test_at_low_load_queues_add_nothing_and_at_once_they_serialise_the_edge(profile):
    s = build_scheduler(profile)
    link = link_from_profile("lte")
    draws = draw_requests(
        12, 3, profile.answer_tokens_pmf, profile.image_bytes_mean, profile.image_bytes_sigma, profile.edge_cv, profile.cloud_cv
    )
    policies = ["msao", "edge_only", "cloud_only", "static_split", "draft_verify_static", "prune_only"] * 2
    jobs: list[Job] = []

    def make_job(i, _now, _state) -> Job:
        plan = s.choose(inputs(profile, link, draws[i]), policies[i], split_layer=s.large.split_points[0])
        jobs.append(job_from_plan(s, plan, link, draws[i], profile.mas_ms, draft_commit_share(s, plan)))
        return jobs[-1]

    apart = run_open_loop([i * 1e6 for i in range(12)], make_job, {"edge": 1, "uplink": 1, "downlink": 1, "cloud": 1})
    assert apart == pytest.approx([closed_loop_ms(j) for j in jobs], rel=REL)
    edge_jobs = [Job((("edge", 100.0),)), Job((("edge", 50.0),)), Job((("net", 30.0),))]
    together = run_open_loop([0.0, 0.0, 0.0], lambda i, _n, _s: edge_jobs[i], {"edge": 1, "cloud": 1})
    assert together == pytest.approx([100.0, 150.0, 30.0])


def _simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.simulate", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_python_m_bench_simulate_writes_a_labelled_table_and_json(tmp_path):
    out = tmp_path / "sim.json"
    r = _simulate("--requests", "20", "--load-requests", "20", "--links", "lte,paper-400", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("## SIMULATION:") and "### SIMULATION against the paper's claims" in r.stdout
    data = json.loads(out.read_text())
    assert data["simulation"] is True and list(data["links"]) == ["lte", "paper-400"]


def test_bad_input_fails_with_the_fix_and_bad_flags_with_usage(tmp_path):
    r = _simulate("--profile", str(tmp_path / "missing.toml"))
    assert r.returncode == 1 and "not found; shipped profiles are in bench/profiles/" in r.stderr
    r = _simulate("--links", "dialup", "--requests", "5")
    assert r.returncode == 1 and "unknown link profiles ['dialup']" in r.stderr
    r = _simulate("--requests", "0")
    assert r.returncode == 1 and "--requests must be >= 1" in r.stderr
    r = _simulate("--simulate")  # the old `msao bench --simulate` flag
    assert r.returncode == 2 and "usage: python -m bench.simulate" in r.stderr


def test_msao_bench_is_gone_and_says_where_the_benchmark_runs():
    r = subprocess.run([sys.executable, "-m", "msao", "bench", "--simulate"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "make bench" in r.stderr and "python -m bench.simulate" in r.stderr


def test_plan_mix_key_is_the_kind_with_the_split_layer(profile):
    s = build_scheduler(profile)
    x = inputs(profile, link_from_profile("lte"), mean_draws(profile.mean_answer_tokens, round(profile.image_bytes_mean)))
    plans = s.candidates(x) + [s.choose(x, "static_split", split_layer=k) for k in s.large.split_points]
    for plan in plans:
        assert mix_key(plan) == plan.describe().split(" ")[0]  # what the plan mix showed before, from the fields
    assert {mix_key(p) for p in plans} >= {"edge", "cloud", "draft_verify"} | {f"split@{k}" for k in s.large.split_points}


def _imports(root: Path) -> list[tuple[str, str]]:
    """(file:line, dotted name) of every module and name imported under ``root`` (``from m import n`` -> ``m.n``),
    ``importlib.import_module("m")`` and ``__import__("m")`` with a literal name included."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                out += [(where, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out += [(where, f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    out.append((where, node.args[0].value))
    return out


def test_the_product_never_imports_the_benchmark_and_the_benchmark_only_public_msao_names():
    into_bench = [f"{w}: {n}" for w, n in _imports(ROOT / "msao") if n == "bench" or n.startswith("bench.")]
    assert not into_bench, f"msao imports the benchmark tree: {into_bench}"
    msao_names = [(w, n) for w, n in _imports(ROOT / "bench") if n.startswith("msao.")]
    private = [f"{w}: {n}" for w, n in msao_names if any(x.startswith("_") and not x.endswith("__") for x in n.split("."))]
    assert not private, f"bench imports private msao names: {private}"
    cli = [f"{w}: {n}" for w, n in msao_names if n.startswith("msao.cli.")]
    assert not cli, f"bench imports the msao CLI (a command, not a library): {cli}"
