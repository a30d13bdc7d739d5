"""ONNX segments -> TensorRT engines, built on the device that will run them (``msao build-engines``).

Owns the build: parse each verified ONNX file, add the optimisation profiles that
``tensorrt_profiles`` derives from the manifest, optionally allow FP16 kernels, reuse and
extend a persistent timing cache, write the plans and their ``engines.json`` record. Knows
nothing of how engines are run (``tensorrt_backend``) or chosen (``backend_select``).

Per segment:

    bundle.read_verified(onnx) ─OnnxParser─► network ─┬─ profiles (min/opt/max per dynamic input)
                                                       ├─ workspace limit, FP16 flag
                                                       └─ timing cache (shared by every segment)
                                                     ─build_serialized_network─► plan ─► engines/<tag>/<stem>.engine

Uses only builder calls present in TensorRT 8.6 and 10.x; the one difference handled is the
network flag (explicit batch must be asked for in 8.6 and is the only mode in 10).
Untested on hardware here: there was no GPU or TensorRT where this was written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from msao import __version__
from msao.engines.bundle import Bundle, load_bundle
from msao.engines.engine_records import ENGINES_DIR, RECORD_FORMAT, EngineRecord, EngineSet, EngineTarget, engine_sets_of, save_engine_set
from msao.engines.manifest import SegmentSpec
from msao.engines.tensorrt_backend import current_target, import_tensorrt
from msao.engines.tensorrt_profiles import ProfileLimits, ShapeProfile, profiles_for_segment
from msao.errors import BundleError, ConfigError, EngineBuildFailed

__all__ = ["build_engines", "BuildOptions", "engine_from_onnx", "TIMING_CACHE_NAME"]

log = logging.getLogger(__name__)

TIMING_CACHE_NAME = "timing.cache"


@dataclass(frozen=True)
class BuildOptions:
    """Attributes:
    fp16: allow FP16 kernels (I/O stays as the manifest says); faster on Orin, less exact.
    workspace_mb: builder scratch memory limit; larger allows more tactics (Jetson memory is shared with the CPU).
    timing_cache: cache file to read and extend; None = ``engines/<tag>/timing.cache``.
    limits: dynamic-dim limits for the optimisation profiles.
    segments: build only these segments (by manifest name); empty = all.
    device: CUDA device ordinal.
    check_ops: check each ONNX file against the published operator support first (needs ``onnx``; warnings only).
    verbose: TensorRT's builder log at INFO.
    """

    fp16: bool = False
    workspace_mb: int = 1024
    timing_cache: Path | None = None
    limits: ProfileLimits = field(default_factory=ProfileLimits)
    segments: tuple[str, ...] = ()
    device: int = 0
    check_ops: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.workspace_mb < 1:
            raise ConfigError(f"workspace must be at least 1 MB, got {self.workspace_mb}")


def engine_from_onnx(
    trt, builder, logger, onnx: bytes, onnx_path: Path, profiles: tuple[ShapeProfile, ...], options: BuildOptions, cache
) -> bytes:
    """One serialised plan from ONNX bytes (``onnx_path`` locates external weights, if any).

    Args:
        trt / builder / logger: the ``tensorrt`` module, a ``trt.Builder`` and its logger.
        cache: a timing cache shared by every build of the run (None: no cache).

    Raises:
        EngineBuildFailed: with the parser's errors, or when the builder returns no plan.
    """
    explicit = 0 if int(trt.__version__.split(".")[0]) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx, str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildFailed(
            f"{onnx_path}: TensorRT {trt.__version__}'s ONNX parser refused it:\n  - " + "\n  - ".join(errors or ["(no message)"])
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if cache is not None:
        config.set_timing_cache(cache, False)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for r in p.inputs:
            prof.set_shape(r.name, r.min, r.opt, r.max)
        config.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildFailed(
            f"{onnx_path}: TensorRT {trt.__version__} built no engine (see its log above); "
            "try a larger --workspace, smaller --max-seq/--max-past, or without --fp16"
        )
    return bytes(plan)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + "-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _timing_cache(trt, builder, path: Path):
    """(config that owns it, cache): the file's cache when TensorRT accepts it, else an empty one."""
    owner = builder.create_builder_config()
    data = path.read_bytes() if path.is_file() else b""
    cache = owner.create_timing_cache(data)
    if data and (cache is None or not owner.set_timing_cache(cache, False)):
        log.warning("timing cache %s is from another TensorRT or GPU; starting an empty one", path)
        cache = owner.create_timing_cache(b"")
    return owner, cache


def _check_ops(bundle: Bundle, segments: list[SegmentSpec], line: str) -> None:
    try:
        from msao.engines.tensorrt_ops import check_onnx_ops
    except ImportError:  # pragma: no cover - module is ours; onnx is imported inside check_onnx_ops
        return
    for spec in segments:
        try:
            report = check_onnx_ops(bundle.path_of(spec.file), (line,))
        except ImportError:
            log.info("onnx is not installed: skipping the operator check (TensorRT's parser still checks)")
            return
        if report.problems.get(line):
            log.warning(
                "%s: TensorRT %s's published support suggests the parser will refuse: %s", spec.name, line, "; ".join(report.problems[line])
            )


def build_engines(
    bundle_dir: Path, options: BuildOptions = BuildOptions(), progress: Callable[[str], None] = log.info
) -> tuple[Path, EngineSet]:
    """Build an engine per segment of the bundle at ``bundle_dir`` for this TensorRT and GPU.

    Engines of segments not rebuilt are kept when they are for this target and export.

    Returns:
        (the ``engines/<tag>`` folder, its ``EngineSet`` as written to ``engines.json``).

    Raises:
        MissingDependency / GpuUnavailable: no TensorRT, cuda-python or GPU.
        BundleError: the bundle fails verification or a named segment does not exist.
        EngineBuildFailed: TensorRT refused a segment (nothing is recorded for it).
    """
    trt = import_tensorrt()
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    target: EngineTarget = current_target(trt, options.device)
    folder = bundle.root / ENGINES_DIR / target.tag
    folder.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in m.segments]
    unknown = sorted(set(options.segments) - set(names))
    if unknown:
        raise BundleError(f"bundle {m.name} has no segments {unknown}; it has: {', '.join(names)}")
    todo = [s for s in m.segments if not options.segments or s.name in options.segments]
    plans = {s.name: profiles_for_segment(s, m.model, options.limits) for s in todo}  # limit errors before any build
    if options.check_ops:
        _check_ops(bundle, todo, "8.6" if trt.__version__.startswith("8.") else "10")

    logger = trt.Logger(trt.Logger.INFO if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = options.timing_cache or folder / TIMING_CACHE_NAME
    cache_owner, cache = _timing_cache(trt, builder, cache_path)  # the owner config stays alive while the cache is used
    progress(f"building {len(todo)} engine(s) for {m.name} with {target.describe()}{', FP16' if options.fp16 else ''} into {folder}")
    records: dict[str, EngineRecord] = {}
    for i, spec in enumerate(todo, 1):
        for rel in spec.external_data:
            bundle.read_verified(rel)  # external weights are read by path: check them first
        onnx = bundle.read_verified(spec.file)
        progress(f"[{i}/{len(todo)}] {spec.name}: {len(plans[spec.name])} profile(s): " + "; ".join(p.describe() for p in plans[spec.name]))
        t0 = time.perf_counter()
        plan = engine_from_onnx(trt, builder, logger, onnx, bundle.path_of(spec.file), plans[spec.name], options, cache)
        build_s = time.perf_counter() - t0
        rel = f"{ENGINES_DIR}/{target.tag}/{PurePosixPath(spec.file).stem}.engine"
        _write_atomic(bundle.root / rel, plan)
        records[spec.name] = EngineRecord(
            segment=spec.name, file=rel, sha256=hashlib.sha256(plan).hexdigest(), size_bytes=len(plan), onnx_file=spec.file,
            onnx_sha256=m.file(spec.file).sha256, fp16=options.fp16, workspace_mb=options.workspace_mb,
            profiles=plans[spec.name], build_s=round(build_s, 3),
        )  # fmt: skip
        progress(f"[{i}/{len(todo)}] {spec.name}: built in {build_s:.1f} s, {len(plan) / 1e6:.2f} MB")
        _write_atomic(cache_path, bytes(cache.serialize()))  # after every engine: an interrupted build keeps its timings
    del cache_owner, builder

    for old_folder, old in engine_sets_of(bundle.root):
        if old_folder == folder and not old.target.mismatches(target) and old.model_hash == m.model_hash:
            for rec in old.engines:
                if (
                    rec.segment not in records
                    and rec.segment in names
                    and rec.onnx_sha256 == m.file(bundle.segment(rec.segment).file).sha256
                ):
                    records[rec.segment] = rec
    engine_set = EngineSet(
        format_version=RECORD_FORMAT, bundle=m.name, model_hash=m.model_hash, target=target,
        built_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), built_by=f"msao {__version__}",
        engines=tuple(records[n] for n in names if n in records),
    )  # fmt: skip
    save_engine_set(folder, engine_set)
    progress(f"wrote {folder / 'engines.json'}: {len(engine_set.engines)} of {len(names)} segments have engines")
    return folder, engine_set
