"""Fixtures of the edge runtime tests: the built-in bundles as ``LocalModel``s and a small train calibration."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def models(edge_bundle_dir: Path, cloud_bundle_dir: Path):
    """(edge model, large model), sharing one ONNX Runtime backend with one thread per session."""
    from msao.edge_runtime.local_model import LocalModel
    from msao.engines.bundle import LoadBundle
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions

    be = OnnxRuntimeBackend(OrtOptions(threads=1))
    edge, large = LocalModel(LoadBundle(edge_bundle_dir), be), LocalModel(LoadBundle(cloud_bundle_dir), be)
    yield edge, large
    edge.close()
    large.close()


@pytest.fixture(scope="session")
def calibration(models):
    """A real calibration on 60 train questions (the shipped one uses 2,000): enough for the tables' shape."""
    from msao.edge_runtime.calibration import CalibrateModels

    return CalibrateModels(*models, questions=60, keep_ratios=(1.0, 0.5, 0.25))
