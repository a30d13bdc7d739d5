"""How many times slower the emulated edge is, per kind of work: time dilation for benchmarks and tests.

Why per kind: a Jetson is not uniformly slower than a cloud GPU. Against an A100 an Orin NX
runs a memory-bound decode step about 5x slower but a compute-bound prefill of a few hundred
tokens about 18x slower, so one factor either flatters the edge's prefill or punishes its
decode. A device profile (TOML, every factor with its kind and source, as ``bench/profiles``
demands of all figures) names one factor per kind of edge work:

    [dilation.vision]        value = 9.9   kind = "derived"   source = "..."
    [dilation.prefill] / [dilation.decode] / [dilation.mas] / [dilation.image_decode]

A kind the profile leaves out is not dilated (factor 1). The executor holds its worker for
(factor - 1) x each piece of work's measured time (``Executor.dilate(ms, kind)``), so queueing
on the edge is real while the CPU stays free for the broker, the workers and the proxy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from msao.errors import ConfigError

__all__ = ["DILATION_KINDS", "Dilation"]

DILATION_KINDS = ("image_decode", "vision", "mas", "prefill", "decode")
MAX_FACTOR = 1000.0


@dataclass(frozen=True)
class Dilation:
    """One factor (>= 1) per kind of edge work; ``Dilation()`` is the device's own speed."""

    image_decode: float = 1.0
    vision: float = 1.0
    mas: float = 1.0
    prefill: float = 1.0
    decode: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 1.0 <= v <= MAX_FACTOR:
                raise ConfigError(f"dilation {f.name} must be a number in [1, {MAX_FACTOR:g}] (1 = this device's own speed), got {v!r}")

    @classmethod
    def uniform(cls, k: float) -> Dilation:
        """Every kind ``k`` times slower."""
        return cls(**{kind: k for kind in DILATION_KINDS})

    def factor(self, kind: str) -> float:
        if kind not in DILATION_KINDS:
            raise ValueError(f"kind of edge work {kind!r} not in {DILATION_KINDS}")
        return getattr(self, kind)

    @property
    def identity(self) -> bool:
        return all(getattr(self, kind) == 1.0 for kind in DILATION_KINDS)

    def describe(self) -> str:
        return ", ".join(f"{kind} x{getattr(self, kind):g}" for kind in DILATION_KINDS)

    @classmethod
    def load(cls, path: str | Path) -> Dilation:
        """A device profile's ``[dilation]`` table; each factor needs ``value``, ``kind`` and ``source``."""
        from msao.edge_runtime.config import toml_reader

        tomllib = toml_reader()
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no dilation profile at {path}: pass an existing file (bench/profiles/ has one)") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"dilation profile {path} cannot be read as TOML: {exc}") from None
        table = doc.get("dilation")
        if not isinstance(table, dict) or not table:
            raise ConfigError(f"dilation profile {path} has no [dilation] table with one entry per kind of work ({DILATION_KINDS})")
        unknown = sorted(set(table) - set(DILATION_KINDS))
        if unknown:
            raise ConfigError(f"dilation profile {path}: unknown kinds {unknown}; the kinds are {list(DILATION_KINDS)}")
        factors: dict[str, float] = {}
        for kind, entry in table.items():
            if not isinstance(entry, dict) or not {"value", "kind", "source"} <= set(entry):
                raise ConfigError(f"dilation profile {path}: [dilation.{kind}] needs value, kind and source (where the factor comes from)")
            if not str(entry["source"]).strip():
                raise ConfigError(f"dilation profile {path}: [dilation.{kind}] has an empty source; say where the factor comes from")
            factors[kind] = entry["value"]
        try:
            return cls(**factors)
        except ConfigError as exc:
            raise ConfigError(f"dilation profile {path}: {exc}") from None
