"""The bad-input corpus on disk: limits it was made for, its case records and their loader.

Each target folder holds the files and one ``manifest.json``; ``make_corpus.py`` writes both.
A case says what the bytes are and what must come of them: the typed error the in-process
parser raises (``error`` + ``match``) and what a real daemon or worker answers on the wire
(``code``, an HTTP ``status``, or ``drop`` for messages that have no one to answer).

    tests/corpus/<target>/manifest.json   {"target", "parser", "wire", "cases": [{"name", "file"?, "what", ...}]}
    tests/corpus/<target>/<name>.<ext>    the bytes (topic cases keep their value in the manifest)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CORPUS_DIR",
    "FAR_DEADLINE_UNIX_S",
    "JOB_MAX_PAYLOAD_BYTES",
    "PLACEHOLDER_HASH",
    "REQUEST_MAX_PAYLOAD_BYTES",
    "TARGETS",
    "Case",
    "load_cases",
    "load_manifest",
]

CORPUS_DIR = Path(__file__).resolve().parent
TARGETS = ("edge_request", "http_chat", "http_raw", "image", "job", "chunk", "topic")

# Limits the corpus was made for; the live test starts the daemon and the worker with them
# (small, so oversize cases are small files too).
REQUEST_MAX_PAYLOAD_BYTES = 64 * 1024  # RequestLimits.max_payload_bytes (MSAO_RUNTIME_LIMITS_MAX_PAYLOAD_BYTES)
JOB_MAX_PAYLOAD_BYTES = 64 * 1024  # CodecLimits.max_payload_bytes (msao cloud --max-payload-mb 0.0625)
# Job payloads carry this model hash; the live test swaps in the worker's (same length, uncompressed jobs only).
PLACEHOLDER_HASH = "5eed" * 16
FAR_DEADLINE_UNIX_S = 4102444800.0  # 2100-01-01: corpus jobs never expire on their own


@dataclass(frozen=True)
class Case:
    """One corpus case (the manifest entry plus its target and bytes)."""

    target: str
    name: str
    what: str
    data: bytes
    spec: dict[str, Any] = field(repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.spec[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.spec.get(key, default)

    @property
    def runs_here(self) -> bool:
        """False for cases that need what this Python lacks (``requires``: int_max_str_digits, Python >= 3.10.7)."""
        return self.spec.get("requires") != "int_max_str_digits" or hasattr(sys, "get_int_max_str_digits")

    @property
    def id(self) -> str:
        return f"{self.target}/{self.name}"


def load_manifest(target: str, root: Path = CORPUS_DIR) -> dict[str, Any]:
    return json.loads((root / target / "manifest.json").read_text())


def load_cases(target: str, root: Path = CORPUS_DIR) -> list[Case]:
    """Every case of one target, with its file's bytes (b"" for cases that keep their value inline)."""
    doc = load_manifest(target, root)
    out = []
    for spec in doc["cases"]:
        data = (root / target / spec["file"]).read_bytes() if "file" in spec else b""
        out.append(Case(target, spec["name"], spec["what"], data, spec))
    return out
