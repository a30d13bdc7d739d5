"""Accuracy and confidence tables the scheduler plans with, measured on *train* data (easy-VQA or scenes).

The cost model needs, before a request runs, how accurate each plan will be: the edge model
and the large model at each keep ratio, and draft/verify at each commit threshold (the edge's
answer is committed when the commit verifier's P(right) is at least the threshold, the cloud's
otherwise; ``verifier.py``).
``calibrate_models`` answers a seeded sample of train questions with both models through
``LocalModel`` — the daemon's own path — and tabulates:

    per model, per keep ratio r:      accuracy (own MAS keep-set)
    per pair, per r:                  large-model accuracy with the *edge's* MAS keep-set
    per pair, per r, per threshold θ: commit share P(score_edge >= θ) and draft/verify accuracy
                                      mean(correct_edge if score_edge >= θ else correct_large)

    per pair, per upload form, per r: the large model's accuracy change when the image crosses
                                      the link in that form (``uploads.py``, paired with the file,
                                      less one standard error), its mean bytes and build time

The score is the verifier's, fit on the first half of the sampled train questions and
tabulated on the second half (held out from the fit, so the tables are not flattered by it);
with too few questions for a fit the score is the draft's lowest token probability, tabulated
on all of them. Thresholds are never tuned on test data: the scheduler picks θ from these train
tables under its accuracy floor, and ``msao eval``/the benchmark measure the result on test.

The file (``bundles/calibration.json`` by default) is strict JSON read into frozen dataclasses:
unknown keys, wrong lengths and values outside [0, 1] are refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from msao.edge_runtime.plans import UPLOAD_FORMS, sends_tokens
from msao.edge_runtime.verifier import (
    CommitVerifier,
    DraftSample,
    auroc,
    expected_calibration_error,
    fit_commit_verifier,
    reliability_bins,
)
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
    "UploadCalibration",
]

CALIBRATION_FORMAT = 3  # 2: the pair holds the commit verifier its thresholds apply to; 3: and its upload forms
MIN_VERIFIER_QUESTIONS = 40  # fewer sampled questions: no verifier, thresholds on the lowest token probability
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
class UploadCalibration:
    """The large model fed one upload form (``UPLOAD_FORMS``) instead of the file.

    Rows follow ``keep_ratios`` (a subset of the pair's: ``region`` forms exist only below 1),
    columns of ``accuracy`` the pair's thresholds. ``accuracy_delta`` is the form's accuracy
    minus the file's, paired question by question over every sampled question, and
    ``accuracy_se`` its standard error. The tables charge the delta minus one standard error
    (``large_accuracy`` = the file's + delta - se; ``accuracy`` = the file's draft/verify
    accuracy + (1 - commit share) x (delta - se), the form touching only verified requests),
    because the scheduler takes the best of several noisy estimates and would otherwise favour
    whichever form happened to be lucky on the sample. The scheduler adds ``charged`` to the
    accuracy of the same plan with the file, so a form is compared on the file's own baseline;
    ``large_accuracy`` is for the calibration report only. ``image_bytes`` is the mean size of what
    replaces the file (the image or the tokens and their scales, the keep-set not counted);
    ``build_ms`` the mean time to make it on the machine that calibrated.
    """

    form: str
    keep_ratios: tuple[float, ...]
    large_accuracy: tuple[float, ...]
    image_bytes: tuple[float, ...]
    build_ms: tuple[float, ...]
    accuracy: tuple[tuple[float, ...], ...]
    accuracy_delta: tuple[float, ...]
    accuracy_se: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.keep_ratios)
        if self.form not in UPLOAD_FORMS or self.form == "file":
            raise ConfigError(f"calibration: upload form {self.form!r} is not one of {list(UPLOAD_FORMS[1:])}")
        _shares(self.keep_ratios, n, f"{self.form} keep_ratios")
        _shares(self.large_accuracy, n, f"{self.form} large_accuracy")
        if len(self.image_bytes) != n or len(self.build_ms) != n or not all(b >= 0 for b in (*self.image_bytes, *self.build_ms)):
            raise ConfigError(f"calibration: {self.form} image_bytes and build_ms need {n} values >= 0")
        if len(self.accuracy) != n:
            raise ConfigError(f"calibration: {self.form} accuracy needs {n} rows")
        if len(self.accuracy_delta) != n or len(self.accuracy_se) != n:
            raise ConfigError(f"calibration: {self.form} accuracy_delta and accuracy_se need {n} values")

    def row(self, keep_ratio: float) -> int | None:
        return self.keep_ratios.index(keep_ratio) if keep_ratio in self.keep_ratios else None

    def charged(self, keep_ratio: float) -> float:
        """The accuracy change the scheduler charges a plan that sends this form instead of the file: delta - se."""
        b = self.row(keep_ratio)
        if b is None:
            raise ConfigError(f"upload {self.form} was not calibrated at keep ratio {keep_ratio}")
        return self.accuracy_delta[b] - self.accuracy_se[b] if self.accuracy_delta else 0.0

    @classmethod
    def from_dict(cls, d: dict) -> UploadCalibration:
        d = _only_known(cls, d)
        return cls(
            str(d["form"]), tuple(d["keep_ratios"]), tuple(d["large_accuracy"]), tuple(float(b) for b in d["image_bytes"]),
            tuple(float(t) for t in d["build_ms"]), tuple(tuple(r) for r in d["accuracy"]),
            tuple(float(x) for x in d["accuracy_delta"]), tuple(float(x) for x in d["accuracy_se"]),
        )  # fmt: skip


@dataclass(frozen=True)
class PairCalibration:
    """An edge (draft) model and a large (verifying) model on the same questions.

    Rows follow ``keep_ratios``; columns follow ``thresholds``, which apply to ``verifier``'s
    P(right) of a draft, or (``verifier`` None) to its lowest token probability. The draft/verify
    tables and ``large_accuracy`` come from the ``held_out`` questions the verifier was not fit on.
    """

    edge_hash: str
    large_hash: str
    keep_ratios: tuple[float, ...]
    thresholds: tuple[float, ...]
    large_accuracy: tuple[float, ...]  # large model fed the edge's MAS keep-set
    commit_share: tuple[tuple[float, ...], ...]
    accuracy: tuple[tuple[float, ...], ...]
    verifier: CommitVerifier | None = None
    held_out: int = 0  # questions the tables come from
    # on the same questions, for comparison: the share of drafts the hindsight oracle commits (the
    # draft is right, or the large model is wrong too), and the old rule's tables (lowest token probability)
    oracle_commit_share: tuple[float, ...] = ()
    confidence_commit_share: tuple[tuple[float, ...], ...] = ()
    confidence_accuracy: tuple[tuple[float, ...], ...] = ()
    uploads: tuple[UploadCalibration, ...] = ()  # the other upload forms than the file (whose tables are the ones above)

    def __post_init__(self) -> None:
        n, m = len(self.keep_ratios), len(self.thresholds)
        for u in self.uploads:
            if not set(u.keep_ratios) <= set(self.keep_ratios) or any(len(row) != m for row in u.accuracy):
                raise ConfigError(f"calibration: upload {u.form} needs keep ratios of the pair's and {m} thresholds per row")
            for row in u.accuracy:
                _shares(row, m, f"an upload {u.form} threshold row")
        _shares(self.large_accuracy, n, "large_accuracy")
        if len(self.commit_share) != n or len(self.accuracy) != n:
            raise ConfigError(f"calibration: commit_share and accuracy need {n} rows")
        for row in (*self.commit_share, *self.accuracy, *self.confidence_commit_share, *self.confidence_accuracy):
            _shares(row, m, "a threshold row")
        if self.oracle_commit_share:
            _shares(self.oracle_commit_share, n, "oracle_commit_share")
        if len(self.confidence_commit_share) not in (0, n) or len(self.confidence_accuracy) != len(self.confidence_commit_share):
            raise ConfigError(f"calibration: confidence_commit_share and confidence_accuracy need {n} rows (or none)")

    def row(self, keep_ratio: float) -> int:
        if keep_ratio not in self.keep_ratios:
            raise ConfigError(f"keep ratio {keep_ratio} was not calibrated; calibrated: {list(self.keep_ratios)}")
        return self.keep_ratios.index(keep_ratio)

    def commit_at_floor(self, keep_ratio: float, floor: float, confidence_rule: bool = False) -> float:
        """The largest commit share among thresholds whose draft/verify accuracy is at least ``floor`` (0 if none)."""
        a = self.row(keep_ratio)
        commit, acc = (self.confidence_commit_share, self.confidence_accuracy) if confidence_rule else (self.commit_share, self.accuracy)
        if not commit:
            return 0.0
        return max((c for c, x in zip(commit[a], acc[a]) if x >= floor - 1e-12), default=0.0)

    def upload(self, form: str) -> UploadCalibration | None:
        return next((u for u in self.uploads if u.form == form), None)

    def commit_score(self, sample: DraftSample) -> float:
        """What the thresholds compare: the verifier's P(right), else the draft's lowest token probability."""
        return self.verifier.score(sample) if self.verifier is not None else sample.answer.confidence

    @classmethod
    def from_dict(cls, d: dict) -> PairCalibration:
        d = _only_known(cls, d)
        verifier = CommitVerifier.from_dict(d["verifier"]) if d.get("verifier") is not None else None
        return cls(
            str(d["edge_hash"]), str(d["large_hash"]), tuple(d["keep_ratios"]), tuple(float(t) for t in d["thresholds"]),
            tuple(d["large_accuracy"]), tuple(tuple(r) for r in d["commit_share"]), tuple(tuple(r) for r in d["accuracy"]),
            verifier, int(d.get("held_out", 0)), tuple(d.get("oracle_commit_share", ())),
            tuple(tuple(r) for r in d.get("confidence_commit_share", ())), tuple(tuple(r) for r in d.get("confidence_accuracy", ())),
            tuple(UploadCalibration.from_dict(u) for u in d.get("uploads", ())),
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
    upload_forms: tuple[str, ...] | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> Calibration:
    """Measure the tables on ``questions`` seeded train questions of ``dataset`` (easy-vqa or scenes).

    Args:
        edge / large: ``LocalModel`` of the edge (draft) model and the large (cloud) model.
        upload_forms: the upload forms to tabulate besides the file (None: every form the pair
            allows, ``forms_for``; () = none, for a quick calibration).
    """
    from msao.datasets.vqa import load_vqa
    from msao.edge_runtime.uploads import forms_for, shares_encoder

    data = load_vqa(dataset, "train")
    rows = np.random.default_rng(seed).permutation(len(data))[:questions]
    same_grid = edge.n_tokens == large.n_tokens
    n_r = len(keep_ratios)
    allowed = [f for f in forms_for(send_keep=same_grid, shared_encoder=shares_encoder(edge.manifest, large.manifest)) if f != "file"]
    forms = allowed if upload_forms is None else [f for f in upload_forms if f in allowed]
    form_ratios = {f: tuple(r for r in keep_ratios if r < 1 or not f.startswith("region")) for f in forms}
    form_ok = {f: np.zeros((len(form_ratios[f]), len(rows)), bool) for f in forms}
    form_bytes = {f: np.zeros((len(form_ratios[f]), len(rows))) for f in forms}
    form_ms = {f: np.zeros((len(form_ratios[f]), len(rows))) for f in forms}
    edge_ok = np.zeros((n_r, len(rows)), bool)
    edge_conf = np.zeros((n_r, len(rows)))
    large_ok = np.zeros((n_r, len(rows)), bool)  # own keep-set
    large_ok_edge_keep = np.zeros((n_r, len(rows)), bool)  # the edge's keep-set
    drafts: list[list[DraftSample]] = [[] for _ in keep_ratios]
    tokens = {edge.name: [], large.name: []}
    t0 = time.perf_counter()
    bar = progress_bar(len(rows), f"calibrate {edge.name} + {large.name}", "q")
    for j, i in enumerate(rows):
        rgb = data.images[data.image_ids[i]]
        q, truth = data.questions[i], data.answers[i]
        edge_keeps: dict[float, np.ndarray | None] = {}
        large_full = None
        for a, r in enumerate(keep_ratios):
            pe = edge.prepare(rgb, q, r, analyse=False)
            edge_keeps[r] = pe.keep if same_grid else None
            ae = edge.answer(pe, q, signals=True)
            drafts[a].append(DraftSample(ae, pe.mas, r))
            edge_ok[a, j], edge_conf[a, j] = ae.text == truth, ae.confidence
            pl = large.prepare(rgb, q, r, analyse=False)
            al = large.answer(pl, q)
            large_ok[a, j] = al.text == truth
            if same_grid:
                large_ok_edge_keep[a, j] = large.answer(pl, q, keep=pe.keep).text == truth if pe.keep is not None else al.text == truth
            if r == 1.0:
                tokens[edge.name].append(len(ae.token_ids))
                tokens[large.name].append(len(al.token_ids))
                large_full = pl
        if large_full is None and any(sends_tokens(f) for f in forms):
            large_full = large.prepare(rgb, q, 1.0, analyse=False)
        for f in forms:
            for b, r in enumerate(form_ratios[f]):
                ok, form_bytes[f][b, j], form_ms[f][b, j] = _upload_answer(f, large, rgb, q, edge_keeps[r], large_full)
                form_ok[f][b, j] = ok == truth
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
        )
        for m, ok in ((edge, edge_ok), (large, large_ok))
    )
    verifier, score, tab = None, edge_conf, np.arange(len(rows))
    if len(rows) >= MIN_VERIFIER_QUESTIONS:  # fit on the first half of the questions (every ratio), tabulate on the second
        fit, tab = np.arange(len(rows) // 2), np.arange(len(rows) // 2, len(rows))
        verifier = fit_commit_verifier([drafts[a][j] for a in range(n_r) for j in fit], edge_ok[:, fit].reshape(-1))
        score = np.zeros_like(edge_conf)  # only the held-out drafts are scored: the tables read nothing else
        score[:, tab] = np.stack([verifier.scores([drafts[a][j] for j in tab]) for a in range(n_r)])
        held_score, held_ok = score[:, tab].reshape(-1), edge_ok[:, tab].reshape(-1)
        verifier = replace(
            verifier, held_out_questions=len(tab), auroc=round(auroc(held_score, held_ok), 5),
            ece=round(expected_calibration_error(held_score, held_ok), 5),
            confidence_auroc=round(auroc(edge_conf[:, tab].reshape(-1), held_ok), 5),
            reliability=tuple((round(m, 5), round(a, 5), c) for m, a, c in reliability_bins(held_score, held_ok)),
        )  # fmt: skip
        progress(
            f"commit verifier on {len(tab)} held-out questions: AUROC {verifier.auroc:.3f} (lowest token probability: "
            f"{verifier.confidence_auroc:.3f}), calibration error {verifier.ece:.3f}"
        )
    ok_e, ok_l = edge_ok[:, tab], large_ok_edge_keep[:, tab]

    def tables(sc: np.ndarray) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
        commit = [tuple(round(float((sc[a] >= t).mean()), 5) for t in thresholds) for a in range(n_r)]
        acc = [tuple(round(float(np.where(sc[a] >= t, ok_e[a], ok_l[a]).mean()), 5) for t in thresholds) for a in range(n_r)]
        return tuple(commit), tuple(acc)

    commit, acc = tables(score[:, tab])
    conf_commit, conf_acc = tables(edge_conf[:, tab]) if verifier is not None else ((), ())
    large_file = ok_l.mean(axis=1)
    uploads = []
    for f in forms:
        rs = form_ratios[f]
        deltas, ses, large_f, acc_f = [], [], [], []
        for b, r in enumerate(rs):
            a = list(keep_ratios).index(r)
            # paired with the file on every sampled question (the verifier's split does not touch the large model's answers)
            d = form_ok[f][b].astype(float) - large_ok_edge_keep[a].astype(float)
            delta, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
            margin = delta - se  # one standard error charged: the scheduler picks the best of several noisy forms
            deltas.append(round(delta, 5))
            ses.append(round(se, 5))
            large_f.append(round(min(1.0, max(0.0, float(large_file[a]) + margin)), 5))
            acc_f.append(tuple(round(min(1.0, max(0.0, x + (1 - c) * margin)), 5) for x, c in zip(acc[a], commit[a])))
        uploads.append(
            UploadCalibration(
                f,
                rs,
                tuple(large_f),
                tuple(round(float(x), 1) for x in form_bytes[f].mean(axis=1)),
                tuple(round(float(x), 3) for x in form_ms[f].mean(axis=1)),
                tuple(acc_f),
                tuple(deltas),
                tuple(ses),
            )
        )
    pair = PairCalibration(
        edge.manifest.model_hash, large.manifest.model_hash, tuple(keep_ratios), tuple(thresholds),
        tuple(round(float(x), 5) for x in ok_l.mean(axis=1)), commit, acc, verifier, len(tab),
        tuple(round(float(x), 5) for x in (ok_e | ~ok_l).mean(axis=1)), conf_commit, conf_acc, tuple(uploads),
    )  # fmt: skip
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Calibration(CALIBRATION_FORMAT, "train", len(rows), seed, created, models, (pair,), dataset)


def _upload_answer(form: str, large, rgb: np.ndarray, question: str, keep: np.ndarray | None, large_full) -> tuple[str, int, float]:
    """The large model's answer when the image crossed the link in ``form``, what crossed, and the time to build it.

    Image forms are decoded and encoded by the large model as its worker would; tokens forms
    round-trip the large model's own tokens (the edge's, since a tokens form needs a shared encoder).
    """
    from msao.cloud_bridge.codec import dequantize_rows
    from msao.edge_runtime.uploads import upload_tensors
    from msao.engines.images import decode_image

    m = large.manifest
    t0 = time.perf_counter()
    tensors = upload_tensors(
        form, image_file=b"", rgb=rgb, keep=keep, preprocess=m.preprocess, n_tokens=m.model.image_tokens,
        tokens=large_full.encoding.tokens if sends_tokens(form) else None,
    )  # fmt: skip
    build_ms = (time.perf_counter() - t0) * 1e3
    nbytes = sum(v.nbytes for k, v in tensors.items() if k != "keep")
    if "image" in tensors:
        prepared = large.prepare(decode_image(tensors["image"].tobytes()), question, 1.0, analyse=False)
    else:
        kept = tensors["image_tokens"]
        kept = dequantize_rows(kept, tensors["image_token_scales"]) if "image_token_scales" in tensors else kept.astype(np.float32)
        full = large_full.encoding.tokens.copy()
        full[tensors["keep"]] = kept
        prepared = replace(large_full, encoding=replace(large_full.encoding, tokens=full))
    return large.answer(prepared, question, keep=keep).text, nbytes, build_ms
