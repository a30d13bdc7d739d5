"""A bundle with a tampered file is refused before any ONNX Runtime session exists, in-process and by the CLIs.

The tampering is the kind a check of sizes or of "is it valid ONNX" would miss: one segment
file replaced by another valid ONNX file of the same size. Sessions are counted at
onnxruntime's own ``InferenceSession`` (a third-party boundary), and the same count on the
intact bundle shows the counter sees sessions at all. More loader refusals (flipped byte,
missing file, paths outside the bundle, links, unknown manifest keys, a file changed after
verification) are in tests/engines/test_bundle.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import onnxruntime
import pytest

from msao.edge_runtime.local_model import LocalModel
from msao.engines.bundle import load_bundle
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import HashMismatch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def tampered(built_bundles, tmp_path: Path) -> tuple[Path, str, bytes]:
    """(a copy of the edge bundle with one segment file swapped for a same-sized valid ONNX file, its name, its original bytes)."""
    dst = tmp_path / "bundle"
    shutil.copytree(built_bundles[0], dst)
    by_size: dict[int, list[Path]] = defaultdict(list)
    for f in sorted(dst.glob("*.onnx")):
        by_size[f.stat().st_size].append(f)
    pair = next((fs for fs in by_size.values() if len(fs) >= 2 and fs[0].read_bytes() != fs[1].read_bytes()), None)
    assert pair is not None, f"no two different segment files of one size in {dst}: {dict(by_size)}"
    victim, donor = pair[0], pair[1]
    original = victim.read_bytes()
    victim.write_bytes(donor.read_bytes())
    return dst, victim.name, original


@pytest.fixture()
def sessions(monkeypatch) -> list[object]:
    """Every ``onnxruntime.InferenceSession`` created during the test, in order."""
    made: list[object] = []
    real = onnxruntime.InferenceSession

    def counting(*args, **kwargs):
        s = real(*args, **kwargs)
        made.append(s)
        return s

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    return made


def test_swapped_segment_is_refused_before_any_onnx_session(tampered, sessions):
    bundle, name, original = tampered
    with pytest.raises(HashMismatch, match=rf"{name}: sha256 .*manifest says"):
        LocalModel(load_bundle(bundle), OnnxRuntimeBackend(OrtOptions(threads=1)))
    assert sessions == [], f"{len(sessions)} ONNX Runtime session(s) were created from a bundle that failed verification"
    (bundle / name).write_bytes(original)  # control: the intact bundle does open sessions, and the counter sees them
    model = LocalModel(load_bundle(bundle), OnnxRuntimeBackend(OrtOptions(threads=1)))
    model.close()
    assert len(sessions) >= 4, len(sessions)


@pytest.mark.parametrize("command", ["cloud", "edge"])
def test_daemons_refuse_a_tampered_bundle_at_start(tampered, built_bundles, command: str):
    bundle, name, _ = tampered
    args = ["--bundle", str(bundle), "--broker", "mqtt://127.0.0.1:9"]  # port 9 (discard): nothing is ever sent there
    if command == "edge":
        args += ["--large-bundle", str(built_bundles[1]), "--edge-id", "edge-a"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSAO_")}
    r = subprocess.run([sys.executable, "-m", "msao", "-v", command, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert f"msao {command}: error: bundle {bundle} failed verification" in r.stderr and name in r.stderr, r.stderr[-3000:]
    assert "run on" not in r.stderr and "runs on" not in r.stderr and "connected to" not in r.stderr, (
        "a session was opened or the broker contacted"
    )
