"""The benchmark tests' bundles folder: the built-in pair and its calibration under the names the harness looks for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_bundles(tmp_path_factory, edge_bundle_dir: Path, cloud_bundle_dir: Path, calibration) -> Path:
    from msao.edge_runtime.calibration import save_calibration

    root = tmp_path_factory.mktemp("bench-bundles")
    shutil.copytree(edge_bundle_dir, root / "msao-tiny-edge")
    shutil.copytree(cloud_bundle_dir, root / "msao-tiny-cloud")
    save_calibration(calibration, root / "calibration.json")
    return root
