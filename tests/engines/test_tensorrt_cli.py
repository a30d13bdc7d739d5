"""``msao build-engines`` without TensorRT fails at once, saying what to install where."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_no_tensorrt = pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is importable here: the missing-TensorRT path is not reachable")


def _build_engines(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "msao", "build-engines", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return r, time.perf_counter() - t0


@needs_no_tensorrt
def test_build_engines_without_tensorrt_fails_at_once_with_what_to_install():
    r, _ = _build_engines("--bundle", "bundles/msao-tiny-edge")
    assert r.returncode != 0
    err = r.stderr
    assert err.startswith("msao build-engines: error: TensorRT's Python bindings are not importable"), err
    assert "python3-libnvinfer" in err and "--system-site-packages" in err  # Jetson: JetPack's bindings, seen from the venv
    assert "pip install tensorrt" in err  # x86 with a GPU
    assert "Traceback" not in err


@needs_no_tensorrt
def test_tensorrt_is_checked_before_the_bundle_is_read(tmp_path: Path):
    r, seconds = _build_engines("--bundle", str(tmp_path / "no-such-bundle"), "--fp16")
    assert r.returncode == 1 and "TensorRT's Python bindings are not importable" in r.stderr
    assert "no manifest.json" not in r.stderr and not (tmp_path / "no-such-bundle").exists()
    assert seconds < 30, f"took {seconds:.1f} s: the check must come before any heavy work"


def test_help_states_the_consequences_of_the_limits():
    r = subprocess.run([sys.executable, "-m", "msao", "build-engines", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    flat = " ".join(r.stdout.split())
    for flag in ("--fp16", "--workspace MB", "--timing-cache PATH", "--max-batch N", "--max-seq N", "--max-past N"):
        assert flag in flat
    assert "more KV memory" in flat
