"""The msao command as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def msao(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msao", *args], capture_output=True, text=True, cwd=ROOT)


def test_help_lists_subcommands():
    r = msao("--help")
    assert r.returncode == 0
    for cmd in ("train", "export", "eval", "ask"):
        assert cmd in r.stdout


def test_the_cli_has_the_product_subcommands_and_no_benchmark():
    from msao.cli import SUBCOMMANDS

    expected = ["train", "export", "build-engines", "eval", "ask", "explain", "cloud", "calibrate", "edge"]
    assert list(SUBCOMMANDS) == expected
    help_lines = msao("--help").stdout.splitlines()
    listed = [line.split()[0] for line in help_lines if line.startswith("    ") and not line.startswith("     ")]  # one per subcommand
    assert listed == expected
    r = msao("bench", "--simulate")  # the old entry point: refused with where the benchmark went
    assert r.returncode == 2 and "make bench-sim" in r.stderr and "python -m bench.simulate" in r.stderr


def test_eval_json_is_machine_readable(edge_bundle_dir: Path):
    r = msao("eval", "--bundle", str(edge_bundle_dir), "--limit", "50", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["n"] == 50 and 0.5 < report["accuracy"] <= 1.0
    assert report["latency_ms_p50"] > 0 and set(report["accuracy_by_kind"]) <= {"shape", "colour", "yes/no"}


def test_eval_on_scenes_reports_accuracy_per_question_family(edge_bundle_dir: Path):
    from msao.datasets.scenes import QuestionFamily

    r = msao("eval", "--bundle", str(edge_bundle_dir), "--dataset", "scenes", "--limit", "20", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["dataset"] == "scenes" and report["split"] == "test" and report["n"] == 20
    kinds = set(report["accuracy_by_kind"])
    assert len(kinds) >= 3 and kinds <= {f.value for f in QuestionFamily}  # the scenes families, not easy-VQA's kinds
    r = msao("eval", "--bundle", str(edge_bundle_dir), "--split", "validation", "--limit", "5")
    assert r.returncode == 1 and "easy-vqa has splits train, test, not 'validation'" in r.stderr


def test_eval_of_an_exit_head_the_bundle_lacks_says_which_exist(edge_bundle_dir: Path):
    r = msao("eval", "--bundle", str(edge_bundle_dir), "--limit", "5", "--exit-layer", "7")
    assert r.returncode == 1 and "exit heads after layers [1], not 7" in r.stderr


def test_ask_answers_from_an_image_file(edge_bundle_dir: Path, easyvqa_test, tmp_path: Path):
    img = tmp_path / "q.png"
    img.write_bytes(easyvqa_test.image_pngs[0])
    r = msao("ask", "--bundle", str(edge_bundle_dir), "--image", str(img), "--question", "what color is the shape?", "--json")
    assert r.returncode == 0, r.stderr
    ans = json.loads(r.stdout)
    assert ans["text"] == "red" and ans["kept_tokens"] == 64


def test_ask_with_a_corrupt_image_fails_clearly(edge_bundle_dir: Path, tmp_path: Path):
    img = tmp_path / "bad.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    r = msao("ask", "--bundle", str(edge_bundle_dir), "--image", str(img), "--question", "what color?")
    assert r.returncode == 1 and "cannot decode image" in r.stderr and "Traceback" not in r.stderr


def test_eval_on_a_damaged_bundle_fails_before_running(edge_bundle_copy: Path):
    (edge_bundle_copy / "vision_encoder.onnx").write_bytes(b"oops")
    r = msao("eval", "--bundle", str(edge_bundle_copy), "--limit", "5")
    assert r.returncode == 1 and "vision_encoder.onnx" in r.stderr and "Traceback" not in r.stderr


def test_json_logs_are_one_object_per_line_with_their_fields():
    import json as _json
    import logging

    from msao.cli import JsonLogFormatter

    record = logging.LogRecord("msao.edge_runtime.runtime", logging.INFO, __file__, 1, "request %s: done", ("r1",), None)
    record.request_id = "r1"
    record.plan = "edge keep=1"
    line = JsonLogFormatter().format(record)
    out = _json.loads(line)
    assert out["message"] == "request r1: done" and out["request_id"] == "r1" and out["plan"] == "edge keep=1"
    assert out["level"] == "INFO" and "\n" not in line
