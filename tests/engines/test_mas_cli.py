"""MAS from the shell: ``msao eval --keep-policy/--keep-ratio`` and ``msao explain``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def msao(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msao", *args], capture_output=True, text=True, cwd=ROOT)


def test_eval_with_a_keep_policy_reports_it_and_its_cost(edge_bundle_dir: Path):
    r = msao(
        "eval",
        "--bundle",
        str(edge_bundle_dir),
        "--keep-policy",
        "mas",
        "--keep-ratio",
        "0.25",
        "--limit",
        "40",
        "--threads",
        "1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["keep_policy"] == "mas" and rep["keep_ratio"] == 0.25 and rep["kept_tokens_mean"] == 16
    assert 0.3 < rep["accuracy"] <= 1.0
    assert rep["mas_ms_mean"] > 0 and 0 < rep["mas_share_of_end_to_end"] < rep["mas_share_of_vision"] + 1


def test_eval_keep_ratio_alone_means_mas_and_default_keeps_everything(edge_bundle_dir: Path):
    r = msao("eval", "--bundle", str(edge_bundle_dir), "--keep-ratio", "0.5", "--limit", "5", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["keep_policy"] == "mas"
    r = msao("eval", "--bundle", str(edge_bundle_dir), "--limit", "5", "--threads", "1", "--json")
    rep = json.loads(r.stdout)
    assert rep["keep_policy"] is None and rep["kept_tokens_mean"] == 64 and rep["mas_ms_mean"] == 0


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1", "nan"])
def test_eval_refuses_a_keep_ratio_outside_0_1(edge_bundle_dir: Path, ratio: str):
    r = msao("eval", "--bundle", str(edge_bundle_dir), "--keep-policy", "random", "--keep-ratio", ratio, "--limit", "3")
    assert r.returncode == 1 and "keep_ratio must be in (0, 1]" in r.stderr and "Traceback" not in r.stderr


def test_explain_writes_a_heat_map_png(edge_bundle_dir: Path, easyvqa_test, tmp_path: Path):
    from PIL import Image

    img = tmp_path / "q.png"
    img.write_bytes(easyvqa_test.image_pngs[0])
    out = tmp_path / "heat.png"
    r = msao(
        "explain",
        "--bundle",
        str(edge_bundle_dir),
        "--image",
        str(img),
        "--question",
        "what color is the shape?",
        "--out",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert len(info["kept"]) == 16 and info["n_tokens"] == 64 and info["content_words"] == ["color", "shape"]
    assert 0 <= info["mas"]["image"] <= 1 and info["mas"]["image_necessity"] == 1.0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width >= 2 * 64 * 4 and im.height > im.width // 2
        px = np.asarray(im.convert("RGB"))
    assert (np.abs(px.astype(int) - (60, 255, 120)).sum(-1) == 0).sum() > 100  # kept-token outlines are drawn


def test_explain_refuses_an_empty_question_and_a_bad_ratio(edge_bundle_dir: Path, easyvqa_test, tmp_path: Path):
    img = tmp_path / "q.png"
    img.write_bytes(easyvqa_test.image_pngs[0])
    r = msao("explain", "--bundle", str(edge_bundle_dir), "--image", str(img), "--question", " ", "--out", str(tmp_path / "h.png"))
    assert r.returncode == 1 and "empty question" in r.stderr and "Traceback" not in r.stderr
    r = msao(
        "explain",
        "--bundle",
        str(edge_bundle_dir),
        "--image",
        str(img),
        "--question",
        "what?",
        "--out",
        str(tmp_path / "h.png"),
        "--keep-ratio",
        "2",
    )
    assert r.returncode == 1 and "keep_ratio must be in (0, 1]" in r.stderr


def test_help_lists_explain_and_mas_modules_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import msao.engines.mas, msao.engines.mas_text, msao.engines.mas_cuda, msao.engines.mas_render\n"
        "import msao.engines.keep_policy, msao.engines.token_cache, msao.datasets.streams, msao.cli.explain_cmd\n"
        "from msao.cli import main\nmain(['--help'])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "explain" in r.stdout and "heat-map" in r.stdout
