"""Session fixtures: the built-in models exported for real into temporary bundles.

Exports here check fewer end-to-end questions than `make export` (20 instead of 200) and
profile briefly, to keep the suite fast; every segment is still compared with PyTorch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FAST_EXPORT = dict(check_questions=20, profile_repeats=2)


def _export(name: str, root: Path) -> Path:
    from msao.export.exporter import ExportOptions, export_bundle

    out = root / name
    export_bundle(name, out, ExportOptions(**FAST_EXPORT), progress=lambda _m: None)
    return out


@pytest.fixture(scope="session")
def edge_bundle_dir(tmp_path_factory) -> Path:
    return _export("msao-tiny-edge", tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def cloud_bundle_dir(tmp_path_factory) -> Path:
    return _export("msao-tiny-cloud", tmp_path_factory.mktemp("bundles"))


@pytest.fixture()
def edge_bundle_copy(edge_bundle_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the edge bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(edge_bundle_dir, dst)
    return dst


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A Mosquitto of this test module's own, so workers of one module never take another's jobs."""
    from testbed import start_broker

    b = start_broker(tmp_path_factory.mktemp("broker"))
    yield b
    b.stop()


@pytest.fixture(scope="session")
def easyvqa_test():
    from msao.datasets.easyvqa import load_easy_vqa

    return load_easy_vqa("test")


@pytest.fixture(scope="session")
def models(edge_bundle_dir: Path, cloud_bundle_dir: Path):
    """(edge model, large model), sharing one ONNX Runtime backend with one thread per session."""
    from msao.edge_runtime.local_model import LocalModel
    from msao.engines.bundle import load_bundle
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions

    be = OnnxRuntimeBackend(OrtOptions(threads=1))
    edge, large = LocalModel(load_bundle(edge_bundle_dir), be), LocalModel(load_bundle(cloud_bundle_dir), be)
    yield edge, large
    edge.close()
    large.close()


@pytest.fixture(scope="session")
def calibration(models):
    """A real calibration on 60 train questions (the shipped one uses 2,000): enough for the tables' shape."""
    from msao.edge_runtime.calibration import calibrate_models

    return calibrate_models(*models, questions=60, keep_ratios=(1.0, 0.5, 0.25))
