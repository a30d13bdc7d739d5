"""A scaled-simulation profile: a real model pair's published figures, read into msao's own types.

The profile file (``bench/profiles/*.toml``) gives per-segment latencies of an edge model and a
large model on an edge device and a cloud device, accuracy by keep ratio, and the workload, each
number as a *figure* ``{value, kind, source}`` (kind: published / derived / assumed). This module
checks every figure, then builds exactly what ``msao.edge_runtime.scheduler.Scheduler`` reads
from real bundles: two ``Manifest``s, one ``LatencyProfile`` per model per device, the
``SegmentClock``s and a ``Calibration``. No scheduler code is changed or imitated.

How the figures become profile points (mechanical, no new numbers):

    vision_encoder      (0 tokens)        vision_ms
    decoder[a:b]        (T_s, past 0)     (prefill_ms(T_r) - lm_head) * (b - a) / L    for each keep ratio
                        (1, past T_s)     decode_step_ms * (1 - lm_head_share) * (b - a) / L
    lm_head             (1 token)         decode_step_ms * lm_head_share
    text_embed          (none: 0 ms)      an embedding gather

T_s = TEXT_TOKENS (msao's constant, 16) + kept image tokens: the length the cost model asks for;
T_r = the profile's real text tokens + kept: the length whose time it gets. prefill_ms is
interpolated linearly between the profile's [tokens, ms] points, as ``SegmentClock`` does.

Knows nothing of links, policies or noise draws (``bench.simulate``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from msao.edge_runtime.calibration import CALIBRATION_FORMAT, Calibration, ModelCalibration, PairCalibration, UploadCalibration
from msao.edge_runtime.estimates import SegmentClock
from msao.engines.images import ImagePreprocess
from msao.engines.manifest import (
    FileEntry,
    LatencyProfile,
    Manifest,
    ModelInfo,
    ProfilePoint,
    PromptSpec,
    SegmentSpec,
    decoder_segment_name,
    format_version_for,
)
from msao.engines.profile import TEXT_TOKENS
from msao.errors import ConfigError

__all__ = ["FIGURE_KINDS", "DV_THRESHOLDS", "Figure", "ModelSpec", "SimProfile", "load_sim_profile", "ROOT", "DEFAULT_PROFILE"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROFILE = ROOT / "bench" / "profiles" / "llava15-7b-13b_orin-nx_vs_a100.toml"
FIGURE_KINDS = ("published", "derived", "assumed")
# Draft/verify thresholds with published consequences only: 0 commits every draft (the edge
# model's accuracy), 1.01 verifies every draft (the large model's). Intermediate thresholds need
# the joint distribution of edge confidence and correctness, which no source publishes.
DV_THRESHOLDS = (0.0, 1.01)


@dataclass(frozen=True)
class Figure:
    """One number of the profile and where it comes from."""

    path: str
    value: object
    kind: str
    source: str


@dataclass(frozen=True)
class ModelSpec:
    """One model's geometry (from its config) and accuracy table (figures)."""

    key: str
    name: str
    manifest: Manifest
    keep_ratios: tuple[float, ...]
    accuracy: tuple[float, ...]  # fractions, aligned with keep_ratios
    accuracy_with_edge_keep: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SimProfile:
    """Everything the simulator needs, built from one profile file."""

    name: str
    title: str
    benchmark: str
    path: str
    edge: ModelSpec
    large: ModelSpec
    edge_profile: LatencyProfile  # edge model on the edge device
    large_edge_profile: LatencyProfile  # large model on the edge device (local_large, split)
    large_cloud_profile: LatencyProfile  # large model on the cloud device
    calibration: Calibration
    text_tokens: int
    image_bytes_mean: float
    image_bytes_sigma: float
    answer_tokens_pmf: tuple[tuple[int, float], ...]
    deadline_ms: float
    mas_ms: float
    edge_cv: float
    cloud_cv: float
    cloud_servers: int
    edge_device: str
    cloud_device: str
    figures: tuple[Figure, ...] = field(default=(), repr=False)

    @property
    def mean_answer_tokens(self) -> float:
        return sum(n * p for n, p in self.answer_tokens_pmf)

    def clocks(self) -> tuple[SegmentClock, SegmentClock, SegmentClock]:
        """Fresh (edge, large-on-edge, large-on-cloud) clocks; live scale 1 (the profile is the truth here)."""
        return (
            SegmentClock(self.edge.manifest, profile=self.edge_profile),
            SegmentClock(self.large.manifest, profile=self.large_edge_profile),
            SegmentClock(self.large.manifest, profile=self.large_cloud_profile),
        )


class _Figures:
    """Reads figures out of the TOML document, collecting every problem before raising once."""

    def __init__(self, doc: dict, path: str):
        self.doc, self.path = doc, path
        self.figures: list[Figure] = []
        self.problems: list[str] = []

    def section(self, *keys: str) -> dict:
        d = self.doc
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        if not isinstance(d, dict):
            self.problems.append(f"missing table [{'.'.join(keys)}]")
            return {}
        return d

    def fig(self, *keys: str, default=None):
        where = ".".join(keys)
        d = self.section(*keys)
        if not d:
            return default
        missing = [k for k in ("value", "kind", "source") if k not in d]
        if missing or set(d) - {"value", "kind", "source"}:
            self.problems.append(
                f"{where}: a figure needs exactly value, kind and source (missing {missing}, extra {sorted(set(d) - {'value', 'kind', 'source'})})"
            )
            return default
        if d["kind"] not in FIGURE_KINDS:
            self.problems.append(f"{where}: kind {d['kind']!r} is not one of {FIGURE_KINDS}")
        if not str(d["source"]).strip():
            self.problems.append(f"{where}: empty source; say where the number comes from or mark it assumed with a reason")
        self.figures.append(Figure(where, d["value"], str(d["kind"]), str(d["source"])))
        return d["value"]

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(f"simulation profile {self.path}: " + "; ".join(self.problems))


def _interp(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear through sorted points, extrapolating from the two nearest (SegmentClock's rule)."""
    pts = sorted(points)
    if len(pts) == 1:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1 or (x1, y1) == pts[-1]:
            return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return pts[-1][1]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _manifest(key: str, m: dict) -> Manifest:
    """A bundle manifest for a model that exists only as figures: files are listed (hashes of names), never read."""
    layers = int(m["num_layers"])
    bounds = [0, *[int(k) for k in m.get("split_points", [])], layers]
    segs = [SegmentSpec("vision_encoder", "vision_encoder", "vision_encoder.onnx", (), ()),
            SegmentSpec("text_embed", "text_embed", "text_embed.onnx", (), ())]  # fmt: skip
    segs += [
        SegmentSpec(decoder_segment_name(a, b), "decoder", f"decoder_{a}_{b}.onnx", (), (), layers=(a, b))
        for a, b in zip(bounds, bounds[1:])
    ]
    segs.append(SegmentSpec("lm_head", "lm_head", "lm_head.onnx", (), ()))
    files = tuple(FileEntry(p, _hash(f"{m['name']}/{p}"), 0) for p in [s.file for s in segs] + ["tokenizer.json"])
    heads = int(m["num_heads"])
    hidden = int(m["hidden_size"])
    info = ModelInfo(
        architecture=str(m["architecture"]), vision_model_type="clip_vision_model", text_model_type="llama", num_layers=layers,
        hidden_size=hidden, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, vocab_size=int(m["vocab_size"]),
        image_tokens=int(m["image_tokens"]), vision_hidden_size=int(m["vision_hidden_size"]), max_positions=4096, bos_token_id=1,
        eos_token_ids=(2,), pad_token_id=0, image_token_id=32000, parameters=int(m["parameters"]),
    )  # fmt: skip
    return Manifest(
        format_version=format_version_for("llava"), name=str(m["name"]), model_hash=_hash(f"simulated:{m['name']}"),
        created_by={"msao": "bench.simprofile (SIMULATION: no weights, no files)", "geometry_source": str(m.get("geometry_source", ""))},
        model=info, prompt=PromptSpec("USER: <image>\n{question} ASSISTANT:", "<image>"), preprocess=ImagePreprocess(336, 336, 336),
        tokenizer="tokenizer.json", mas_feature_layer=layers // 2, split_points=tuple(bounds[1:-1]), exit_layers=(), segments=tuple(segs),
        files=files,
    )  # fmt: skip


TIMINGS = ("edge_on_edge", "large_on_edge", "large_on_cloud")


def _timing(f: _Figures, key: str) -> tuple[str, float, list[tuple[float, float]], float, float] | None:
    """(device, vision ms, prefill [tokens, ms] points, decode step ms, LM head share) of one model on one device."""
    device = str(f.section("timing", key).get("device", "?"))
    raw = [f.fig("timing", key, k) for k in ("vision_ms", "prefill_ms", "decode_step_ms", "lm_head_share")]
    try:
        vision, prefill, step, share = raw
        return device, float(vision), [(float(t), float(ms)) for t, ms in prefill], float(step), float(share)  # type: ignore[union-attr, arg-type]
    except (TypeError, ValueError):
        f.problems.append(f"timing.{key}: vision_ms, decode_step_ms, lm_head_share must be numbers and prefill_ms [tokens, ms] pairs")
        return None


def _latency_profile(timing, manifest: Manifest, ratios: tuple[float, ...], text_tokens: int, devices: dict) -> LatencyProfile:
    device, vision, pts_prefill, step, share = timing
    layers = manifest.model.num_layers
    head_ms = step * share
    n = manifest.model.image_tokens
    kept = sorted({max(1, round(r * n)) for r in ratios} | {0})
    points = [ProfilePoint("vision_encoder", 1, 0, 0, vision, vision), ProfilePoint("lm_head", 1, 1, 0, head_ms, head_ms)]
    for c in manifest.decoder_chunks():
        assert c.layers is not None
        part = (c.layers[1] - c.layers[0]) / layers
        for k in kept:
            ms = round(max(0.0, _interp(pts_prefill, text_tokens + k) - head_ms) * part, 4)
            points.append(ProfilePoint(c.name, 1, TEXT_TOKENS + k, 0, ms, ms))
        ms = round(step * (1 - share) * part, 4)
        points.append(ProfilePoint(c.name, 1, 1, TEXT_TOKENS + n, ms, ms))
    return LatencyProfile(
        device=f"SIMULATED {devices.get(device, device)}", backend="figures (bench.simprofile)", threads=0, measured_at="not measured: simulation",
        points=tuple(points),
    )  # fmt: skip


def _upload_figures(f: _Figures) -> dict[str, tuple[float, float, float]]:
    """Per upload form in ``[uploads."<form>"]``: (image bytes, edge build ms, accuracy change in points / 100).

    Only image forms (``jpeg@q``, ``region@q``): a tokens form needs the two models to share their
    projected tokens, which no two LLMs of different widths do.
    """
    from msao.edge_runtime.plans import UPLOAD_FORMS

    image_forms = [u for u in UPLOAD_FORMS if u.startswith(("jpeg@", "region@"))]
    out = {}
    for form in f.doc.get("uploads", {}):
        if form not in image_forms:
            f.problems.append(f"uploads.{form}: not an image upload form ({image_forms})")
            continue
        raw = [f.fig("uploads", form, k) for k in ("image_bytes", "build_ms", "accuracy_delta")]
        try:
            nbytes, build, delta = (float(v) for v in raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            f.problems.append(f"uploads.{form}: image_bytes, build_ms and accuracy_delta must be numbers")
            continue
        if nbytes <= 0 or build < 0:
            f.problems.append(f"uploads.{form}: image_bytes must be > 0 and build_ms >= 0")
            continue
        out[form] = (nbytes, build, delta / 100)
    return out


def _model(f: _Figures, key: str) -> ModelSpec | None:
    m = f.section("models", key)
    keep = f.fig("models", key, "keep_tokens", default=[])
    acc = f.fig("models", key, "accuracy", default=[])
    with_edge = f.fig("models", key, "accuracy_with_edge_keep") if "accuracy_with_edge_keep" in m else None
    try:
        manifest = _manifest(key, m)
    except (KeyError, TypeError, ValueError) as exc:
        f.problems.append(f"models.{key}: {exc}")
        return None
    n = manifest.model.image_tokens
    if not keep or keep[0] != n or len(acc) != len(keep) or (with_edge is not None and len(with_edge) != len(keep)):
        f.problems.append(f"models.{key}: keep_tokens must start with all {n} image tokens and align with accuracy (got {keep}, {acc})")
        return None
    ratios = tuple(k / n for k in keep)
    return ModelSpec(
        key, manifest.name, manifest, ratios, tuple(a / 100 for a in acc), None if with_edge is None else tuple(a / 100 for a in with_edge)
    )


def load_sim_profile(path: str | Path = DEFAULT_PROFILE) -> SimProfile:
    """Read and check a profile file; ``ConfigError`` lists every problem at once."""
    from msao.edge_runtime.config import toml_reader

    tomllib = toml_reader()
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"simulation profile {path} not found; shipped profiles are in bench/profiles/") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"simulation profile {path} is not valid TOML: {exc}") from None
    f = _Figures(doc, str(path))
    text_tokens = int(f.fig("workload", "text_tokens", default=TEXT_TOKENS))
    image_mean = float(f.fig("workload", "image_bytes_mean", default=1.0))
    image_sigma = float(f.fig("workload", "image_bytes_sigma", default=0.0))
    pmf = tuple((int(t), float(p)) for t, p in f.fig("workload", "answer_tokens", default=[[2, 1.0]]))
    deadline = float(f.fig("workload", "deadline_ms", default=20000))
    mas = float(f.fig("edge_device", "mas_ms", default=0.0))
    edge_cv = float(f.fig("edge_device", "compute_cv", default=0.0))
    servers = int(f.fig("cloud_device", "servers", default=1))
    cloud_cv = float(f.fig("cloud_device", "compute_cv", default=0.0))
    if abs(sum(p for _, p in pmf) - 1) > 1e-6 or min(t for t, _ in pmf) < 1:
        f.problems.append(f"workload.answer_tokens: shares must sum to 1 and token counts be >= 1, got {pmf}")
    edge, large = _model(f, "edge"), _model(f, "large")
    timings = [_timing(f, key) for key in TIMINGS]
    if edge is not None and large is not None and edge.keep_ratios != large.keep_ratios:
        f.problems.append("models.edge and models.large need the same keep_tokens")
    upload_figures = _upload_figures(f)
    f.raise_if_any()
    assert edge is not None and large is not None and all(timings)
    devices = {"edge": str(f.section("edge_device").get("name", "edge")), "cloud": str(f.section("cloud_device").get("name", "cloud"))}
    ratios = edge.keep_ratios
    profiles = [_latency_profile(t, m.manifest, ratios, text_tokens, devices) for t, m in zip(timings, (edge, large, large))]
    mean_tokens = sum(n * p for n, p in pmf)
    models = tuple(ModelCalibration(m.name, m.manifest.model_hash, ratios, m.accuracy, mean_tokens) for m in (edge, large))
    large_with_edge = large.accuracy_with_edge_keep or large.accuracy
    uploads = tuple(
        UploadCalibration(
            form,
            ratios,
            tuple(max(0.0, a + delta) for a in large_with_edge),
            (nbytes,) * len(ratios),
            (build,) * len(ratios),
            tuple((e, max(0.0, g + delta)) for e, g in zip(edge.accuracy, large_with_edge)),
            (delta,) * len(ratios),
            (0.0,) * len(ratios),
        )
        for form, (nbytes, build, delta) in upload_figures.items()
    )
    pair = PairCalibration(
        edge.manifest.model_hash, large.manifest.model_hash, ratios, DV_THRESHOLDS, large_with_edge,
        tuple((1.0, 0.0) for _ in ratios), tuple((e, g) for e, g in zip(edge.accuracy, large_with_edge)), uploads=uploads,
    )  # fmt: skip
    # split="train" only because Calibration refuses anything else: these are published test-set
    # figures, and nothing is tuned on them (the two thresholds above are fixed, not chosen).
    cal = Calibration(CALIBRATION_FORMAT, "train", 0, 0, "published figures (simulation)", models, (pair,))
    return SimProfile(
        name=str(doc.get("name", path.stem)), title=str(doc.get("title", "")), benchmark=str(doc.get("benchmark", "")), path=str(path),
        edge=edge, large=large, edge_profile=profiles[0], large_edge_profile=profiles[1], large_cloud_profile=profiles[2],
        calibration=cal, text_tokens=text_tokens, image_bytes_mean=image_mean, image_bytes_sigma=image_sigma, answer_tokens_pmf=pmf,
        deadline_ms=deadline, mas_ms=mas, edge_cv=edge_cv, cloud_cv=cloud_cv, cloud_servers=max(1, servers),
        edge_device=devices["edge"], cloud_device=devices["cloud"], figures=tuple(f.figures),
    )  # fmt: skip
