"""The bundle manifest as typed, frozen dataclasses, and its strict JSON form.

Every class checks itself in ``__post_init__`` and ``from_dict`` rejects unknown keys, so a
manifest from a different msao version fails loudly instead of being half-understood.
Format documented in docs/bundle.md; bump ``FORMAT_VERSION`` on any incompatible change.

Versions: 1 is a LLaVA bundle (1-D position ids). 2 adds ``model.family`` and ``model.mrope`` for
the M-RoPE families (Qwen2-VL, Qwen2.5-VL), whose decoders take 3-D position ids; an msao that
reads only version 1 refuses those bundles by their version instead of misplacing every image
token. 3 changes what a decoder chunk returns: the new tokens' key/value (``new_key_i``,
``new_value_i``: batch, kv heads, seq, head dim) instead of the whole present cache
(``present_key_i``: past+seq), so the runtime appends into a preallocated cache instead of
receiving a copy of it per step. Every family is written as version 3, so an older msao
refuses these bundles by their version instead of dropping their KV; this msao still runs
version 1 and 2 bundles, the old way (``DecoderStack``), until they are re-exported.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from msao.engines.images import ImagePreprocess

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "MANIFEST_NAME",
    "MODEL_FAMILIES",
    "NEW_KV_VERSION",
    "SEGMENT_KINDS",
    "BundleChecks",
    "FileEntry",
    "FlopsModel",
    "LatencyProfile",
    "Manifest",
    "ModelInfo",
    "MropeSpec",
    "ProfilePoint",
    "PromptSpec",
    "SegmentCheck",
    "SegmentSpec",
    "TensorSpec",
    "decoder_segment_name",
    "exit_segment_name",
    "format_version_for",
]

FORMAT_VERSION = 3  # the version this msao writes, for every family
FORMAT_VERSIONS = (1, 2, 3)  # versions this msao reads
NEW_KV_VERSION = 3  # from this version on, decoder chunks return the new tokens' KV (``new_*``), not ``present_*``
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "int64", "int32", "bool")
SEGMENT_KINDS = ("vision_encoder", "text_embed", "decoder", "lm_head", "exit_head")
# How the runtime builds position ids: "llava" counts 1-D positions; the Qwen families use M-RoPE.
MODEL_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
_SYMBOL = re.compile(r"^[a-z_][a-z0-9_+]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _only_known(cls, d: dict) -> dict:
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}: expected an object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    missing = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} - set(d)
    if missing:
        raise ValueError(f"{cls.__name__}: missing keys {sorted(missing)}")
    return d


def format_version_for(family: str) -> int:
    """The oldest manifest version that can hold a model of ``family``: 1 for LLaVA, 2 for M-RoPE."""
    return 1 if family == "llava" else 2


def decoder_segment_name(start: int, end: int) -> str:
    return f"decoder[{start}:{end}]"


def exit_segment_name(layer: int) -> str:
    return f"exit_head@{layer}"


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a segment. ``shape`` mixes ints and symbolic dims ("batch", "past")."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name}: dtype {self.dtype!r} not in {DTYPES}")
        for dim in self.shape:
            if isinstance(dim, bool) or not (isinstance(dim, int) and dim >= 0 or isinstance(dim, str) and _SYMBOL.match(dim)):
                raise ValueError(f"tensor {self.name}: bad dimension {dim!r} in {self.shape}")

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        d = _only_known(cls, d)
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(d["shape"]))


@dataclass(frozen=True)
class SegmentCheck:
    """How the exported segment compared with PyTorch at export time."""

    max_abs_err: float
    mean_abs_err: float
    samples: int
    atol: float

    @classmethod
    def from_dict(cls, d: dict) -> SegmentCheck:
        return cls(**_only_known(cls, d))


@dataclass(frozen=True)
class FlopsModel:
    """Matmul/conv FLOPs of one call of a segment, from counts taken at export.

    flops = batch * (per_call + per_token * T + per_token_pair * T * (P + T)), where T is
    the new tokens and P the past length: linear layers scale with T, attention with
    T * (P + T). Exact for the segment kinds msao exports (checked at export).
    """

    per_call: int = 0
    per_token: int = 0
    per_token_pair: int = 0

    def __post_init__(self) -> None:
        if min(self.per_call, self.per_token, self.per_token_pair) < 0:
            raise ValueError(f"FLOPs coefficients must be >= 0, got {self}")

    def flops(self, batch: int = 1, tokens: int = 0, past: int = 0) -> int:
        return batch * (self.per_call + self.per_token * tokens + self.per_token_pair * tokens * (past + tokens))

    @classmethod
    def from_dict(cls, d: dict) -> FlopsModel:
        return cls(**{k: int(v) for k, v in _only_known(cls, d).items()})


@dataclass(frozen=True)
class SegmentSpec:
    """One executable piece of the model, in execution order within the manifest.

    Attributes:
        name: ``vision_encoder``, ``text_embed``, ``decoder[a:b]``, ``lm_head`` or ``exit_head@k``.
        kind: one of ``SEGMENT_KINDS``.
        file: the ONNX file (bundle-relative).
        layers: decoder layers [start, end) for a chunk; (k, k) for an exit head; None otherwise.
        external_data: extra files the ONNX file references (large models only).
        check: how the ONNX file compared with PyTorch at export.
        flops: compute cost model, for FLOPs per request at any kept-token count.
    """

    name: str
    kind: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layers: tuple[int, int] | None = None
    external_data: tuple[str, ...] = ()
    check: SegmentCheck | None = None
    flops: FlopsModel | None = None

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"segment {self.name}: kind {self.kind!r} not in {SEGMENT_KINDS}")
        if self.kind == "decoder":
            if self.layers is None or not 0 <= self.layers[0] < self.layers[1] or self.name != decoder_segment_name(*self.layers):
                raise ValueError(f"segment {self.name}: decoder chunks need layers (a, b) with a < b and name decoder[a:b]")
        if self.kind == "exit_head" and (self.layers is None or self.name != exit_segment_name(self.layers[0])):
            raise ValueError(f"segment {self.name}: exit heads need layers (k, k) and name exit_head@k")

    @classmethod
    def from_dict(cls, d: dict) -> SegmentSpec:
        d = _only_known(cls, d)
        return cls(
            name=str(d["name"]),
            kind=str(d["kind"]),
            file=str(d["file"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            layers=None if d.get("layers") is None else (int(d["layers"][0]), int(d["layers"][1])),
            external_data=tuple(d.get("external_data", ())),
            check=None if d.get("check") is None else SegmentCheck.from_dict(d["check"]),
            flops=None if d.get("flops") is None else FlopsModel.from_dict(d["flops"]),
        )


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size_bytes: int

    def __post_init__(self) -> None:
        if not _SHA256.match(self.sha256):
            raise ValueError(f"file {self.path}: sha256 must be 64 lower-case hex digits")
        if self.size_bytes < 0:
            raise ValueError(f"file {self.path}: negative size")

    @classmethod
    def from_dict(cls, d: dict) -> FileEntry:
        d = _only_known(cls, d)
        return cls(path=str(d["path"]), sha256=str(d["sha256"]), size_bytes=int(d["size_bytes"]))


@dataclass(frozen=True)
class MropeSpec:
    """The declared image grid of an M-RoPE bundle and what position ids are built from.

    The grid is fixed per bundle (chosen at export from the processor's pixel budget or
    ``--image-size``), so the vision encoder emits a static ``image_tokens`` =
    grid_t * (grid_h / m) * (grid_w / m) merged tokens, m = ``spatial_merge_size``.

    Attributes:
        grid_t / grid_h / grid_w: the image in patches before merging (t = 1 for a still image,
            whose frame is repeated ``temporal_patch_size`` times).
        patch_size: pixels per patch side; image height = grid_h * patch_size.
        temporal_patch_size: frames per temporal patch (2 in every Qwen2-VL checkpoint).
        spatial_merge_size: patches per merged token side (2: a 2x2 block becomes one token).
        mrope_section: rotary half-dims given to the (t, h, w) position axes, for reference;
            the decoder segments hold the rotation, the runtime only builds the ids.
    """

    grid_t: int
    grid_h: int
    grid_w: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    mrope_section: tuple[int, ...]

    def __post_init__(self) -> None:
        m = self.spatial_merge_size
        if min(self.grid_t, self.grid_h, self.grid_w, self.patch_size, self.temporal_patch_size, m) <= 0:
            raise ValueError(f"M-RoPE grid sizes must be positive, got {self}")
        if self.grid_h % m or self.grid_w % m:
            raise ValueError(f"grid {self.grid_h}x{self.grid_w} patches is not a multiple of the merge size {m}; re-export the bundle")
        if len(self.mrope_section) != 3:
            raise ValueError(f"mrope_section needs three values (t, h, w), got {self.mrope_section}")

    @property
    def merged_grid(self) -> tuple[int, int, int]:
        """(t, h, w) of the merged tokens the decoder sees, in row-major token order."""
        m = self.spatial_merge_size
        return self.grid_t, self.grid_h // m, self.grid_w // m

    @property
    def image_tokens(self) -> int:
        t, h, w = self.merged_grid
        return t * h * w

    @classmethod
    def from_dict(cls, d: dict) -> MropeSpec:
        d = dict(_only_known(cls, d))
        d["mrope_section"] = tuple(int(x) for x in d["mrope_section"])
        return cls(**d)


@dataclass(frozen=True)
class ModelInfo:
    """Geometry the runtime needs without opening any model file.

    ``family`` says how position ids are built (``MODEL_FAMILIES``); ``mrope`` is required for
    the M-RoPE families and absent for LLaVA. Both are left out of a LLaVA manifest's JSON.
    """

    architecture: str
    vision_model_type: str
    text_model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    image_tokens: int
    vision_hidden_size: int
    max_positions: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    image_token_id: int
    parameters: int
    family: str = "llava"
    mrope: MropeSpec | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if min(self.num_layers, self.hidden_size, self.vocab_size, self.image_tokens) <= 0:
            raise ValueError("model sizes must be positive")
        if self.family not in MODEL_FAMILIES:
            raise ValueError(f"model family {self.family!r} not in {MODEL_FAMILIES}; this msao cannot build its position ids")
        if (self.family == "llava") != (self.mrope is None):
            raise ValueError(f"family {self.family!r}: M-RoPE grid {'given' if self.mrope else 'missing'}; re-export the bundle")
        if self.mrope is not None and self.mrope.image_tokens != self.image_tokens:
            raise ValueError(
                f"M-RoPE grid {self.mrope.merged_grid} makes {self.mrope.image_tokens} tokens, not image_tokens {self.image_tokens}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON form; a LLaVA model leaves out ``family`` and ``mrope`` (its manifest is as before them)."""
        d = asdict(self)
        if self.family == "llava":
            del d["family"], d["mrope"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelInfo:
        d = dict(_only_known(cls, d))
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        if d.get("mrope") is not None:
            d["mrope"] = MropeSpec.from_dict(d["mrope"])
        return cls(**d)


@dataclass(frozen=True)
class PromptSpec:
    """How a question becomes tokens: ``template`` with ``{question}`` and one image placeholder."""

    template: str
    image_placeholder: str

    def __post_init__(self) -> None:
        if self.template.count("{question}") != 1 or self.template.count(self.image_placeholder) != 1:
            raise ValueError("prompt template needs exactly one {question} and one image placeholder")

    @classmethod
    def from_dict(cls, d: dict) -> PromptSpec:
        return cls(**_only_known(cls, d))


@dataclass(frozen=True)
class ProfilePoint:
    """Measured latency of one segment at one shape (B = batch, T = new tokens, P = past)."""

    segment: str
    batch: int
    tokens: int
    past: int
    ms_p50: float
    ms_p90: float

    @classmethod
    def from_dict(cls, d: dict) -> ProfilePoint:
        return cls(**_only_known(cls, d))


@dataclass(frozen=True)
class LatencyProfile:
    """Per-segment latencies on one device/backend; the scheduler interpolates in T and P."""

    device: str
    backend: str
    threads: int
    measured_at: str
    points: tuple[ProfilePoint, ...]

    @classmethod
    def from_dict(cls, d: dict) -> LatencyProfile:
        d = _only_known(cls, d)
        return cls(
            device=str(d["device"]),
            backend=str(d["backend"]),
            threads=int(d["threads"]),
            measured_at=str(d["measured_at"]),
            points=tuple(ProfilePoint.from_dict(p) for p in d["points"]),
        )


@dataclass(frozen=True)
class BundleChecks:
    """End-to-end check at export: greedy answers from ONNX alone vs PyTorch ``generate``."""

    questions: int
    identical_answers: int
    accuracy_onnx: float

    @classmethod
    def from_dict(cls, d: dict) -> BundleChecks:
        return cls(**_only_known(cls, d))


@dataclass(frozen=True)
class Manifest:
    """Everything about a bundle except the bytes of its files."""

    format_version: int
    name: str
    model_hash: str
    created_by: dict[str, str]
    model: ModelInfo
    prompt: PromptSpec
    preprocess: ImagePreprocess
    tokenizer: str
    mas_feature_layer: int
    split_points: tuple[int, ...]
    exit_layers: tuple[int, ...]
    segments: tuple[SegmentSpec, ...]
    files: tuple[FileEntry, ...]
    profiles: tuple[LatencyProfile, ...] = ()
    checks: BundleChecks | None = None

    def __post_init__(self) -> None:
        if self.format_version not in FORMAT_VERSIONS:
            raise ValueError(f"format_version {self.format_version}, this msao reads {list(FORMAT_VERSIONS)}")
        if self.format_version < format_version_for(self.model.family):
            raise ValueError(
                f"format_version {self.format_version} cannot hold a {self.model.family} model (needs {format_version_for(self.model.family)}+)"
            )
        kv_prefix = "new_" if self.format_version >= NEW_KV_VERSION else "present_"
        for seg in self.segments:
            wrong = [
                t.name for t in seg.outputs if seg.kind == "decoder" and t.name != "hidden_states_out" and not t.name.startswith(kv_prefix)
            ]
            if wrong:
                raise ValueError(
                    f"segment {seg.name}: outputs {wrong}; a version {self.format_version} decoder chunk returns {kv_prefix}* KV"
                )
        if not _SHA256.match(self.model_hash):
            raise ValueError("model_hash must be 64 lower-case hex digits")
        names = [s.name for s in self.segments]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate segment names in {names}")
        listed = {f.path for f in self.files}
        if len(listed) != len(self.files):
            raise ValueError("duplicate paths in files")
        needed = {self.tokenizer} | {s.file for s in self.segments} | {x for s in self.segments for x in s.external_data}
        if needed - listed:
            raise ValueError(f"files used but not listed with a hash: {sorted(needed - listed)}")
        chunks = sorted(s.layers for s in self.segments if s.kind == "decoder" and s.layers)
        edges = [0, *[c[1] for c in chunks]]
        if [c[0] for c in chunks] != edges[:-1] or (chunks and edges[-1] != self.model.num_layers):
            raise ValueError(f"decoder chunks {chunks} do not tile layers 0..{self.model.num_layers}")
        bounds = set(edges)
        for k in (*self.split_points, *self.exit_layers):
            if k not in bounds or k in (0, self.model.num_layers):
                raise ValueError(f"split/exit layer {k} is not an inner chunk boundary of {sorted(bounds)}")
        for k in self.exit_layers:
            if exit_segment_name(k) not in names:
                raise ValueError(f"exit layer {k} listed but segment {exit_segment_name(k)} missing")

    def file(self, rel: str) -> FileEntry:
        for f in self.files:
            if f.path == rel:
                return f
        raise KeyError(f"{rel} is not listed in the manifest")

    def decoder_chunks(self) -> tuple[SegmentSpec, ...]:
        return tuple(sorted((s for s in self.segments if s.kind == "decoder"), key=lambda s: s.layers or (0, 0)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = _only_known(cls, d)
        return cls(
            format_version=int(d["format_version"]),
            name=str(d["name"]),
            model_hash=str(d["model_hash"]),
            created_by={str(k): str(v) for k, v in dict(d["created_by"]).items()},
            model=ModelInfo.from_dict(d["model"]),
            prompt=PromptSpec.from_dict(d["prompt"]),
            preprocess=ImagePreprocess.from_dict(d["preprocess"]),
            tokenizer=str(d["tokenizer"]),
            mas_feature_layer=int(d["mas_feature_layer"]),
            split_points=tuple(int(k) for k in d["split_points"]),
            exit_layers=tuple(int(k) for k in d["exit_layers"]),
            segments=tuple(SegmentSpec.from_dict(s) for s in d["segments"]),
            files=tuple(FileEntry.from_dict(f) for f in d["files"]),
            profiles=tuple(LatencyProfile.from_dict(p) for p in d.get("profiles", ())),
            checks=None if d.get("checks") is None else BundleChecks.from_dict(d["checks"]),
        )
