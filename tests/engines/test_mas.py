"""The NumPy MAS reference: its definition, its invariants (Hypothesis) and its answers to bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msao.engines.mas import (
    SCORE_UNITS,
    KeepSet,
    MasOptions,
    MasScores,
    analyse_mas,
    chance_relevance,
    combined_score,
    keep_order_from_scores,
    mas_from_scores,
    mas_scores_from_tensors,
    patch_change,
    patch_grid,
    score_units,
)
from msao.errors import ConfigError, MasInputError
from tests.strategies import mas_inputs, mas_options

RTOL = 1e-9  # float64 scores under a permutation differ only by summation order


def _scene(n_side: int = 8, obj: tuple[slice, slice] = (slice(2, 4), slice(3, 6)), seed: int = 0):
    """Features of a flat background with one bright object, tokens correlated with the features."""
    rng = np.random.default_rng(seed)
    n = n_side * n_side
    f = rng.normal(0.0, 0.01, (n_side, n_side, 16))
    f[obj] += 3.0
    f = f.reshape(n, 16).astype(np.float32)
    t = np.concatenate([f, rng.normal(0.0, 0.01, (n, 16))], axis=1).astype(np.float32)  # (N, 32)
    obj_mask = np.zeros((n_side, n_side), bool)
    obj_mask[obj] = True
    return f, t, obj_mask.reshape(-1)


# -- the definition on a picture we understand ----------------------------------------------------


def test_saliency_finds_the_object_and_the_background_is_its_trimmed_mean():
    f, t, obj = _scene()
    s = mas_scores_from_tensors(f, t, t[:1])
    assert s.saliency[obj].min() > 100 * s.saliency[~obj].max()
    assert s.saliency_max == pytest.approx(s.saliency.max())


def test_trimmed_background_beats_the_plain_mean_on_a_large_object():
    # an object covering 37.5 % of the image drags the plain mean a third of the way; the trimmed
    # mean stays on the background (both fail near 50 %, where "background" is ambiguous)
    f, t, obj = _scene(obj=(slice(0, 8), slice(0, 3)))
    s = mas_scores_from_tensors(f, t, t[:1]).saliency
    plain = ((f.astype(np.float64) - f.mean(0)) ** 2).sum(1)
    assert s[obj].min() > 100 * s[~obj].max()
    assert plain[obj].min() < 10 * plain[~obj].max()


def test_symmetric_images_trim_nothing_whatever_the_rounding():
    # two tokens mirror each other: both are exactly as far from the mean as the mean distance
    f = np.array([[0.1, 0.7, 0.3], [-0.1, -0.7, -0.3]], np.float32) + np.float32(0.2)
    s = mas_scores_from_tensors(f, f, f[:1])
    assert s.saliency[0] == pytest.approx(s.saliency[1], rel=1e-12)


def test_relevance_is_the_best_cosine_of_centred_tokens_with_any_content_word():
    f, t, obj = _scene()
    tc = t.astype(np.float64) - t.mean(0)
    word = tc[np.flatnonzero(obj)[0]] * 2.0  # a "word" pointing exactly at an object token
    s = mas_scores_from_tensors(f, t, np.stack([word, -word]).astype(np.float32))
    assert s.relevance[np.flatnonzero(obj)[0]] == pytest.approx(1.0, abs=1e-6)
    assert np.all(s.relevance >= -1 - 1e-9) and np.all(s.relevance <= 1 + 1e-9)
    assert s.grounding == pytest.approx(1.0, abs=1e-6)


def test_change_is_relative_squared_change_against_the_previous_tokens():
    f, t, _ = _scene()
    prev = t.copy()
    prev[5] *= 2.0  # ||t - 2t||² / ||2t||² = 1/4
    s = mas_scores_from_tensors(f, t, t[:1], prev)
    assert s.change[5] == pytest.approx(0.25, rel=1e-6)
    assert np.all(np.delete(s.change, 5) == 0.0)
    assert mas_scores_from_tensors(f, t, t[:1]).change is None


def test_combined_score_is_saliency_without_the_question_at_weight_zero():
    f, t, obj = _scene()
    s = mas_scores_from_tensors(f, t, t[:2])
    w0 = combined_score(s, MasOptions(relevance_weight=0.0))
    assert np.allclose(w0, s.saliency / s.saliency_max)
    w = combined_score(s, MasOptions(relevance_weight=0.5))
    assert np.all((w >= 0) & (w <= 1))


def test_relevance_counts_only_above_chance():
    assert chance_relevance(64, 2, 128) == pytest.approx(math.sqrt(2 * math.log(128) / 128))
    assert chance_relevance(1, 1, 1) == pytest.approx(0.99)  # capped: tiny shapes say nothing
    f, t, _ = _scene()
    s = mas_scores_from_tensors(f, t, t[:1])
    assert s.relevance_chance == chance_relevance(64, 1, 32)
    below = dataclasses.replace(s, relevance=np.full(64, s.relevance_chance * 0.99))
    assert np.allclose(combined_score(below, MasOptions(relevance_weight=1.0)), 0.0)


def test_keep_set_mixes_object_and_context_tokens_in_proportion():
    f, t, obj = _scene()  # 6 object tokens of 64
    res = analyse_mas(f, t, t[:1], options=MasOptions(keep_ratio=0.25, relevance_weight=0.0))
    kept = res.keep.mask()
    assert kept.sum() == 16
    assert round(16 * obj.sum() / 64) <= kept[obj].sum() <= round(16 * obj.sum() / 64) + 1  # 1 or 2 of 6
    # the first token of the order is context (|O| < |C|), the object's best follows soon
    order = keep_order_from_scores(res.scores, MasOptions(relevance_weight=0.0))
    assert not obj[order[0]] and obj[order[:8]].sum() >= 1


def test_single_token_budget_keeps_the_most_background_like_token():
    f, t, obj = _scene()
    res = analyse_mas(f, t, t[:1], options=MasOptions(keep_ratio=1 / 64, relevance_weight=0.0))
    assert res.keep.indices.tolist() == [int(np.argmin(res.scores.saliency))]


def test_mass_rule_keeps_the_fewest_tokens_holding_the_share():
    f, t, obj = _scene()
    opts = MasOptions(rule="mass", mass_share=0.9, keep_ratio=1.0, relevance_weight=0.0)
    res = analyse_mas(f, t, t[:1], options=opts)
    u = np.sort(score_units(combined_score(res.scores, opts)))[::-1]
    k = res.keep.indices.size
    assert u[:k].sum() >= math.ceil(0.9 * u.sum()) > u[: k - 1].sum()
    assert k <= obj.sum() + 1  # the object holds almost all the mass
    capped = analyse_mas(f, t, t[:1], options=dataclasses.replace(opts, keep_ratio=2 / 64))
    assert capped.keep.indices.size == 2


def test_mas_values_and_necessity():
    f, t, _ = _scene()
    opts = MasOptions(rule="topk")
    res = analyse_mas(f, t, t[:1], options=opts, content_words=2, question_tokens=8, visual_words=1)
    v = res.values
    assert v.image_necessity == 1.0 and not v.drop_image
    assert 0.8 < v.image < 1.0  # a few object tokens hold the score mass
    assert v.text == pytest.approx(1 - 2 / 8)
    deictic = analyse_mas(f, t, t[:1], content_words=0, question_tokens=3)
    assert deictic.values.image_necessity == 1.0 and deictic.values.text == 0.0
    # content words, none visual, not grounded above chance: the image is not needed; dropping it is opt-in
    ungrounded = dataclasses.replace(res.scores, relevance=np.zeros(64), grounding=0.0)
    off = mas_from_scores(ungrounded, MasOptions(drop_image_below=0.5), question_tokens=8)
    assert off.values.image_necessity == 0.0 and off.values.image == 1.0 and off.values.drop_image
    assert not mas_from_scores(ungrounded, MasOptions(), question_tokens=8).values.drop_image


def test_flat_image_keeps_the_floor_and_needs_every_token():
    f = np.ones((16, 4), np.float32)
    t = np.ones((16, 6), np.float32)
    res = analyse_mas(f, t, np.ones((1, 6), np.float32), options=MasOptions(keep_ratio=0.25), visual_words=1)
    assert res.scores.saliency_max == 0.0
    assert res.keep.indices.tolist() == [0, 1, 2, 3]  # ties broken by index
    assert res.values.image == pytest.approx(0.0)


def test_patch_change_and_grid():
    a = np.zeros((3, 16, 16), np.float32)
    b = a.copy()
    b[:, 8:, :8] = 1.0  # bottom-left patch of a 2x2 grid of 8-pixel patches
    assert patch_change(b, a, 8).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert patch_grid(64, 64, 64) == (8, 8, 8) and patch_grid(576, 336, 336) == (24, 24, 14)
    with pytest.raises(MasInputError, match="do not tile"):
        patch_grid(65, 64, 64)
    with pytest.raises(MasInputError, match="reset the stream"):
        patch_change(b, a[:, :8], 8)


# -- invariants -----------------------------------------------------------------------------------


@given(mas_inputs(), mas_options())
@settings(max_examples=150, deadline=None)
def test_keep_set_is_within_bounds(inputs, opts):
    f, t, q, prev = inputs
    res = analyse_mas(f, t, q, prev, options=opts)
    n = t.shape[0]
    idx = res.keep.indices
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0) and 0 <= idx[0] and idx[-1] < n
    cap = max(1, math.ceil(opts.keep_ratio * n - 1e-9))
    k = idx.size
    assert min(n, opts.min_keep) <= k <= max(min(n, opts.min_keep), cap)
    if opts.rule == "topk":
        assert k == min(n, max(cap, opts.min_keep))
    for v in (res.values.image, res.values.text, res.values.image_necessity):
        assert 0.0 <= v <= 1.0
    assert (res.changed is None) == (prev is None)


@given(mas_inputs(), mas_options(), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
@settings(max_examples=150, deadline=None)
def test_keep_set_is_monotone_in_the_ratio(inputs, opts, r1, r2):
    f, t, q, _ = inputs
    lo, hi = sorted((r1, r2))
    scores = mas_scores_from_tensors(f, t, q)
    small = set(mas_from_scores(scores, dataclasses.replace(opts, keep_ratio=lo)).keep.indices.tolist())
    large = set(mas_from_scores(scores, dataclasses.replace(opts, keep_ratio=hi)).keep.indices.tolist())
    assert small <= large


@given(mas_inputs(with_previous=True), st.integers(0, 2**32 - 1))
@settings(max_examples=150, deadline=None)
def test_scores_are_invariant_to_token_order(inputs, seed):
    # the definition uses only means, per-token terms and maxima over tokens: a permutation of
    # the tokens (features, tokens and previous tokens alike) permutes the scores and nothing else
    f, t, q, prev = inputs
    perm = np.random.default_rng(seed).permutation(t.shape[0])
    a = mas_scores_from_tensors(f, t, q, prev)
    b = mas_scores_from_tensors(f[perm], t[perm], q, prev[perm])
    scale = max(a.saliency_max, 1e-300)
    assert np.allclose(b.saliency, a.saliency[perm], rtol=RTOL, atol=RTOL * scale)
    assert np.allclose(b.relevance, a.relevance[perm], rtol=RTOL, atol=1e-12)
    assert np.allclose(b.change, a.change[perm], rtol=RTOL, atol=1e-15)
    assert math.isclose(a.saliency_max, b.saliency_max, rel_tol=RTOL, abs_tol=RTOL * scale)
    assert math.isclose(a.grounding, b.grounding, rel_tol=RTOL, abs_tol=1e-12)


@given(mas_inputs(), mas_options())
@settings(max_examples=100, deadline=None)
def test_keep_order_is_deterministic_and_a_permutation(inputs, opts):
    f, t, q, _ = inputs
    s = mas_scores_from_tensors(f, t, q)
    o1, o2 = keep_order_from_scores(s, opts), keep_order_from_scores(s, opts)
    assert np.array_equal(o1, o2) and sorted(o1.tolist()) == list(range(t.shape[0]))


def test_score_units_round_half_up_on_a_2_pow_24_grid():
    x = np.array([0.0, 1.0, 0.5 / SCORE_UNITS, 1.5 / SCORE_UNITS, -1.0, 2.0])
    assert score_units(x).tolist() == [0, SCORE_UNITS, 1, 2, 0, SCORE_UNITS]


# -- bad input ------------------------------------------------------------------------------------


def test_rejects_mismatched_shapes_listing_every_problem():
    f, t, _ = _scene()
    with pytest.raises(MasInputError) as e:
        mas_scores_from_tensors(f[:10], t, np.ones((2, 5), np.float32), t[:3])
    msg = str(e.value)
    assert "mas_features has 10 rows but image_tokens has 64" in msg
    assert "question_embeddings width 5 != image token width 32" in msg
    assert "frame size changed; reset the stream" in msg


@pytest.mark.parametrize("which", ["mas_features", "image_tokens", "question_embeddings", "previous_tokens"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_nan_and_inf_naming_the_tensor(which, bad):
    f, t, _ = _scene()
    arrays = {"mas_features": f.copy(), "image_tokens": t.copy(), "question_embeddings": t[:2].copy(), "previous_tokens": t.copy()}
    arrays[which][1, 3] = bad
    with pytest.raises(MasInputError, match=rf"{which}: 1 NaN/Inf values \(first at \(1, 3\)\)"):
        mas_scores_from_tensors(arrays["mas_features"], arrays["image_tokens"], arrays["question_embeddings"], arrays["previous_tokens"])


def test_rejects_an_empty_question_and_non_matrices():
    f, t, _ = _scene()
    with pytest.raises(MasInputError, match="empty question"):
        mas_scores_from_tensors(f, t, np.zeros((0, 32), np.float32))
    with pytest.raises(MasInputError, match="expected a 2-D float array"):
        mas_scores_from_tensors(f[0], t, t[:1])
    with pytest.raises(MasInputError, match="expected a 2-D float array"):
        mas_scores_from_tensors(f, t.astype(np.int64), t[:1])
    with pytest.raises(MasInputError, match="got 0 tokens"):
        mas_scores_from_tensors(f[:0], t[:0], t[:1])


@pytest.mark.parametrize("ratio", [0.0, -0.25, 1.5, float("nan"), float("inf")])
def test_rejects_keep_ratio_outside_0_1(ratio):
    with pytest.raises(ConfigError, match=r"keep_ratio must be in \(0, 1\]"):
        MasOptions(keep_ratio=ratio)


def test_rejects_other_bad_options_at_once():
    with pytest.raises(ConfigError) as e:
        MasOptions(rule="best", min_keep=0, relevance_weight=2.0)
    assert "rule must be one of" in str(e.value) and "min_keep" in str(e.value) and "relevance_weight" in str(e.value)


def test_keep_set_and_scores_check_themselves():
    with pytest.raises(MasInputError, match="sorted, unique"):
        KeepSet(np.array([3, 1], np.int64), 4, "topk")
    with pytest.raises(MasInputError, match="1 <= K <= 4"):
        KeepSet(np.array([], np.int64), 4, "topk")
    with pytest.raises(MasInputError, match="NaN or Inf"):
        MasScores(np.array([1.0, np.nan]), np.zeros(2), None, 1.0, 0.0, 1)
