"""Test parts for the TensorRT bookkeeping: engine records written with msao's own API.

``write_engine_set`` writes what ``msao build-engines`` writes, except that each "plan" is a few
placeholder bytes: the bookkeeping (targets, hashes, staleness) never looks inside a plan.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

from msao.engines.bundle import load_bundle
from msao.engines.engine_records import ENGINES_DIR, RECORD_FORMAT, EngineRecord, EngineSet, EngineTarget, save_engine_set
from msao.engines.tensorrt_profiles import profiles_for_segment

ORIN_TRT10 = EngineTarget("10.3.0", "Orin", "8.7", "36.4.0", "6.1")


def write_engine_set(bundle_dir: Path, target: EngineTarget = ORIN_TRT10, segments: tuple[str, ...] | None = None) -> tuple[Path, EngineSet]:
    """Records (and placeholder plan files) for ``segments`` (default all) of the bundle, for ``target``."""
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    folder = Path(bundle_dir) / ENGINES_DIR / target.tag
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for spec in m.segments:
        if segments is not None and spec.name not in segments:
            continue
        rel = f"{ENGINES_DIR}/{target.tag}/{PurePosixPath(spec.file).stem}.engine"
        plan = f"plan of {spec.name} for {target.tag}".encode()
        (Path(bundle_dir) / rel).write_bytes(plan)
        records.append(
            EngineRecord(
                segment=spec.name,
                file=rel,
                sha256=hashlib.sha256(plan).hexdigest(),
                size_bytes=len(plan),
                onnx_file=spec.file,
                onnx_sha256=m.file(spec.file).sha256,
                fp16=False,
                workspace_mb=256,
                profiles=profiles_for_segment(spec, m.model),
                build_s=0.1,
            )
        )
    engine_set = EngineSet(RECORD_FORMAT, m.name, m.model_hash, target, "2026-01-01T00:00:00+00:00", "msao test", tuple(records))
    save_engine_set(folder, engine_set)
    return folder, engine_set
