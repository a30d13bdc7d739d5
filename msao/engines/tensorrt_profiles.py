"""TensorRT optimisation profiles derived from a segment's symbolic shapes; pure Python.

A TensorRT engine with dynamic inputs needs, per input, the smallest, typical and largest
shape it will see (min/opt/max). The manifest already names every dynamic dimension
(``batch``, ``seq``, ``past`` and sums such as ``past+seq``), so the profiles follow from the
manifest and a few user limits; nothing here imports tensorrt, so the derivation is tested on
any machine and the builder and the runner share it.

Decoder chunks (inputs with both ``seq`` and ``past``) get two profiles, because prefill and
decode have very different shapes and TensorRT picks kernels for the ``opt`` point:

    profile 0 "decode":  seq 1..1..1            past 0..opt_past..max_past
    profile 1 "prefill": seq 1..opt_seq..max_seq past 0..0..max_past       (covers every call)

At run time ``choose_profile`` takes the first profile that contains the call's shapes, so a
decode step runs on kernels tuned for one token and anything else on the general profile.
Every other segment gets one profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from msao.engines.manifest import ModelInfo, SegmentSpec, TensorSpec
from msao.engines.profile import TEXT_TOKENS
from msao.errors import ConfigError, FeedError

__all__ = ["choose_profile", "DimRange", "InputRange", "ProfileLimits", "profiles_for_segment", "ShapeProfile"]

_BASE = ("batch", "seq", "past")


class DimRange(NamedTuple):
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class ProfileLimits:
    """User limits for the dynamic dimensions of every segment of one bundle.

    Attributes:
        max_batch: largest batch per call (1: the edge runs one request per call).
        max_seq: most new tokens in one call, i.e. the longest prefill; None = the model's
            ``max_positions``. Larger means more activation memory in every decoder engine.
        max_past: longest KV cache; None = ``max_positions``. Larger means more KV and
            attention memory.
        opt_batch / opt_seq / opt_past: the shapes TensorRT tunes kernels for; None = image
            tokens + ``TEXT_TOKENS`` (a full-image prompt), clipped to the maximum.
        extra: ``(name, min, opt, max)`` for symbolic dims other than batch/seq/past (models
            exported by other tools); sums such as ``a+b`` are derived, never listed.
    """

    max_batch: int = 1
    max_seq: int | None = None
    max_past: int | None = None
    opt_batch: int = 1
    opt_seq: int | None = None
    opt_past: int | None = None
    extra: tuple[tuple[str, int, int, int], ...] = ()

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_batch", "max_seq", "opt_batch", "opt_seq"):
            v = getattr(self, name)
            if v is not None and v < 1:
                problems.append(f"{name} must be >= 1, got {v}")
        for name in ("max_past", "opt_past"):
            v = getattr(self, name)
            if v is not None and v < 0:
                problems.append(f"{name} must be >= 0, got {v}")
        if self.opt_batch > self.max_batch:
            problems.append(f"opt_batch {self.opt_batch} > max_batch {self.max_batch}")
        for opt_name, max_name in (("opt_seq", "max_seq"), ("opt_past", "max_past")):
            o, m = getattr(self, opt_name), getattr(self, max_name)
            if o is not None and m is not None and o > m:
                problems.append(f"{opt_name} {o} > {max_name} {m}")
        for name, lo, typical, hi in self.extra:
            if name in _BASE or "+" in name:
                problems.append(f"extra dim {name!r}: batch/seq/past have their own limits and sums are derived")
            elif not 0 <= lo <= typical <= hi:
                problems.append(f"extra dim {name!r}: need 0 <= min <= opt <= max, got {lo}:{typical}:{hi}")
        if problems:
            raise ConfigError("TensorRT profile limits: " + "; ".join(problems))

    def dims(self, model: ModelInfo) -> dict[str, DimRange]:
        """Ranges of the base dims for ``model`` (defaults resolved against its geometry)."""
        max_seq = self.max_seq or model.max_positions
        max_past = model.max_positions if self.max_past is None else self.max_past
        typical = model.image_tokens + TEXT_TOKENS
        opt_seq = min(self.opt_seq or typical, max_seq)
        opt_past = min(typical if self.opt_past is None else self.opt_past, max_past)
        out = {
            "batch": DimRange(1, self.opt_batch, self.max_batch),
            "seq": DimRange(1, opt_seq, max_seq),
            "past": DimRange(0, opt_past, max_past),
        }
        out.update({name: DimRange(lo, opt, hi) for name, lo, opt, hi in self.extra})
        return out


@dataclass(frozen=True)
class InputRange:
    """min/opt/max shape of one input in one profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ValueError(f"input {self.name}: min/opt/max ranks differ: {self.min} {self.opt} {self.max}")
        if any(not 0 <= a <= b <= c for a, b, c in zip(self.min, self.opt, self.max)):
            raise ValueError(f"input {self.name}: need min <= opt <= max per dim, got {self.min} {self.opt} {self.max}")

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(a <= s <= c for a, s, c in zip(self.min, shape, self.max))

    def describe(self) -> str:
        return f"{self.name} {self.min}..{self.max}"


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimisation profile: a range per dynamic input (static inputs are absent)."""

    name: str
    inputs: tuple[InputRange, ...]

    def contains(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return all(r.contains(tuple(shapes[r.name])) for r in self.inputs if r.name in shapes)

    def describe(self) -> str:
        return f"{self.name}: " + ", ".join(r.describe() for r in self.inputs)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [{"name": r.name, "min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for r in self.inputs],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShapeProfile:
        if set(d) != {"name", "inputs"}:
            raise ValueError(f"ShapeProfile: expected keys name, inputs; got {sorted(d)}")
        rows = []
        for r in d["inputs"]:
            if set(r) != {"name", "min", "opt", "max"}:
                raise ValueError(f"ShapeProfile input: expected keys name, min, opt, max; got {sorted(r)}")
            rows.append(InputRange(str(r["name"]), tuple(map(int, r["min"])), tuple(map(int, r["opt"])), tuple(map(int, r["max"]))))
        return cls(name=str(d["name"]), inputs=tuple(rows))


def _range_of(t: TensorSpec, dims: Mapping[str, DimRange], unknown: set[str]) -> InputRange:
    ranges: list[DimRange] = []
    for d in t.shape:
        if isinstance(d, int):
            ranges.append(DimRange(d, d, d))
            continue
        parts = d.split("+")  # e.g. attention_mask's "past+seq": the sum of the parts' ranges
        missing = [p for p in parts if p not in dims]
        unknown.update(missing)
        if missing:
            ranges.append(DimRange(0, 0, 0))
        else:
            ranges.append(DimRange(*(sum(dims[p][k] for p in parts) for k in range(3))))
    return InputRange(t.name, tuple(r.min for r in ranges), tuple(r.opt for r in ranges), tuple(r.max for r in ranges))


def profiles_for_segment(spec: SegmentSpec, model: ModelInfo, limits: ProfileLimits = ProfileLimits()) -> tuple[ShapeProfile, ...]:
    """The optimisation profiles to build ``spec`` with, in the order the engine will hold them.

    Raises:
        ConfigError: an input uses a symbolic dim that is neither batch/seq/past nor in
            ``limits.extra`` (names the dims and the ``--dim`` flag that sets them).
    """
    base = limits.dims(model)
    symbols = {p for t in spec.inputs for d in t.shape if isinstance(d, str) for p in d.split("+")}
    dynamic = [t for t in spec.inputs if any(isinstance(d, str) for d in t.shape)]

    def build(name: str, overrides: Mapping[str, DimRange]) -> ShapeProfile:
        dims = {**base, **overrides}
        unknown: set[str] = set()
        rows = tuple(_range_of(t, dims, unknown) for t in dynamic)
        if unknown:
            raise ConfigError(
                f"segment {spec.name}: symbolic dims {sorted(unknown)} have no limits; "
                "give each with `msao build-engines --dim NAME=MIN:OPT:MAX`"
            )
        return ShapeProfile(name, rows)

    seq = base["seq"]
    if {"seq", "past"} <= symbols:
        return (
            build("decode", {"seq": DimRange(1, 1, 1)}),
            build("prefill", {"past": DimRange(0, 0, base["past"].max)}),
        )
    if "seq" in symbols:
        # Heads see the last position only (generation.py); the embedder sees the prompt text, then one token.
        opt = {"lm_head": 1, "exit_head": 1, "text_embed": min(TEXT_TOKENS, seq.max)}.get(spec.kind, seq.opt)
        return (build("any", {"seq": DimRange(1, opt, seq.max)}),)
    return (build("any", {}),)


def choose_profile(profiles: Sequence[ShapeProfile], shapes: Mapping[str, tuple[int, ...]], segment: str = "segment") -> int:
    """Index of the first profile that holds every input shape of one call.

    Raises:
        FeedError: no profile holds the shapes; says which ranges exist and how to widen them.
    """
    for i, p in enumerate(profiles):
        if p.contains(shapes):
            return i
    got = ", ".join(f"{n} {tuple(s)}" for n, s in sorted(shapes.items()) if any(r.name == n for p in profiles for r in p.inputs))
    have = "; ".join(p.describe() for p in profiles)
    raise FeedError(
        f"{segment}: input shapes {got} fit none of the engine's optimisation profiles ({have}); "
        "rebuild with larger limits: `msao build-engines --max-seq/--max-past/--max-batch`"
    )
