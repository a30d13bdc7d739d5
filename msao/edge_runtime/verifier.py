"""The commit verifier: P(the edge's draft is right), from signals every VLM has.

Draft/verify commits the edge model's answer when it is likely right and asks the large model
otherwise. The first token-probability threshold could not tell a right draft from a wrong one
(it committed 10 % of drafts while the edge was right on 87 %): a small model's probabilities
are not calibrated, and one number throws away what else the forward pass knew. The verifier
is a logistic regression over

    the final head: log of the lowest / mean / first token probability, the lowest and first
        top-1 - top-2 margin, the largest and mean normalised entropy, the answer's length and
        whether the budget cut it;
    the exit heads: each one's probability of the first answer token and whether its own top
        token agrees (an early opinion of the same model, read at prefill);
    the last hidden state at the prefill's last position, projected on its first principal
        components (a linear probe on what the model "thinks" before it answers);
    the request: the keep ratio and, where MAS ran (keep ratio < 1), its image / text / image
        necessity values.

Nothing reads the question's words or the workload's templates, so a user calibrating their own
model on their own labelled data gets the same machinery. ``msao calibrate`` fits it on one
part of the train questions and measures it (AUROC, calibration error, the commit tables the
scheduler plans with) on the other part; it is stored in the calibration file with
``VERIFIER_VERSION`` and refused when the feature layout does not match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from msao.engines.generation import Answer
from msao.engines.mas import MasResult
from msao.errors import ConfigError

__all__ = [
    "BASE_FEATURES",
    "VERIFIER_VERSION",
    "CommitVerifier",
    "DraftSample",
    "auroc",
    "expected_calibration_error",
    "fit_commit_verifier",
    "reliability_bins",
]

VERIFIER_VERSION = 1
BASE_FEATURES = (
    "log_min_prob", "mean_log_prob", "log_first_prob", "min_margin", "first_margin", "max_entropy", "mean_entropy",
    "answer_tokens", "cut_by_length", "keep_ratio", "mas_ran", "mas_image", "mas_text", "mas_image_necessity",
)  # fmt: skip
_EPS = 1e-6


@dataclass(frozen=True)
class DraftSample:
    """One draft as the verifier sees it: the answer (with ``signals``), MAS (None when it did not run), the keep ratio."""

    answer: Answer
    mas: MasResult | None
    keep_ratio: float


def _base_row(s: DraftSample) -> list[float]:
    a, sig = s.answer, s.answer.signals
    if sig is None:
        raise ConfigError("the commit verifier needs the draft's signals: generate it with signals=True")
    logp = np.log(np.maximum(np.asarray(a.token_probs, np.float64), _EPS))
    mas = s.mas.values if s.mas is not None and s.keep_ratio < 1.0 else None  # MAS runs at every ratio < 1, in calibration and serving
    return [
        float(logp.min()), float(logp.mean()), float(logp[0]), min(sig.token_margins), sig.token_margins[0],
        max(sig.token_entropies), float(np.mean(sig.token_entropies)), float(np.log1p(len(a.token_ids))),
        float(a.finish_reason == "length"), float(s.keep_ratio), float(mas is not None),
        mas.image if mas else 0.0, mas.text if mas else 0.0, mas.image_necessity if mas else 0.0,
    ]  # fmt: skip


def _exit_row(s: DraftSample, exits: tuple[int, ...]) -> list[float]:
    assert s.answer.signals is not None
    got = {k: (p, agree) for k, p, agree in s.answer.signals.exit_probs}
    if set(got) != set(exits):
        raise ConfigError(f"the draft has exit-head signals for layers {sorted(got)}, the verifier was fit with {list(exits)}")
    out: list[float] = []
    for k in exits:
        p, agree = got[k]
        out += [float(np.log(max(p, _EPS))), float(agree)]
    return out


@dataclass(frozen=True)
class CommitVerifier:
    """A fitted verifier (stored in the calibration file).

    Attributes:
        version: ``VERIFIER_VERSION`` of the feature layout.
        exit_layers: exit heads whose opinions are features (in this order).
        hidden_mean / hidden_components: the probe's projection, (D,) and (k, D).
        mean / scale: feature standardisation; weights / bias: the logistic regression.
        fit_questions / held_out_questions: train questions it was fit on / measured on.
        auroc / ece / confidence_auroc: on the held-out part: its AUROC and expected calibration
            error, and the AUROC of the lowest token probability alone (the old rule) for comparison.
        reliability: held-out (mean score, share right, count) per score bin: the reliability diagram.
    """

    version: int
    exit_layers: tuple[int, ...]
    hidden_mean: tuple[float, ...]
    hidden_components: tuple[tuple[float, ...], ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    fit_questions: int = 0
    held_out_questions: int = 0
    auroc: float = 0.0
    ece: float = 0.0
    confidence_auroc: float = 0.0
    reliability: tuple[tuple[float, float, int], ...] = ()

    def __post_init__(self) -> None:
        if self.version != VERIFIER_VERSION:
            raise ConfigError(f"commit verifier version {self.version}, this msao reads {VERIFIER_VERSION}; re-run `msao calibrate`")
        d = len(self.hidden_mean)
        if any(len(c) != d for c in self.hidden_components):
            raise ConfigError("commit verifier: hidden_components rows must match hidden_mean; re-run `msao calibrate`")
        n = len(BASE_FEATURES) + 2 * len(self.exit_layers) + len(self.hidden_components)
        if not (len(self.mean) == len(self.scale) == len(self.weights) == n):
            raise ConfigError(f"commit verifier: {n} features expected, got {len(self.weights)} weights; re-run `msao calibrate`")
        values = (*self.hidden_mean, *(x for c in self.hidden_components for x in c), *self.mean, *self.scale, *self.weights, self.bias)
        if not all(np.isfinite(values)) or min(self.scale, default=1.0) <= 0:
            raise ConfigError("commit verifier holds non-finite weights or a zero scale; re-run `msao calibrate`")

    @property
    def feature_names(self) -> tuple[str, ...]:
        exits = tuple(f"exit{k}_{what}" for k in self.exit_layers for what in ("log_first_prob", "agrees"))
        return (*BASE_FEATURES, *exits, *(f"hidden_pc{i}" for i in range(len(self.hidden_components))))

    def features(self, samples: Sequence[DraftSample]) -> np.ndarray:
        """Raw (unstandardised) features (n, F)."""
        comps = np.asarray(self.hidden_components, np.float64).reshape(-1, len(self.hidden_mean))
        return _raw_features(samples, self.exit_layers, np.asarray(self.hidden_mean), comps)

    def scores(self, samples: Sequence[DraftSample]) -> np.ndarray:
        z = (self.features(samples) - np.asarray(self.mean)) / np.asarray(self.scale)
        return _sigmoid(z @ np.asarray(self.weights) + self.bias)

    def score(self, sample: DraftSample) -> float:
        """P(the draft is right)."""
        return float(self.scores([sample])[0])

    @classmethod
    def from_dict(cls, d: dict) -> CommitVerifier:
        if not isinstance(d, dict):
            raise ConfigError(f"calibration: the commit verifier must be a JSON object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"calibration: unknown commit verifier keys {unknown[:8]}; re-run `msao calibrate`")
        d = dict(d)
        for k in ("exit_layers",):
            d[k] = tuple(int(x) for x in d[k])
        for k in ("hidden_mean", "mean", "scale", "weights"):
            d[k] = tuple(float(x) for x in d[k])
        d["hidden_components"] = tuple(tuple(float(x) for x in row) for row in d["hidden_components"])
        d["reliability"] = tuple((float(m), float(a), int(c)) for m, a, c in d.get("reliability", ()))
        return cls(**d)


def _hidden(samples: Sequence[DraftSample]) -> np.ndarray:
    return np.stack([np.asarray(s.answer.signals.final_hidden, np.float64) for s in samples])  # type: ignore[union-attr]


def _raw_features(samples: Sequence[DraftSample], exits: tuple[int, ...], hidden_mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    base = np.asarray([_base_row(s) + _exit_row(s, exits) for s in samples], np.float64)
    hidden = _hidden(samples)
    if hidden.shape[1] != len(hidden_mean):
        raise ConfigError(f"the draft's hidden state has width {hidden.shape[1]}, the verifier was fit on {len(hidden_mean)}")
    return np.concatenate([base, (hidden - hidden_mean) @ components.T], axis=1)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40, 40)))


def fit_commit_verifier(
    samples: Sequence[DraftSample], correct: np.ndarray, *, components: int = 16, l2: float = 1.0, iterations: int = 50
) -> CommitVerifier:
    """Fit the logistic regression by Newton's method (deterministic: no randomness at all).

    Args:
        samples / correct: drafts of train questions and whether each was right.
        components: principal components of the final hidden state used (at most its width).
        l2: ridge penalty on the standardised weights (not on the bias).
    """
    y = np.asarray(correct, np.float64)
    if len(samples) != len(y) or len(y) < 20:
        raise ConfigError(f"the commit verifier needs at least 20 labelled drafts, got {len(y)}")
    first = samples[0].answer.signals
    if first is None:
        raise ConfigError("the commit verifier needs the drafts' signals: generate them with signals=True")
    exits = tuple(k for k, _, _ in first.exit_probs)
    hidden = _hidden(samples)
    h_mean = hidden.mean(axis=0)
    _, _, vt = np.linalg.svd(hidden - h_mean, full_matrices=False)
    comps = vt[: min(components, vt.shape[0])]
    comps = comps * np.where(comps[:, :1] < 0, -1.0, 1.0)  # a fixed sign per component: the same fit every time
    x = _raw_features(samples, exits, h_mean, comps)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = np.concatenate([(x - mean) / scale, np.ones((len(y), 1))], axis=1)
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = _sigmoid(z @ w)
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return CommitVerifier(
        VERIFIER_VERSION, exits, tuple(float(v) for v in h_mean), tuple(tuple(float(v) for v in c) for c in comps),
        tuple(float(v) for v in mean), tuple(float(v) for v in scale), tuple(float(v) for v in w[:-1]), float(w[-1]),
        fit_questions=len(y),
    )  # fmt: skip


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic, ties counted half); 0.5 when one class is missing."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return 0.5
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks of ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def reliability_bins(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[tuple[float, float, int]]:
    """Per equal-width score bin: (mean score, share right, count); empty bins left out."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    idx = np.minimum((s * bins).astype(int), bins - 1)
    return [(float(s[idx == b].mean()), float(y[idx == b].mean()), int((idx == b).sum())) for b in range(bins) if (idx == b).any()]


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Mean |score - share right| over bins, weighted by their counts."""
    n = len(scores)
    return float(sum(c * abs(m - a) for m, a, c in reliability_bins(scores, labels, bins)) / max(1, n))
