"""The bundle: a folder of segment files plus ``manifest.json``, and the loader that trusts nothing.

A bundle is what crosses from the workstation to the edge and the cloud. The manifest names
every file with its sha256 and size; ``load_bundle`` checks paths (relative, inside the bundle,
no ``..``, no links), sizes and hashes of every listed file before any model file is parsed,
and refuses unknown manifest keys, so a half-written or altered bundle never half-loads.
Model bytes are handed to backends through ``Bundle.read_verified``, which hashes exactly the
bytes it returns (no window between check and use).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from msao.engines.manifest import MANIFEST_NAME, FileEntry, Manifest, SegmentSpec
from msao.errors import BundleError, HashMismatch

__all__ = ["Bundle", "load_bundle", "safe_relative_path", "sha256_of_file", "verify_files"]

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_CHUNK = 1 << 20


def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def safe_relative_path(root: Path, rel: str) -> Path:
    """Resolve ``rel`` inside ``root``; refuse absolute paths, ``..``, backslashes and links.

    Raises:
        BundleError: the path could escape the bundle or passes through a symbolic link.
    """
    p = PurePosixPath(rel)
    if not rel or "\\" in rel or "\x00" in rel or p.is_absolute() or any(part in ("..", "") for part in rel.split("/")):
        raise BundleError(f"bundle path {rel!r} is not a plain relative path inside the bundle; re-export the bundle")
    full = root
    for part in p.parts:
        full = full / part
        if full.is_symlink():
            raise BundleError(f"bundle path {rel!r} goes through a symbolic link ({full}); bundles must hold plain files")
    return full


def verify_files(root: Path, files: tuple[FileEntry, ...]) -> None:
    """Check every listed file's path, type, size and sha256; raise once with every problem."""
    problems: list[str] = []
    for entry in files:
        try:
            path = safe_relative_path(root, entry.path)
        except BundleError as exc:
            problems.append(str(exc))
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            problems.append(f"{entry.path}: missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{entry.path}: not a regular file")
        elif st.st_size != entry.size_bytes:
            problems.append(f"{entry.path}: {st.st_size} bytes, manifest says {entry.size_bytes}")
        elif (digest := sha256_of_file(path)) != entry.sha256:
            problems.append(f"{entry.path}: sha256 {digest[:16]}…, manifest says {entry.sha256[:16]}…")
    if problems:
        cls = HashMismatch if all("sha256" in p or "bytes" in p for p in problems) else BundleError
        raise cls(
            f"bundle {root} failed verification ({len(problems)} problem(s)):\n  - "
            + "\n  - ".join(problems)
            + "\nthe bundle was altered or copied incompletely; copy it again or re-run `msao export`"
        )


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. Construct with ``load_bundle``."""

    root: Path
    manifest: Manifest

    def segment(self, name: str) -> SegmentSpec:
        for seg in self.manifest.segments:
            if seg.name == name:
                return seg
        names = ", ".join(s.name for s in self.manifest.segments)
        raise BundleError(f"bundle {self.manifest.name} has no segment {name!r}; it has: {names}")

    def read_verified(self, rel: str) -> bytes:
        """The bytes of a listed file, hashed as read: what is returned is what was verified."""
        entry = self.manifest.file(rel)
        data = safe_relative_path(self.root, rel).read_bytes()
        if len(data) != entry.size_bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise HashMismatch(f"{self.root / rel}: changed since the bundle was verified; copy the bundle again")
        return data

    def path_of(self, rel: str) -> Path:
        """Path of a listed file (for loaders that need a path, e.g. ONNX external data)."""
        self.manifest.file(rel)
        return safe_relative_path(self.root, rel)


def load_bundle(root: str | Path) -> Bundle:
    """Read and verify a bundle folder.

    Raises:
        BundleError: no manifest, malformed or unknown manifest keys, unsafe paths,
            missing files; ``HashMismatch`` when contents differ from the manifest.
    """
    root = Path(root)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file() or mpath.is_symlink():
        hint = "run `make export` (built-in models) or `msao export --model DIR --out " + str(root) + "`"
        raise BundleError(f"{root}: no {MANIFEST_NAME}; not a bundle. {hint}")
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath}: {size} bytes, larger than any real manifest ({MAX_MANIFEST_BYTES}); refusing to parse")
    try:
        raw = json.loads(mpath.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc}); re-export the bundle") from exc
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{mpath}: {exc}; the manifest is malformed or from another msao version, re-export the bundle") from exc
    verify_files(root, manifest.files)
    return Bundle(root=root, manifest=manifest)
