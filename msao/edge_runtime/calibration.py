"""Accuracy and confidence tables the scheduler plans with, measured on *train* data (easy-VQA or scenes).

The cost model needs, before a request runs, how accurate each plan will be: the edge model
and the large model at each keep ratio, and draft/verify at each commit threshold (the edge's
answer is committed when its confidence is at least the threshold, the cloud's otherwise).
``calibrate_models`` answers a seeded sample of train questions with both models through
``LocalModel`` — the daemon's own path — and tabulates:

    per model, per keep ratio r:      accuracy (own MAS keep-set)
    per pair, per r:                  large-model accuracy with the *edge's* MAS keep-set
    per pair, per r, per threshold θ: commit share P(conf_edge >= θ) and draft/verify accuracy
                                      mean(correct_edge if conf_edge >= θ else correct_large)

Thresholds are never tuned on test data: the scheduler picks θ from these train tables under
its accuracy floor, and ``msao eval``/the benchmark measure the result on test.

The file (``bundles/calibration.json`` by default) is strict JSON read into frozen dataclasses:
unknown keys, wrong lengths and values outside [0, 1] are refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from msao.errors import ConfigError
from msao.progress import progress_bar

__all__ = [
    "CALIBRATION_FORMAT",
    "DEFAULT_KEEP_RATIOS",
    "DEFAULT_THRESHOLDS",
    "Calibration",
    "calibrate_models",
    "load_calibration",
    "ModelCalibration",
    "PairCalibration",
    "save_calibration",
]

CALIBRATION_FORMAT = 1
DEFAULT_KEEP_RATIOS = (1.0, 0.5, 0.25, 0.125)
# 1.01: never commit the edge answer (always verify); 0: always commit it.
DEFAULT_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.01)


def _only_known(cls, d: dict) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(f"calibration: {cls.__name__} must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"calibration: unknown keys {unknown[:8]} in {cls.__name__}; re-run `msao calibrate`")
    return d


def _shares(values, n: int, what: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != n or not all(0.0 <= v <= 1.0 for v in out):
        raise ConfigError(f"calibration: {what} needs {n} values in [0, 1], got {list(out)[:8]}")
    return out


@dataclass(frozen=True)
class ModelCalibration:
    """One model alone, with its own MAS keep-sets."""

    name: str
    model_hash: str
    keep_ratios: tuple[float, ...]
    accuracy: tuple[float, ...]
    answer_tokens: float  # mean generated tokens per answer, EOS included (decode steps + 1)

    def __post_init__(self) -> None:
        _shares(self.keep_ratios, len(self.keep_ratios), "keep_ratios")
        _shares(self.accuracy, len(self.keep_ratios), f"{self.name} accuracy")

    def accuracy_at(self, keep_ratio: float) -> float:
        return _at(self.keep_ratios, self.accuracy, keep_ratio)

    @classmethod
    def from_dict(cls, d: dict) -> ModelCalibration:
        d = _only_known(cls, d)
        return cls(str(d["name"]), str(d["model_hash"]), tuple(d["keep_ratios"]), tuple(d["accuracy"]), float(d["answer_tokens"]))


@dataclass(frozen=True)
class PairCalibration:
    """An edge (draft) model and a large (verifying) model on the same questions.

    Rows follow ``keep_ratios``; columns follow ``thresholds``.
    """

    edge_hash: str
    large_hash: str
    keep_ratios: tuple[float, ...]
    thresholds: tuple[float, ...]
    large_accuracy: tuple[float, ...]  # large model fed the edge's MAS keep-set
    commit_share: tuple[tuple[float, ...], ...]
    accuracy: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        n, m = len(self.keep_ratios), len(self.thresholds)
        _shares(self.large_accuracy, n, "large_accuracy")
        if len(self.commit_share) != n or len(self.accuracy) != n:
            raise ConfigError(f"calibration: commit_share and accuracy need {n} rows")
        for row in (*self.commit_share, *self.accuracy):
            _shares(row, m, "a threshold row")

    def row(self, keep_ratio: float) -> int:
        if keep_ratio not in self.keep_ratios:
            raise ConfigError(f"keep ratio {keep_ratio} was not calibrated; calibrated: {list(self.keep_ratios)}")
        return self.keep_ratios.index(keep_ratio)

    @classmethod
    def from_dict(cls, d: dict) -> PairCalibration:
        d = _only_known(cls, d)
        return cls(
            str(d["edge_hash"]), str(d["large_hash"]), tuple(d["keep_ratios"]), tuple(float(t) for t in d["thresholds"]),
            tuple(d["large_accuracy"]), tuple(tuple(r) for r in d["commit_share"]), tuple(tuple(r) for r in d["accuracy"]),
        )  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    """What ``msao calibrate`` measured; the scheduler's accuracy model."""

    format_version: int
    split: str
    questions: int
    seed: int
    created_at: str
    models: tuple[ModelCalibration, ...]
    pairs: tuple[PairCalibration, ...]
    dataset: str = "easy-vqa"  # whose train questions (msao.datasets.vqa.DATASETS)

    def __post_init__(self) -> None:
        if self.format_version != CALIBRATION_FORMAT:
            raise ConfigError(f"calibration format {self.format_version}, this msao reads {CALIBRATION_FORMAT}; re-run `msao calibrate`")
        if self.split != "train":
            raise ConfigError(f"calibration must come from train data (got split {self.split!r}): thresholds tuned on test are not honest")

    def model(self, model_hash: str) -> ModelCalibration | None:
        return next((m for m in self.models if m.model_hash == model_hash), None)

    def pair(self, edge_hash: str, large_hash: str) -> PairCalibration | None:
        return next((p for p in self.pairs if p.edge_hash == edge_hash and p.large_hash == large_hash), None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        d = _only_known(cls, d)
        return cls(
            int(d["format_version"]), str(d["split"]), int(d["questions"]), int(d["seed"]), str(d["created_at"]),
            tuple(ModelCalibration.from_dict(m) for m in d["models"]), tuple(PairCalibration.from_dict(p) for p in d["pairs"]),
            str(d.get("dataset", "easy-vqa")),
        )  # fmt: skip


def _at(ratios: tuple[float, ...], values: tuple[float, ...], r: float) -> float:
    """Value at keep ratio ``r``: exact when calibrated, else linear between the nearest ratios."""
    pts = sorted(zip(ratios, values))
    if r <= pts[0][0]:
        return pts[0][1]
    for (r0, v0), (r1, v1) in zip(pts, pts[1:]):
        if r <= r1:
            return v0 + (v1 - v0) * (r - r0) / (r1 - r0)
    return pts[-1][1]


def save_calibration(calibration: Calibration, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration.to_dict(), indent=1) + "\n")
    tmp.replace(path)


def load_calibration(path: Path) -> Calibration:
    """Read and check a calibration file; ``ConfigError`` names the problem and the fix."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"no calibration at {path}; run `msao calibrate` (or `make export`)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"calibration {path} is unreadable ({exc}); run `msao calibrate` again") from None
    try:
        return Calibration.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"calibration {path} is malformed ({exc}); run `msao calibrate` again") from None


def calibrate_models(
    edge,
    large,
    *,
    dataset: str = "easy-vqa",
    questions: int = 2000,
    seed: int = 0,
    keep_ratios: tuple[float, ...] = DEFAULT_KEEP_RATIOS,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    progress: Callable[[str], None] = lambda _m: None,
) -> Calibration:
    """Measure the tables on ``questions`` seeded train questions of ``dataset`` (easy-vqa or scenes).

    Args:
        edge / large: ``LocalModel`` of the edge (draft) model and the large (cloud) model.
    """
    from msao.datasets.vqa import load_vqa

    data = load_vqa(dataset, "train")
    rows = np.random.default_rng(seed).permutation(len(data))[:questions]
    same_grid = edge.n_tokens == large.n_tokens
    n_r = len(keep_ratios)
    edge_ok = np.zeros((n_r, len(rows)), bool)
    edge_conf = np.zeros((n_r, len(rows)))
    large_ok = np.zeros((n_r, len(rows)), bool)  # own keep-set
    large_ok_edge_keep = np.zeros((n_r, len(rows)), bool)  # the edge's keep-set
    tokens = {edge.name: [], large.name: []}
    t0 = time.perf_counter()
    bar = progress_bar(len(rows), f"calibrate {edge.name} + {large.name}", "q")
    for j, i in enumerate(rows):
        rgb = data.images[data.image_ids[i]]
        q, truth = data.questions[i], data.answers[i]
        for a, r in enumerate(keep_ratios):
            pe = edge.prepare(rgb, q, r, analyse=False)
            ae = edge.answer(pe, q)
            edge_ok[a, j], edge_conf[a, j] = ae.text == truth, ae.confidence
            pl = large.prepare(rgb, q, r, analyse=False)
            al = large.answer(pl, q)
            large_ok[a, j] = al.text == truth
            if same_grid:
                large_ok_edge_keep[a, j] = large.answer(pl, q, keep=pe.keep).text == truth if pe.keep is not None else al.text == truth
            if r == 1.0:
                tokens[edge.name].append(len(ae.token_ids))
                tokens[large.name].append(len(al.token_ids))
        bar.update()
    bar.close()
    progress(f"calibrated {len(rows)} train questions in {time.perf_counter() - t0:.0f}s")
    if not same_grid:  # the large model then gets the whole image: its own accuracy at ratio 1
        large_ok_edge_keep[:] = large_ok[list(keep_ratios).index(1.0) if 1.0 in keep_ratios else 0]
    models = tuple(
        ModelCalibration(
            m.name,
            m.manifest.model_hash,
            tuple(keep_ratios),
            tuple(round(float(x), 5) for x in ok.mean(axis=1)),
            round(float(np.mean(tokens[m.name])) if tokens[m.name] else 2.0, 4),
        )  # fmt: skip
        for m, ok in ((edge, edge_ok), (large, large_ok))
    )
    commit = [[round(float((edge_conf[a] >= t).mean()), 5) for t in thresholds] for a in range(n_r)]
    acc = [[round(float(np.where(edge_conf[a] >= t, edge_ok[a], large_ok_edge_keep[a]).mean()), 5) for t in thresholds] for a in range(n_r)]
    pair = PairCalibration(
        edge.manifest.model_hash, large.manifest.model_hash, tuple(keep_ratios), tuple(thresholds),
        tuple(round(float(x), 5) for x in large_ok_edge_keep.mean(axis=1)), tuple(map(tuple, commit)), tuple(map(tuple, acc)),
    )  # fmt: skip
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Calibration(CALIBRATION_FORMAT, "train", len(rows), seed, created, models, (pair,), dataset)
