"""Bookkeeping of built TensorRT engines: the sidecar file, its checks, and the refusal rules.

Pure Python (no tensorrt, no CUDA): the builder writes these records, the TensorRT backend and
the backend selection read them, and tests exercise every refusal on any machine.

Layout, inside a bundle, one folder per build target (TensorRT version × GPU):

    bundles/msao-tiny-edge/
      manifest.json                      the export; unchanged by `msao build-engines`
      decoder_0_1.onnx ...
      engines/trt10.3.0-sm87-orin/
        engines.json                     EngineSet: target, model hash, one EngineRecord per engine
        decoder_0_1.engine ...
        timing.cache                     the builder's timing cache (speeds up rebuilds)

Why a sidecar and not the manifest: engines are built on the device, after the bundle was
exported and copied; writing them into ``manifest.json`` would change a verified file on one
machine only (the edge's and the cloud's copies would then differ, and the next ``rsync``
would undo it), and would make every copy of the bundle require engines that only one GPU can
use. The manifest stays the export's record; ``load_bundle`` verifies exactly what it lists.
The sidecar ties each engine to that verified export instead: it records the sha256 of the
ONNX file the engine was built from and the bundle's model hash, and the engine's own sha256,
which is checked on the bytes handed to TensorRT. Trust is the same as for the manifest:
these hashes catch altered, truncated or stale files, not a writer who rewrites both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from msao.engines.bundle import Bundle, safe_relative_path
from msao.engines.manifest import SegmentSpec
from msao.engines.tensorrt_profiles import ShapeProfile
from msao.errors import BundleError, EngineMismatch, HashMismatch

__all__ = [
    "ENGINES_DIR",
    "RECORD_FORMAT",
    "SIDECAR_NAME",
    "EngineRecord",
    "EngineSet",
    "engine_sets_of",
    "EngineTarget",
    "find_engine",
    "jetpack_from_l4t",
    "read_engine_verified",
    "read_l4t_release",
    "save_engine_set",
]

ENGINES_DIR = "engines"
SIDECAR_NAME = "engines.json"
RECORD_FORMAT = 1
MAX_SIDECAR_BYTES = 4 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# L4T release (``/etc/nv_tegra_release``) -> JetPack; informational only (refusals use the
# TensorRT version and the GPU). Extend when NVIDIA ships a release; unknown -> "".
_JETPACK_OF_L4T = {"36.2": "6.0 DP", "36.3": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "38.2": "7.0"}


def _strict(cls, d: dict) -> dict:
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    if set(d) - names:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(set(d) - names)}")
    return d


@dataclass(frozen=True)
class EngineTarget:
    """What an engine is bound to. TensorRT plans run only under the TensorRT version that
    built them and on the GPU model they were tuned for (no version- or hardware-compatible
    build flags are used: they cost speed, and the edge builds its own engines anyway).

    Attributes:
        tensorrt_version: ``tensorrt.__version__`` at build time, e.g. "10.3.0".
        gpu_name: CUDA device name, e.g. "Orin" or "NVIDIA H200".
        compute_capability: "major.minor", e.g. "8.7".
        l4t_release: from ``/etc/nv_tegra_release`` on a Jetson ("36.4.0"); "" elsewhere.
        jetpack: the JetPack release of that L4T, when known ("6.1"); "" otherwise.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    l4t_release: str = ""
    jetpack: str = ""

    def __post_init__(self) -> None:
        if not self.tensorrt_version or not self.gpu_name or not re.match(r"^\d+\.\d+$", self.compute_capability):
            raise ValueError(f"engine target needs a TensorRT version, a GPU name and a compute capability like 8.7, got {self}")

    @property
    def tag(self) -> str:
        """Folder name under ``engines/``: ``trt10.3.0-sm87-orin``."""
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-") or "gpu"
        return f"trt{self.tensorrt_version}-sm{self.compute_capability.replace('.', '')}-{gpu}"

    def describe(self) -> str:
        jetson = f", L4T {self.l4t_release}" + (f" (JetPack {self.jetpack})" if self.jetpack else "") if self.l4t_release else ""
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} (sm {self.compute_capability}{jetson})"

    def mismatches(self, here: EngineTarget) -> list[str]:
        """Why an engine built for ``self`` cannot run on ``here`` (empty: it can)."""
        out = []
        if self.tensorrt_version != here.tensorrt_version:
            out.append(f"built with TensorRT {self.tensorrt_version}, this is TensorRT {here.tensorrt_version}")
        if (self.gpu_name, self.compute_capability) != (here.gpu_name, here.compute_capability):
            out.append(
                f"built for {self.gpu_name} (sm {self.compute_capability}), this GPU is {here.gpu_name} (sm {here.compute_capability})"
            )
        return out

    @classmethod
    def from_dict(cls, d: dict) -> EngineTarget:
        return cls(**{k: str(v) for k, v in _strict(cls, d).items()})


@dataclass(frozen=True)
class EngineRecord:
    """One built engine.

    Attributes:
        segment: the segment name in the manifest (``decoder[0:1]``).
        file: bundle-relative path of the plan (``engines/<tag>/decoder_0_1.engine``).
        sha256 / size_bytes: of the plan file, checked on the bytes given to TensorRT.
        onnx_file / onnx_sha256: the verified ONNX file it was built from, as the manifest
            lists it; a re-exported bundle makes the engine stale.
        fp16: built with FP16 kernels allowed (I/O stays as the manifest says).
        workspace_mb: builder workspace limit.
        profiles: the optimisation profiles, in engine order.
        build_s: wall time of the build.
    """

    segment: str
    file: str
    sha256: str
    size_bytes: int
    onnx_file: str
    onnx_sha256: str
    fp16: bool
    workspace_mb: int
    profiles: tuple[ShapeProfile, ...]
    build_s: float = 0.0

    def __post_init__(self) -> None:
        if not (_SHA256.match(self.sha256) and _SHA256.match(self.onnx_sha256)):
            raise ValueError(f"engine {self.segment}: sha256 values must be 64 lower-case hex digits")
        if not self.file.startswith(ENGINES_DIR + "/"):
            raise ValueError(f"engine {self.segment}: file {self.file!r} must lie under {ENGINES_DIR}/")
        if self.size_bytes < 0 or self.workspace_mb < 0:
            raise ValueError(f"engine {self.segment}: negative size")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["profiles"] = [p.to_dict() for p in self.profiles]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EngineRecord:
        d = dict(_strict(cls, d))
        d["profiles"] = tuple(ShapeProfile.from_dict(p) for p in d.get("profiles", ()))
        d["fp16"] = bool(d["fp16"])
        return cls(**d)


@dataclass(frozen=True)
class EngineSet:
    """The engines of one bundle for one target: the content of one ``engines.json``."""

    format_version: int
    bundle: str
    model_hash: str
    target: EngineTarget
    built_at: str
    built_by: str
    engines: tuple[EngineRecord, ...]

    def __post_init__(self) -> None:
        if self.format_version != RECORD_FORMAT:
            raise ValueError(f"format_version {self.format_version}, this msao reads {RECORD_FORMAT}")
        names = [e.segment for e in self.engines]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate engines for segments {names}")

    def record(self, segment: str) -> EngineRecord | None:
        return next((e for e in self.engines if e.segment == segment), None)

    def to_dict(self) -> dict:
        return {**asdict(self), "target": asdict(self.target), "engines": [e.to_dict() for e in self.engines]}

    @classmethod
    def from_dict(cls, d: dict) -> EngineSet:
        d = dict(_strict(cls, d))
        d["target"] = EngineTarget.from_dict(d["target"])
        d["engines"] = tuple(EngineRecord.from_dict(e) for e in d["engines"])
        return cls(**d)


def engine_sets_of(root: Path) -> tuple[tuple[Path, EngineSet], ...]:
    """Every ``engines/<tag>/engines.json`` of the bundle at ``root`` (none: an empty tuple).

    Raises:
        BundleError: a sidecar is a link, too large, not JSON or not an ``EngineSet``.
    """
    folder = Path(root) / ENGINES_DIR
    if not folder.is_dir() or folder.is_symlink():
        return ()
    out = []
    for path in sorted(folder.glob(f"*/{SIDECAR_NAME}")):
        if path.is_symlink() or path.parent.is_symlink() or path.stat().st_size > MAX_SIDECAR_BYTES:
            raise BundleError(f"{path}: not a plain engine record file; delete {path.parent} and run `msao build-engines --bundle {root}`")
        try:
            out.append((path.parent, EngineSet.from_dict(json.loads(path.read_bytes()))))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{path}: malformed engine record ({exc}); run `msao build-engines --bundle {root}` again") from exc
    return tuple(out)


def find_engine(bundle: Bundle, spec: SegmentSpec, here: EngineTarget) -> tuple[EngineSet, EngineRecord]:
    """The engine for ``spec`` built for this target from this export of the bundle.

    Raises:
        BundleError: no engines at all, or none for this segment (build them).
        EngineMismatch: engines exist but for another TensorRT version or GPU, or from
            another export (the ONNX file or the model hash changed since the build).
    """
    root, m = bundle.root, bundle.manifest
    rebuild = f"rebuild on this device with `msao build-engines --bundle {root}`"
    sets = engine_sets_of(root)
    if not sets:
        raise BundleError(
            f"bundle {m.name}: no TensorRT engines under {root / ENGINES_DIR}; build them on this device with `msao build-engines --bundle {root}`"
        )
    usable = [(folder, s) for folder, s in sets if not s.target.mismatches(here)]
    if not usable:
        found = "; ".join(f"{folder.name}: " + ", ".join(s.target.mismatches(here)) for folder, s in sets)
        raise EngineMismatch(f"bundle {m.name}: no engine set fits {here.describe()} ({found}); {rebuild}")
    folder, chosen = max(usable, key=lambda fs: fs[1].built_at)
    if chosen.model_hash != m.model_hash:
        raise EngineMismatch(
            f"bundle {m.name}: engines in {folder} were built from another export (model hash {chosen.model_hash[:12]}…, "
            f"bundle has {m.model_hash[:12]}…); {rebuild}"
        )
    record = chosen.record(spec.name)
    if record is None:
        raise BundleError(f"bundle {m.name}: {folder} has no engine for segment {spec.name}; {rebuild}")
    onnx_sha = m.file(spec.file).sha256
    if record.onnx_file != spec.file or record.onnx_sha256 != onnx_sha:
        raise EngineMismatch(
            f"bundle {m.name}, segment {spec.name}: engine built from {record.onnx_file} sha256 {record.onnx_sha256[:12]}…, "
            f"the bundle now has {spec.file} sha256 {onnx_sha[:12]}… (re-exported); {rebuild}"
        )
    return chosen, record


def read_engine_verified(root: Path, record: EngineRecord) -> bytes:
    """The plan bytes, hashed as read: what TensorRT deserialises is what was recorded.

    Raises:
        HashMismatch: size or sha256 differ from the record (altered or half-copied).
        BundleError: the path escapes the bundle or goes through a link; the file is missing.
    """
    path = safe_relative_path(Path(root), record.file)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: engine file missing; run `msao build-engines --bundle {root}`") from exc
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != record.size_bytes or digest != record.sha256:
        raise HashMismatch(
            f"{path}: {len(data)} bytes sha256 {digest[:12]}…, its record says {record.size_bytes} bytes sha256 {record.sha256[:12]}…; "
            f"the engine was altered or copied incompletely: rebuild with `msao build-engines --bundle {root}`"
        )
    return data


def save_engine_set(folder: Path, engine_set: EngineSet) -> Path:
    """Write ``engines.json`` atomically (a reader sees the old or the new file, never half)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".engines-", suffix=".json", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(engine_set.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
    dst = folder / SIDECAR_NAME
    os.replace(tmp, dst)
    return dst


def read_l4t_release(path: Path = Path("/etc/nv_tegra_release")) -> str:
    """L4T release of a Jetson ("36.4.0"), from the first line ``# R36 (release), REVISION: 4.0, ...``; "" elsewhere."""
    try:
        first = path.read_text(encoding="utf-8", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return ""
    found = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    return f"{found.group(1)}.{found.group(2)}" if found else ""


def jetpack_from_l4t(l4t: str) -> str:
    """JetPack release of an L4T release, most specific match first; "" when unknown."""
    parts = l4t.split(".")
    for n in range(len(parts), 1, -1):
        hit = _JETPACK_OF_L4T.get(".".join(parts[:n]))
        if hit:
            return hit
    return ""
