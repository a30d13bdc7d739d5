"""Where local segments run: TensorRT where a matching engine exists and TensorRT starts, ONNX Runtime
otherwise, with the reason logged once. The engine backend here is a small real implementation
of msao's Backend interface that does the same bookkeeping as TensorRTBackend (find_engine,
read_engine_verified) and then runs the segment with ONNX Runtime."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest

from msao.edge_runtime.local_model import LocalModel
from msao.engines.backend import Backend, Runner
from msao.engines.backend_select import AutoBackend
from msao.engines.bundle import Bundle, load_bundle
from msao.engines.engine_records import EngineTarget, find_engine, read_engine_verified
from msao.engines.manifest import SegmentSpec
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.engines.tensorrt_backend import tensorrt_unavailable_reason
from msao.errors import MissingDependency
from tests.engines.trt_parts import ORIN_TRT10, write_engine_set

LOGGER = "msao.engines.backend_select"


class EngineBookkeepingBackend(Backend):
    """Opens a segment only if its engine record fits ``target`` and the plan's bytes verify."""

    name = "tensorrt"

    def __init__(self, target: EngineTarget = ORIN_TRT10):
        self.target = target
        self._ort = OnnxRuntimeBackend(OrtOptions(threads=1))
        self.opened: list[str] = []

    def open(self, bundle: Bundle, spec: SegmentSpec) -> Runner:
        _, record = find_engine(bundle, spec, self.target)
        read_engine_verified(bundle.root, record)
        self.opened.append(spec.name)
        return self._ort.open(bundle, spec)

    def describe(self) -> str:
        return f"tensorrt {self.target.tensorrt_version} {self.target.gpu_name}"


def _no_tensorrt() -> Backend:
    raise MissingDependency("TensorRT's Python bindings are not importable (test): `pip install tensorrt`")


@pytest.fixture()
def ort():
    return OnnxRuntimeBackend(OrtOptions(threads=1))


def _open_all(backend: Backend, bundle: Bundle) -> dict[str, Runner]:
    return {s.name: backend.open(bundle, s) for s in bundle.manifest.segments}


def test_without_engines_every_segment_runs_on_onnx_runtime_and_says_why_once(edge_bundle_copy, ort, caplog):
    bundle = load_bundle(edge_bundle_copy)
    auto = AutoBackend(ort, engines=_no_tensorrt)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _open_all(auto, bundle)
    assert set(auto.placement.values()) == {"onnxruntime"}
    lines = [r for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert "no TensorRT engines" in lines[0].getMessage() and "msao build-engines --bundle" in lines[0].getMessage()


def test_engines_without_tensorrt_fall_back_with_the_install_hint_logged_once(edge_bundle_copy, ort, caplog):
    write_engine_set(edge_bundle_copy)
    bundle = load_bundle(edge_bundle_copy)
    auto = AutoBackend(ort, engines=_no_tensorrt)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _open_all(auto, bundle)
    assert set(auto.placement.values()) == {"onnxruntime"}
    lines = [r for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "pip install tensorrt" in lines[0].getMessage()


@pytest.mark.skipif(
    tensorrt_unavailable_reason() is None, reason="TensorRT and a GPU are present: the missing-TensorRT path is not reachable"
)
def test_the_default_engine_backend_without_tensorrt_falls_back(edge_bundle_copy, ort, caplog):
    write_engine_set(edge_bundle_copy)
    auto = AutoBackend(ort)  # the real TensorRTBackend loader
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _open_all(auto, load_bundle(edge_bundle_copy))
    assert set(auto.placement.values()) == {"onnxruntime"}
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "python3-libnvinfer" in line or "GPU" in line or "CUDA" in line


def test_segments_with_matching_engines_run_on_them_and_the_rest_fall_back(edge_bundle_copy, ort, caplog):
    write_engine_set(edge_bundle_copy, segments=("vision_encoder", "decoder[0:1]", "decoder[1:2]"))
    bundle = load_bundle(edge_bundle_copy)
    engines = EngineBookkeepingBackend()
    auto = AutoBackend(ort, engines=lambda: engines)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _open_all(auto, bundle)
    on_trt = {seg for (_, seg), b in auto.placement.items() if b == "tensorrt"}
    assert on_trt == {"vision_encoder", "decoder[0:1]", "decoder[1:2]"} == set(engines.opened)
    assert auto.reasons[(bundle.manifest.name, "lm_head")].startswith(f"bundle {bundle.manifest.name}: ")
    assert "no engine for segment lm_head" in auto.reasons[(bundle.manifest.name, "lm_head")]
    assert "tensorrt 10.3.0 Orin (3 segments) + onnxruntime" in auto.describe()
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 3 and all("msao build-engines" in m for m in messages)  # text_embed, lm_head, exit_head@1


def test_engines_for_another_tensorrt_fall_back_with_the_rebuild_hint(edge_bundle_copy, ort, caplog):
    write_engine_set(edge_bundle_copy, target=dataclasses.replace(ORIN_TRT10, tensorrt_version="8.6.2"))
    bundle = load_bundle(edge_bundle_copy)
    auto = AutoBackend(ort, engines=lambda: EngineBookkeepingBackend(ORIN_TRT10))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _open_all(auto, bundle)
    assert set(auto.placement.values()) == {"onnxruntime"}
    (line,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "built with TensorRT 8.6.2, this is TensorRT 10.3.0" in line and "msao build-engines --bundle" in line


def test_an_altered_engine_falls_back_for_that_segment_only(edge_bundle_copy, ort):
    folder, _ = write_engine_set(edge_bundle_copy)
    (folder / "lm_head.engine").write_bytes(b"tampered")
    bundle = load_bundle(edge_bundle_copy)
    auto = AutoBackend(ort, engines=lambda: EngineBookkeepingBackend())
    _open_all(auto, bundle)
    fell_back = {seg for (_, seg), b in auto.placement.items() if b == "onnxruntime"}
    assert fell_back == {"lm_head"} and "altered or copied incompletely" in auto.reasons[(bundle.manifest.name, "lm_head")]


def test_the_edge_model_answers_through_the_chosen_backends(edge_bundle_copy, ort):
    write_engine_set(edge_bundle_copy, segments=("vision_encoder", "decoder[0:1]"))
    bundle = load_bundle(edge_bundle_copy)
    mixed = LocalModel(bundle, AutoBackend(ort, engines=lambda: EngineBookkeepingBackend()))
    plain = LocalModel(bundle, ort)
    rgb = np.full((64, 64, 3), 200, np.uint8)
    rgb[16:48, 16:48] = (220, 30, 30)
    answers = [m.answer(m.prepare(rgb, "what color is the shape?", 1.0), "what color is the shape?") for m in (mixed, plain)]
    assert answers[0].token_ids == answers[1].token_ids
    assert "tensorrt" in mixed.backend_description and "onnxruntime" in mixed.backend_description
