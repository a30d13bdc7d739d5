"""ONNX Runtime backend: CUDA / TensorRT execution providers when present, CPU otherwise."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from msao.engines.backend import Backend, Runner
from msao.engines.manifest import SegmentSpec
from msao.errors import MissingDependency

if TYPE_CHECKING:
    from msao.engines.bundle import Bundle

__all__ = ["OnnxRuntimeBackend", "OrtOptions", "PREFERRED_PROVIDERS"]

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class OrtOptions:
    """Session settings.

    Attributes:
        threads: intra-op threads per session (0 = ONNX Runtime decides). On a 2-core box
            several sessions share cores; 1-2 avoids oversubscription.
        providers: execution providers in priority order; None = the best available of
            ``PREFERRED_PROVIDERS``.
        optimization: "all", "extended", "basic" or "disabled" graph optimisation.
        spin: let a session's idle intra-op threads spin-wait for work. Off by default: a
            request runs several sessions in turn (embedding, decoder chunks, head), and each
            one's spinning threads take the cores from the next (measured on the Qwen2-VL-2B
            widths decode, 2 cores, 2026-12-07 beside a test run: 221 -> 153 ms per token with
            spinning off; docs/qwen.md).
    """

    threads: int = 2
    providers: tuple[str, ...] | None = None
    optimization: str = "all"
    spin: bool = False

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.optimization not in ("all", "extended", "basic", "disabled"):
            raise ValueError(f"optimization must be all/extended/basic/disabled, got {self.optimization!r}")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependency("ONNX Runtime is not installed: pip install 'msao[edge]' (or 'msao[cloud]')") from exc
    return onnxruntime


class _OrtRunner(Runner):
    def __init__(self, spec: SegmentSpec, session):
        super().__init__(spec)
        self._session = session
        self._outputs = [t.name for t in spec.outputs]
        self.providers = tuple(session.get_providers())

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._session.run(self._outputs, feeds)
        return dict(zip(self._outputs, values))

    def close(self) -> None:
        self._session = None


class OnnxRuntimeBackend(Backend):
    """Runs segments with ONNX Runtime sessions built from hash-verified bytes."""

    name = "onnxruntime"

    def __init__(self, options: OrtOptions = OrtOptions()):
        ort = _ort()
        self.options = options
        available = ort.get_available_providers()
        wanted = options.providers or PREFERRED_PROVIDERS
        self.providers = tuple(p for p in wanted if p in available)
        if not self.providers:
            raise MissingDependency(f"none of the providers {wanted} is available (ONNX Runtime has {available})")
        self._logged = False

    def describe(self) -> str:
        return f"onnxruntime {_ort().__version__} {','.join(self.providers)} threads={self.options.threads}"

    def open(self, bundle: Bundle, spec: SegmentSpec) -> Runner:
        ort = _ort()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.options.optimization]
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.options.spin else "0")
        if spec.external_data:
            # External data is read by path; every referenced file was hash-checked by load_bundle.
            for rel in spec.external_data:
                bundle.read_verified(rel)
            session = ort.InferenceSession(str(bundle.path_of(spec.file)), so, providers=list(self.providers))
        else:
            session = ort.InferenceSession(bundle.read_verified(spec.file), so, providers=list(self.providers))
        runner = _OrtRunner(spec, session)
        if not self._logged:
            log.info("onnxruntime %s: segments run on %s", ort.__version__, ", ".join(runner.providers))
            self._logged = True
        return runner
