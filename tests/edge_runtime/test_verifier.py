"""The commit verifier on real drafts of the built-in edge model: fit, stored, refused when damaged, used by the runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msao.edge_runtime.calibration import calibrate_models, load_calibration
from msao.edge_runtime.verifier import (
    BASE_FEATURES,
    CommitVerifier,
    DraftSample,
    auroc,
    expected_calibration_error,
    fit_commit_verifier,
)
from msao.errors import ConfigError


def _pair(calibration, models):
    edge, large = models
    return calibration.pair(edge.manifest.model_hash, large.manifest.model_hash)


def _drafts(models, n: int, keep_ratio: float = 1.0):
    """Drafts of the edge model on n easy-VQA train questions, with whether each is right."""
    from msao.datasets.easyvqa import load_easy_vqa

    edge, _ = models
    data = load_easy_vqa("train")
    samples, right = [], []
    for i in range(n):
        rgb, q = data.images[data.image_ids[i]], data.questions[i]
        p = edge.prepare(rgb, q, keep_ratio, analyse=False)
        a = edge.answer(p, q, signals=True)
        samples.append(DraftSample(a, p.mas, keep_ratio))
        right.append(a.text == data.answers[i])
    return samples, np.asarray(right)


def test_the_calibration_holds_a_verifier_measured_on_questions_it_was_not_fit_on(calibration, models):
    pair = _pair(calibration, models)
    v = pair.verifier
    assert v is not None and pair.held_out == 30 and v.held_out_questions == 30
    assert v.fit_questions == 30 * len(pair.keep_ratios)  # the first half of the questions, every keep ratio
    assert 0.0 <= v.auroc <= 1.0 and 0.0 <= v.ece <= 1.0 and sum(c for _, _, c in v.reliability) == 30 * len(pair.keep_ratios)
    assert len(v.feature_names) == len(v.weights) and v.exit_layers == models[0].manifest.exit_layers
    assert len(pair.oracle_commit_share) == len(pair.keep_ratios) and len(pair.confidence_accuracy) == len(pair.keep_ratios)


def test_the_verifier_scores_a_draft_from_its_signals_and_needs_them(calibration, models):
    pair = _pair(calibration, models)
    samples, _ = _drafts(models, 3, keep_ratio=0.5)
    scores = [pair.commit_score(s) for s in samples]
    assert all(0.0 < s < 1.0 for s in scores)
    assert scores == [pair.verifier.score(s) for s in samples]  # the same number every time
    edge, _ = models
    q = "what color is the shape?"
    bare = edge.answer(edge.prepare(np.zeros((64, 64, 3), np.uint8), q), q)  # generated without signals=True
    with pytest.raises(ConfigError, match="signals=True"):
        pair.commit_score(DraftSample(bare, None, 1.0))


def test_fitting_is_deterministic_and_separates_right_from_wrong_drafts_it_was_fit_on(models):
    samples, right = _drafts(models, 120)
    assert 0 < right.sum() < len(right), "the edge model is right on some drafts and wrong on others"
    a, b = fit_commit_verifier(samples, right), fit_commit_verifier(samples, right)
    assert a == b
    fitted = a.scores(samples)
    assert auroc(fitted, right) > 0.8  # on its own training drafts: the fit did fit (held-out numbers: msao calibrate)
    assert len(a.feature_names) == len(BASE_FEATURES) + 2 * len(a.exit_layers) + len(a.hidden_components)


def test_calibrating_twice_with_one_seed_gives_the_same_verifier(models):
    one = calibrate_models(*models, questions=40, keep_ratios=(1.0,), seed=3)
    two = calibrate_models(*models, questions=40, keep_ratios=(1.0,), seed=3)
    assert one.pairs[0].verifier is not None and one.pairs[0].verifier == two.pairs[0].verifier
    other = calibrate_models(*models, questions=40, keep_ratios=(1.0,), seed=4)
    assert other.pairs[0].verifier != one.pairs[0].verifier  # other train questions, another fit


def test_too_few_questions_keep_the_lowest_token_probability_rule(models):
    cal = calibrate_models(*models, questions=10, keep_ratios=(1.0,))
    pair = cal.pairs[0]
    assert pair.verifier is None and pair.held_out == 10
    samples, _ = _drafts(models, 1)
    assert pair.commit_score(samples[0]) == samples[0].answer.confidence


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda v: v.update(weights=v["weights"][:-1]), "features expected"),
        (lambda v: v.update(bias=float("nan")), "non-finite"),
        (lambda v: v.update(version=99), "verifier version"),
        (lambda v: v.update(extra=1), "unknown commit verifier keys"),
        (lambda v: v["hidden_components"][0].pop(), "hidden_components"),
    ],
)
def test_a_damaged_verifier_in_the_calibration_file_is_refused_with_the_fix(calibration, tmp_path, edit, message):
    d = json.loads(json.dumps(calibration.to_dict()))
    edit(d["pairs"][0]["verifier"])
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(d, allow_nan=True))
    with pytest.raises(ConfigError, match=message):
        load_calibration(path)


def test_a_calibration_file_of_the_previous_format_is_refused(calibration, tmp_path):
    d = json.loads(json.dumps(calibration.to_dict()))
    d["format_version"] = 1
    for pair in d["pairs"]:
        del pair["verifier"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="re-run `msao calibrate`"):
        load_calibration(path)


def test_a_verifier_fit_for_other_exit_heads_refuses_the_draft(calibration, models):
    from dataclasses import replace

    v = _pair(calibration, models).verifier
    other = replace(v, exit_layers=(5,))  # the same number of features, other heads
    samples, _ = _drafts(models, 1)
    with pytest.raises(ConfigError, match="exit-head signals"):
        other.score(samples[0])
    assert isinstance(v, CommitVerifier)


def test_auroc_and_calibration_error_on_known_values():
    assert auroc(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 1, 0, 0])) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([1, 1, 0, 0])) == 0.0
    assert auroc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5  # a tie counts half
    assert expected_calibration_error(np.array([0.95, 0.95]), np.array([1, 1])) == pytest.approx(0.05)
