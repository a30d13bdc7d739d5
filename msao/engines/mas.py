"""MAS (Modality Activation Sparsity): the NumPy reference that *defines* it.

Owns the per-request analysis the edge runs before the expensive part: which image tokens
the question needs (spatial), what changed since the previous frame (temporal), whether a
modality is needed at all (modal), and one MAS value per modality in [0, 1]. The CUDA kernel
(``mas.cu`` via ``mas_cuda``) must reproduce ``mas_scores_from_tensors``; everything after the
scores (``mas_from_scores``: quantisation, strata, keep order, keep-set, MAS values) is shared
host code, so equal scores give bit-identical keep-sets on both paths. Knows nothing of
bundles, tokenizers or segments; formulas and their reasons are in ``docs/mas.md``.

    mas_features F (N, Dv) ──► saliency s (N,)   distance to a trimmed-mean background
    image tokens T (N, D) ─┬─► relevance r (N,)  max cosine to the question's content words Q (M, D)
    previous tokens P ─────┴─► change c (N,)     relative squared change ||T-P||² / ||P||²
    (s, r) ─quantise─► object / context strata ─► keep order ─► keep-set (top-k or mass) + MAS values

All arithmetic is float64 and deterministic; ties are broken by token index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from msao.errors import ConfigError, MasInputError

__all__ = [
    "KEEP_RULES",
    "SCORE_UNITS",
    "KeepSet",
    "MasOptions",
    "MasResult",
    "MasScores",
    "ModalityMas",
    "analyse_mas",
    "changed_tokens",
    "check_mas_inputs",
    "combined_score",
    "keep_count",
    "keep_order_from_scores",
    "mas_flops",
    "mas_from_scores",
    "mas_scores_from_tensors",
    "patch_change",
    "patch_grid",
    "chance_relevance",
    "score_units",
    "token_change",
]

KEEP_RULES = ("topk", "mass")

# Scores in [0, 1] are rounded to integer multiples of 2**-24 before any ranking or mass sum:
# the kernel and the reference then agree exactly unless a score lies within float64 rounding
# (~1e-16) of a grid boundary, and all later steps are exact integer arithmetic.
SCORE_UNITS = 1 << 24

_EPS = 1e-12
_TRIM_SLACK = 1.0 + 1e-9  # mas.cu: MAS_TRIM_SLACK


@dataclass(frozen=True)
class MasOptions:
    """Knobs of the MAS definition; the defaults are the settings documented in ``docs/mas.md``.

    Attributes:
        keep_ratio: share of image tokens to keep, in (0, 1]. The budget for ``rule="topk"``,
            the cap for ``rule="mass"``.
        rule: "topk" keeps ceil(keep_ratio * N) tokens; "mass" keeps the smallest number of
            tokens whose combined scores hold ``mass_share`` of the total, capped by keep_ratio.
        mass_share: q in (0, 1]; also defines the image MAS value (share of tokens outside
            the smallest set holding q of the score mass).
        min_keep: floor on kept tokens (clipped to N); never below 1.
        relevance_weight: lambda in [0, 1]; 0 makes MAS question-blind.
        object_threshold: theta in (0, 1); tokens whose normalised saliency reaches it form
            the object stratum, the rest the context stratum.
        change_threshold: a token counts as changed when ||T - P|| / ||P|| exceeds this.
        grounding_low / grounding_high: ramp mapping the chance-corrected grounding (best
            token/word relevance) to image necessity (below low: 0, above high: 1); used only
            when the question has content words but no visual word.
        drop_image_below: image necessity under which the image modality may be dropped;
            0 disables dropping (the default: see docs/mas.md for why).
    """

    keep_ratio: float = 0.25
    rule: str = "topk"
    mass_share: float = 0.9
    min_keep: int = 1
    relevance_weight: float = 0.5
    object_threshold: float = 0.1
    change_threshold: float = 0.05
    grounding_low: float = 0.0
    grounding_high: float = 0.2
    drop_image_below: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.keep_ratio, (int, float)) and 0.0 < self.keep_ratio <= 1.0):
            problems.append(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r} (e.g. 0.25 keeps a quarter of the image tokens)")
        if self.rule not in KEEP_RULES:
            problems.append(f"rule must be one of {KEEP_RULES}, got {self.rule!r}")
        if not 0.0 < self.mass_share <= 1.0:
            problems.append(f"mass_share must be in (0, 1], got {self.mass_share!r}")
        if self.min_keep < 1:
            problems.append(f"min_keep must be >= 1, got {self.min_keep!r}")
        if not 0.0 <= self.relevance_weight <= 1.0:
            problems.append(f"relevance_weight must be in [0, 1], got {self.relevance_weight!r}")
        if not 0.0 < self.object_threshold < 1.0:
            problems.append(f"object_threshold must be in (0, 1), got {self.object_threshold!r}")
        if not self.change_threshold >= 0.0:
            problems.append(f"change_threshold must be >= 0, got {self.change_threshold!r}")
        if not 0.0 <= self.grounding_low < self.grounding_high <= 1.0:
            problems.append(f"need 0 <= grounding_low < grounding_high <= 1, got {self.grounding_low!r}, {self.grounding_high!r}")
        if not 0.0 <= self.drop_image_below <= 1.0:
            problems.append(f"drop_image_below must be in [0, 1], got {self.drop_image_below!r}")
        if problems:
            raise ConfigError("invalid MAS options: " + "; ".join(problems))


@dataclass(frozen=True)
class MasScores:
    """What the fused pass computes (kernel or reference): per-token scores and reductions.

    Attributes:
        saliency: float64 (N,) squared distance of each early feature to the background.
        relevance: float64 (N,) best cosine between the centred image token and a content word.
        change: float64 (N,) relative squared change against the previous tokens; None without
            a previous frame.
        saliency_max: max of ``saliency`` (normalises it to [0, 1]).
        grounding: max of ``relevance`` (the image-modality reduction behind its necessity).
        content_words: M, question tokens used for relevance (0 = none were content words,
            all question tokens were used; the question is deictic, e.g. "what is this?").
        relevance_chance: r0, the best cosine that unrelated directions reach by chance for
            these shapes (``chance_relevance``); relevance counts only above it.
    """

    saliency: np.ndarray
    relevance: np.ndarray
    change: np.ndarray | None
    saliency_max: float
    grounding: float
    content_words: int
    relevance_chance: float = 0.0

    def __post_init__(self) -> None:
        n = self.saliency.shape[0] if self.saliency.ndim == 1 else -1
        arrays = {"saliency": self.saliency, "relevance": self.relevance}
        if self.change is not None:
            arrays["change"] = self.change
        bad = [f"{k} {v.dtype}{v.shape}" for k, v in arrays.items() if v.ndim != 1 or v.shape[0] != n or v.dtype != np.float64]
        if n < 1 or bad:
            raise MasInputError(f"MasScores needs float64 (N,) arrays with N >= 1 of one length; got {bad or ['saliency of length 0']}")
        if not all(np.isfinite(v).all() for v in arrays.values()) or not math.isfinite(self.saliency_max + self.grounding):
            raise MasInputError("MasScores contain NaN or Inf; check the tensors given to the MAS pass")
        if self.saliency_max < 0 or self.content_words < 0 or not 0.0 <= self.relevance_chance < 1.0:
            raise MasInputError(
                f"need saliency_max >= 0, content_words >= 0, 0 <= relevance_chance < 1; got {self.saliency_max}, "
                f"{self.content_words}, {self.relevance_chance}"
            )

    @property
    def n_tokens(self) -> int:
        return int(self.saliency.shape[0])


@dataclass(frozen=True)
class KeepSet:
    """Image tokens that enter prefill: sorted, unique indices into the N image tokens.

    Attributes:
        indices: int64 (K,), 1 <= K <= N, strictly increasing.
        n_tokens: N.
        rule: how K was chosen ("topk", "mass", or a baseline policy's name).
    """

    indices: np.ndarray
    n_tokens: int
    rule: str

    def __post_init__(self) -> None:
        idx = self.indices
        if idx.ndim != 1 or idx.dtype != np.int64 or not 1 <= idx.shape[0] <= self.n_tokens:
            raise MasInputError(f"keep-set must be int64 (K,) with 1 <= K <= {self.n_tokens}, got {idx.dtype}{idx.shape}")
        if idx[0] < 0 or idx[-1] >= self.n_tokens or np.any(np.diff(idx) <= 0):
            raise MasInputError(f"keep-set indices must be sorted, unique and in [0, {self.n_tokens}); got {idx.tolist()[:8]}")

    @property
    def ratio(self) -> float:
        return self.indices.shape[0] / self.n_tokens

    def mask(self) -> np.ndarray:
        """bool (N,), True for kept tokens."""
        m = np.zeros(self.n_tokens, bool)
        m[self.indices] = True
        return m


@dataclass(frozen=True)
class ModalityMas:
    """One MAS value per modality in [0, 1]: the share of that modality's tokens the request can do without.

    Attributes:
        image: 1 - image_necessity * K_q / N (K_q: tokens holding ``mass_share`` of the score mass).
        text: 1 - content words / question tokens (function words carry little of the request).
        image_necessity: how much the question needs the image, in [0, 1].
        drop_image: image_necessity < ``MasOptions.drop_image_below``; the plan may skip the image.
    """

    image: float
    text: float
    image_necessity: float
    drop_image: bool

    def __post_init__(self) -> None:
        for name in ("image", "text", "image_necessity"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise MasInputError(f"MAS value {name} = {v} is outside [0, 1]")


@dataclass(frozen=True)
class MasResult:
    """Everything MAS says about one request."""

    scores: MasScores
    keep: KeepSet
    values: ModalityMas
    changed: np.ndarray | None  # int64 indices of changed tokens; None without a previous frame


# -- the fused pass (what mas.cu computes) ------------------------------------------------------


def check_mas_inputs(
    mas_features: np.ndarray,
    image_tokens: np.ndarray,
    question_embeddings: np.ndarray,
    previous_tokens: np.ndarray | None = None,
    *,
    values: bool = True,
) -> None:
    """Collect every problem with the MAS inputs, then raise one ``MasInputError`` listing them.

    Args:
        values: also look for NaN/Inf (one pass over every tensor). The fused pass skips it
            and checks its outputs instead: any NaN/Inf input reaches them, and only then is
            the full report made.
    """
    problems = []
    arrays = {"mas_features": mas_features, "image_tokens": image_tokens, "question_embeddings": question_embeddings}
    if previous_tokens is not None:
        arrays["previous_tokens"] = previous_tokens
    for name, a in arrays.items():
        if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype.kind != "f":
            problems.append(f"{name}: expected a 2-D float array, got {getattr(a, 'dtype', type(a).__name__)}{getattr(a, 'shape', '')}")
    if problems:
        raise MasInputError("MAS inputs: " + "; ".join(problems))
    n, d = image_tokens.shape
    if n == 0:
        problems.append("image_tokens: got 0 tokens, expected N >= 1")
    if mas_features.shape[0] != n:
        problems.append(
            f"mas_features has {mas_features.shape[0]} rows but image_tokens has {n}: they must align 1:1 "
            "(same vision_feature_select_strategy; re-export the bundle)"
        )
    if question_embeddings.shape[0] == 0:
        problems.append("question_embeddings: empty question (0 tokens); ask a question with at least one word")
    if question_embeddings.shape[1] != d:
        problems.append(
            f"question_embeddings width {question_embeddings.shape[1]} != image token width {d}: both must come from one bundle"
        )
    if previous_tokens is not None and previous_tokens.shape != image_tokens.shape:
        problems.append(
            f"previous_tokens {previous_tokens.shape} != image_tokens {image_tokens.shape}: the frame size changed; reset the stream"
        )
    for name, a in arrays.items() if values else ():
        bad = ~np.isfinite(a)
        if bad.any():
            first = tuple(int(x) for x in np.argwhere(bad)[0])
            problems.append(f"{name}: {int(bad.sum())} NaN/Inf values (first at {first}); the encoder output is corrupt")
    if problems:
        raise MasInputError("MAS inputs: " + "; ".join(problems))


def mas_scores_from_tensors(
    mas_features: np.ndarray,
    image_tokens: np.ndarray,
    question_embeddings: np.ndarray,
    previous_tokens: np.ndarray | None = None,
    *,
    content_words: int | None = None,
) -> MasScores:
    """The fused pass over the token matrix: saliency, relevance, change and their reductions.

    Args:
        mas_features: (N, Dv) early vision features (``ImageEncoding.mas_features``).
        image_tokens: (N, D) projected image tokens, in the text embedding space.
        question_embeddings: (M, D) embeddings of the question's content words (or of all its
            tokens when it has none; pass ``content_words=0`` then).
        previous_tokens: (N, D) image tokens of the previous frame of the same stream, or None.
        content_words: recorded in the result; defaults to M.

    Raises:
        MasInputError: shapes disagree, a tensor holds NaN/Inf, or the question is empty.
    """
    check_mas_inputs(mas_features, image_tokens, question_embeddings, previous_tokens, values=False)
    with np.errstate(all="ignore"):  # NaN/Inf inputs are reported from the outputs below, not as warnings
        return _fused_pass(mas_features, image_tokens, question_embeddings, previous_tokens, content_words)


def _fused_pass(mas_features, image_tokens, question_embeddings, previous_tokens, content_words) -> MasScores:
    f = mas_features.astype(np.float64)
    t = image_tokens.astype(np.float64)
    q = question_embeddings.astype(np.float64)

    # saliency: distance to a trimmed-mean background (mean of the tokens no farther than average
    # from the image mean), robust to large objects where the plain mean drifts towards them.
    x = f - f.mean(axis=0)  # (N, Dv)
    d = np.einsum("ij,ij->i", x, x)  # (N,)
    # never empty: min(d) <= mean(d). The 1e-9 slack puts mathematically equal distances (symmetric
    # images) on the same side in every implementation, whatever their summation order.
    near = (d <= d.mean() * _TRIM_SLACK).astype(np.float64)
    x = f - (near @ f) / near.sum()  # (N, Dv), minus the background (Dv,)
    saliency = np.einsum("ij,ij->i", x, x)  # (N,)

    # relevance: cosine between centred image tokens and each content word, best word per token.
    tc = t - t.mean(axis=0)  # (N, D)
    tn = np.sqrt(np.einsum("ij,ij->i", tc, tc))  # (N,)
    qn = np.sqrt(np.einsum("ij,ij->i", q, q))  # (M,)
    relevance = ((tc @ q.T) / np.maximum(np.outer(tn, qn), _EPS)).max(axis=1)  # (N, M) -> (N,)

    change = None if previous_tokens is None else token_change(t, previous_tokens)
    if not np.isfinite(saliency.sum() + relevance.sum() + (0.0 if change is None else change.sum())):  # NaN/Inf reach the sums
        check_mas_inputs(mas_features, image_tokens, question_embeddings, previous_tokens)  # names the bad tensor
        raise MasInputError("MAS scores are not finite although the inputs are; report this with the inputs")

    return MasScores(
        saliency=saliency,
        relevance=relevance,
        change=change,
        saliency_max=float(saliency.max()),
        grounding=float(relevance.max()),
        content_words=q.shape[0] if content_words is None else int(content_words),
        relevance_chance=chance_relevance(f.shape[0], q.shape[0], t.shape[1]),
    )


# -- shared host code: from scores to keep-set and MAS values ----------------------------------


def chance_relevance(n_tokens: int, n_words: int, width: int) -> float:
    """r0 = sqrt(2 ln(N * M) / D), capped at 0.99: about the largest cosine among N * M pairs of random directions in D dims.

    Why: a max over many cosines is positive even when the embeddings know nothing of each
    other (measured on msao-tiny-cloud: image tokens and word embeddings are not aligned, the
    best cosine sits near r0). Counting relevance only above r0 keeps noise out of the score.
    """
    return float(min(0.99, math.sqrt(2.0 * math.log(max(n_tokens * n_words, 2)) / max(width, 1))))


def _relevance_above_chance(scores: MasScores) -> np.ndarray:
    r0 = scores.relevance_chance
    return np.clip((scores.relevance - r0) / (1.0 - r0), 0.0, 1.0)


def score_units(x: np.ndarray) -> np.ndarray:
    """float64 scores in [0, 1] -> int64 multiples of 2**-24 (round half up), the exact ranking key."""
    return (np.clip(x, 0.0, 1.0) * SCORE_UNITS + 0.5).astype(np.int64)  # truncation of a non-negative value = floor


def _normalised_saliency(scores: MasScores) -> np.ndarray:
    if scores.saliency_max <= 0.0:
        return np.zeros_like(scores.saliency)  # a flat image: no token stands out
    return scores.saliency / scores.saliency_max


def combined_score(scores: MasScores, options: MasOptions) -> np.ndarray:
    """w = (1 - lambda) * s / max(s) + lambda * clip((r - r0) / (1 - r0), 0, 1), float64 (N,) in [0, 1]."""
    lam = options.relevance_weight
    return (1.0 - lam) * _normalised_saliency(scores) + lam * _relevance_above_chance(scores)


def keep_order_from_scores(scores: MasScores, options: MasOptions) -> np.ndarray:
    """Priority of every token, int64 (N,): the keep-set of size k is the first k entries.

    Tokens split into an object stratum (normalised saliency >= theta) and a context stratum.
    Object tokens are ranked by combined score, highest first (this is where the question
    acts); context tokens by saliency, lowest first (the most background-like token carries
    the scene summary best under the encoder's global attention). Ties: lower index first.
    The two rankings are interleaved in proportion to the strata sizes, so any prefix holds
    about k * |O| / N object tokens. Why: the decoder was trained on random token subsets,
    and a keep-set of object tokens only is far from that distribution (measured:
    docs/mas.md). Because the order is fixed, keep-sets are nested: a larger ratio never
    drops a token.
    """
    u = score_units(combined_score(scores, options))
    return _keep_order(u, score_units(_normalised_saliency(scores)), options)


def _keep_order(u: np.ndarray, sal: np.ndarray, options: MasOptions) -> np.ndarray:
    """Keep order from combined-score units ``u`` and normalised-saliency units ``sal`` (both int64 (N,))."""
    is_obj = sal >= int(options.object_threshold * SCORE_UNITS + 0.5)
    obj, ctx = np.flatnonzero(is_obj), np.flatnonzero(~is_obj)
    obj = obj[np.argsort(-u[obj], kind="stable")]  # combined score desc; stable: ties keep index order
    ctx = ctx[np.argsort(sal[ctx], kind="stable")]  # saliency asc, ties by index
    # proportional interleave: the j-th of a stratum of size m sits at (j + 1/2) / m; cross-multiplied
    # to integers: key_obj = (2j + 1) * |C|, key_ctx = (2j + 1) * |O|. A stable sort of [objects,
    # contexts] by key puts the object first on equal keys; keys within a stratum are distinct.
    key = np.concatenate([(2 * np.arange(obj.size) + 1) * max(ctx.size, 1), (2 * np.arange(ctx.size) + 1) * max(obj.size, 1)])
    return np.concatenate([obj, ctx]).astype(np.int64)[np.argsort(key, kind="stable")]


def keep_count(scores: MasScores, options: MasOptions) -> int:
    """How many tokens to keep: the budget of the rule, with the floor, within [1, N]."""
    return _keep_count(scores.n_tokens, score_units(combined_score(scores, options)) if options.rule == "mass" else None, options)


def _keep_count(n: int, units: np.ndarray | None, options: MasOptions) -> int:
    cap = max(1, math.ceil(options.keep_ratio * n - 1e-9))
    k = cap if options.rule == "topk" or units is None else min(cap, _mass_count(units, options.mass_share))
    return int(min(n, max(k, options.min_keep)))


def _mass_count(units: np.ndarray, share: float) -> int:
    """Smallest number of highest-scored tokens holding ``share`` of the total (exact integers)."""
    total = int(units.sum())
    if total == 0:
        return units.shape[0]  # no token stands out: all are equally needed
    need = math.ceil(share * total)
    csum = np.cumsum(np.sort(units)[::-1])
    return int(np.searchsorted(csum, need, side="left")) + 1


def changed_tokens(scores: MasScores, options: MasOptions) -> np.ndarray | None:
    """int64 indices of tokens whose relative change exceeds ``change_threshold``; None without a previous frame."""
    if scores.change is None:
        return None
    return np.nonzero(scores.change > options.change_threshold**2)[0].astype(np.int64)


def mas_from_scores(
    scores: MasScores, options: MasOptions, *, question_tokens: int | None = None, visual_words: int = 0
) -> MasResult:
    """Keep-set, MAS values and changed tokens from the fused pass's scores (shared by all paths).

    Args:
        question_tokens: all tokens of the question (content words included); defaults to the
            content word count, i.e. a text MAS value of 0.
        visual_words: content words that name something only an image can answer (colour,
            shape, position, count; ``mas_text.VISUAL_WORDS``): any makes the image necessary.
    """
    n = scores.n_tokens
    u = score_units(combined_score(scores, options))  # computed once; every later step is integer
    order = _keep_order(u, score_units(_normalised_saliency(scores)), options)
    k_q = _mass_count(u, options.mass_share)
    k = _keep_count(n, u, options)
    keep = KeepSet(np.sort(order[:k]), n, options.rule)

    if scores.content_words == 0 or visual_words > 0:
        necessity = 1.0  # deictic ("what is this?") or visual ("what colour ...?"): only the image can answer
    else:  # content words, none visual: necessary as far as they are grounded in the image tokens
        r0 = scores.relevance_chance
        grounded = (scores.grounding - r0) / (1.0 - r0)
        ramp = (grounded - options.grounding_low) / (options.grounding_high - options.grounding_low)
        necessity = float(min(1.0, max(0.0, ramp)))
    total_q = max(question_tokens or scores.content_words, 1)
    used = min(scores.content_words or total_q, total_q)  # content_words == 0: every question token was used
    text_mas = 1.0 - used / total_q
    values = ModalityMas(
        image=float(1.0 - necessity * k_q / n),
        text=float(text_mas),
        image_necessity=necessity,
        drop_image=necessity < options.drop_image_below,
    )
    return MasResult(scores=scores, keep=keep, values=values, changed=changed_tokens(scores, options))


def analyse_mas(
    mas_features: np.ndarray,
    image_tokens: np.ndarray,
    question_embeddings: np.ndarray,
    previous_tokens: np.ndarray | None = None,
    *,
    options: MasOptions = MasOptions(),
    content_words: int | None = None,
    question_tokens: int | None = None,
    visual_words: int = 0,
) -> MasResult:
    """The whole MAS analysis with the NumPy reference pass (see ``mas_scores_from_tensors``)."""
    scores = mas_scores_from_tensors(mas_features, image_tokens, question_embeddings, previous_tokens, content_words=content_words)
    return mas_from_scores(scores, options, question_tokens=question_tokens, visual_words=visual_words)


def token_change(tokens: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Relative squared change per token, float64 (N,): ||T_i - P_i||² / (||P_i||² + eps)."""
    t = np.asarray(tokens, np.float64)  # no copy when already float64 (the fused pass)
    p = np.asarray(previous, np.float64)
    x = t - p
    return np.einsum("ij,ij->i", x, x) / (np.einsum("ij,ij->i", p, p) + _EPS)  # (N, D) -> (N,)


def patch_change(pixels: np.ndarray, previous: np.ndarray, patch: int) -> np.ndarray:
    """Mean absolute pixel change per patch, float64 (H/p * W/p,) in row-major patch order.

    Runs before the encoder (it decides whether the encoder runs at all), on preprocessed
    pixels (3, H, W); patch order matches the image tokens of a ViT with patch size ``p``.
    """
    if pixels.shape != previous.shape:
        raise MasInputError(f"frame {pixels.shape} differs from the previous frame {previous.shape}; reset the stream")
    if pixels.ndim != 3 or pixels.shape[1] % patch or pixels.shape[2] % patch:
        raise MasInputError(f"pixels must be (C, H, W) with H and W multiples of the patch size {patch}, got {pixels.shape}")
    c, h, w = pixels.shape
    diff = np.abs(pixels.astype(np.float64) - previous.astype(np.float64))  # (C, H, W)
    per = diff.reshape(c, h // patch, patch, w // patch, patch).mean(axis=(0, 2, 4))  # (H/p, W/p)
    return per.reshape(-1)


def patch_grid(n_tokens: int, height: int, width: int) -> tuple[int, int, int]:
    """(rows, cols, patch) of a ViT whose N image tokens tile a height x width input, row-major.

    Raises:
        MasInputError: the tokens do not tile the image in square patches (e.g. a kept CLS token).
    """
    for patch in range(1, min(height, width) + 1):
        if height % patch == 0 and width % patch == 0 and (height // patch) * (width // patch) == n_tokens:
            return height // patch, width // patch, patch
    raise MasInputError(
        f"{n_tokens} image tokens do not tile a {height}x{width} input in square patches; "
        "MAS maps tokens to patches only for vision_feature_select_strategy 'default' (CLS dropped)"
    )


def mas_flops(n_tokens: int, feature_width: int, token_width: int, words: int, *, previous: bool = False) -> int:
    """Floating-point operations of the fused pass (a multiply-add counts 2), as docs/mas.md derives them.

    saliency 9 N Dv (mean, distances, trimmed mean, distances) + relevance N D (4 + 2 M)
    (centring, norms, M dot products) + change 5 N D with a previous frame. The host part
    sorts N integers and is not counted.
    """
    n, dv, d, m = n_tokens, feature_width, token_width, words
    return 9 * n * dv + n * d * (4 + 2 * m) + 2 * m * d + (5 * n * d if previous else 0)
