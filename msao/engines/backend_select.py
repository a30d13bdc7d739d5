"""Per-segment backend choice: TensorRT where a usable engine exists, ONNX Runtime otherwise.

Owns the choice and the one log line per reason; knows nothing of how either backend runs a
segment. The edge daemon opens every local segment through ``AutoBackend``; a segment whose
engine is missing, stale, built for another TensorRT or GPU, or whose engine backend cannot
start (no TensorRT, no cuda-python, no GPU) runs on the fallback, and the reason is logged
once (INFO when the bundle simply has no engines, WARNING when engines exist but cannot be
used). ``placement`` records where each segment went, for logs and tests.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from msao.engines.backend import Backend, Runner
from msao.engines.engine_records import engine_sets_of
from msao.engines.manifest import SegmentSpec
from msao.errors import MsaoError

if TYPE_CHECKING:
    from msao.engines.bundle import Bundle

__all__ = ["AutoBackend"]

log = logging.getLogger(__name__)


def _tensorrt_backend() -> Backend:
    from msao.engines.tensorrt_backend import TensorRTBackend

    return TensorRTBackend()


class AutoBackend(Backend):
    """Opens each segment on the engine backend when it can, else on ``fallback``.

    Args:
        fallback: the backend every segment can run on (``OnnxRuntimeBackend``).
        engines: loader of the engine backend, called once, when the first bundle that has
            engines is opened (default: ``TensorRTBackend()``); an ``MsaoError`` it raises
            becomes the fallback reason for every segment.
    """

    name = "auto"

    def __init__(self, fallback: Backend, engines: Callable[[], Backend] = _tensorrt_backend):
        self.fallback = fallback
        self._load_engines = engines
        self._engines: Backend | None = None
        self._engines_error: str | None = None
        self._logged: set[str] = set()
        self.placement: dict[tuple[str, str], str] = {}  # (bundle name, segment) -> backend name
        self.reasons: dict[tuple[str, str], str] = {}  # (bundle name, segment) -> why it fell back

    def _engine_backend(self) -> Backend | None:
        if self._engines is None and self._engines_error is None:
            try:
                self._engines = self._load_engines()
            except MsaoError as exc:
                self._engines_error = str(exc)
        return self._engines

    def open(self, bundle: Bundle, spec: SegmentSpec) -> Runner:
        key = (bundle.manifest.name, spec.name)
        level = logging.WARNING
        try:
            has_engines = bool(engine_sets_of(bundle.root))
        except MsaoError as exc:
            has_engines, reason = False, str(exc)
        else:
            reason = f"no TensorRT engines (build them on this device: `msao build-engines --bundle {bundle.root}`)"
            if not has_engines:
                level = logging.INFO
        if has_engines:
            engines = self._engine_backend()
            if engines is None:
                reason = self._engines_error or "the engine backend did not start"
            else:
                try:
                    runner = engines.open(bundle, spec)
                except MsaoError as exc:
                    reason = str(exc)
                else:
                    self.placement[key] = engines.name
                    return runner
        if reason not in self._logged:
            self._logged.add(reason)
            log.log(level, "bundle %s: running on %s instead of TensorRT: %s", bundle.manifest.name, self.fallback.describe(), reason)
        self.placement[key] = self.fallback.name
        self.reasons[key] = reason
        return self.fallback.open(bundle, spec)

    def describe(self) -> str:
        used = Counter(self.placement.values())
        if self._engines is None or not used[self._engines.name]:
            return self.fallback.describe()
        parts = [f"{self._engines.describe()} ({used[self._engines.name]} segments)"]
        if used[self.fallback.name]:
            parts.append(f"{self.fallback.describe()} ({used[self.fallback.name]} segments)")
        return " + ".join(parts)
