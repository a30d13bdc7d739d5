"""Token-level speculation on real exported bundles: block verification is the large model's greedy answer, token for token.

The Qwen pair is random-initialised (tests/export/tiny_qwen.py): it rarely says its end token,
so its answers run to the budget and every block size meets accepted, rejected and bonus
tokens, at M-RoPE positions. The easy-VQA cloud model is the trained LLaVA built-in.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from msao.engines.bundle import load_bundle
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.engines.pipeline import RequestPipeline
from msao.engines.speculation import TokenSequence, VerifySession, accept_greedy
from msao.errors import FeedError
from msao.export.exporter import ExportOptions, export_bundle

from ..export.tiny_qwen import make_tiny_qwen

QUESTIONS = ("what color is the shape?", "what shape is in the image?", "is there a red shape?")


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-qwen")
    opts = ExportOptions(check_questions=4, profile_repeats=1, max_new_tokens=4)
    be = OnnxRuntimeBackend(OrtOptions(threads=1))
    out = []
    for name, arch, seed in (("edge", "qwen2_vl", 0), ("cloud", "qwen2_5_vl", 1)):
        export_bundle(make_tiny_qwen(root / f"{name}-model", arch, seed=seed), root / name, opts, progress=lambda _m: None)
        out.append(RequestPipeline(load_bundle(root / name), be))
    yield tuple(out)
    for p in out:
        p.close()


@pytest.fixture(scope="module")
def easy_cloud(cloud_bundle_dir: Path):
    p = RequestPipeline(load_bundle(cloud_bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    yield p
    p.close()


def _image(pipeline: RequestPipeline, seed: int):
    rgb = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # resized to the model's input
    return pipeline.encode(rgb)


def _random_drafts(committed: list[int], n: int, *, rng: np.random.Generator, vocab: int) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


def _speculate(large: RequestPipeline, enc, question: str, drafter, k: int, budget: int) -> tuple[list[int], VerifySession]:
    """Drive a session with blocks of ``k`` drafts from ``drafter(committed, k)`` until the answer ends."""
    session = VerifySession(large.generator(), enc, question, keep=None, max_new_tokens=budget)
    committed: list[int] = []
    while True:
        drafts = list(drafter(committed, k))
        verdict = session.verify(np.asarray(drafts, np.int64))
        assert verdict.token_ids[: verdict.accepted] == tuple(drafts[: verdict.accepted])
        committed += verdict.token_ids
        assert verdict.committed == len(committed)
        if verdict.finish_reason:
            return committed, session


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_blocks_of_edge_drafts_commit_exactly_the_large_models_greedy_answer(qwen_pair, k):
    edge, large = qwen_pair
    budget = 12
    lengths = []
    for i, question in enumerate(QUESTIONS):
        enc_large = _image(large, i)
        want = large.generator().generate(enc_large, question, max_new_tokens=budget)
        lengths.append(len(want.token_ids))
        enc_edge = _image(edge, i)

        def edge_drafts(committed: list[int], n: int, enc_edge=enc_edge, question=question) -> list[int]:
            """The edge model's greedy continuation of the committed answer."""
            seq = TokenSequence(edge.generator())
            probs = seq.start(enc_edge, question, tokens=np.asarray(committed, np.int64))
            out = []
            for _ in range(n):
                out.append(int(probs[-1].argmax()))
                probs = seq.feed(np.asarray(out[-1:], np.int64))
            return out

        got, session = _speculate(large, enc_large, question, edge_drafts, k, budget)
        assert tuple(got) == want.token_ids
        assert session.forward_passes <= len(got)
    assert sum(lengths) >= 4 * len(QUESTIONS), lengths  # random weights: long answers, so every k spans several blocks


def test_perfect_drafts_take_one_forward_pass_per_block_of_k_plus_one_tokens(qwen_pair):
    _, large = qwen_pair
    enc = _image(large, 7)
    budget, k = 12, 3
    want = large.generator().generate(enc, QUESTIONS[0], max_new_tokens=budget).token_ids
    got, session = _speculate(large, enc, QUESTIONS[0], lambda c, n: list(want[len(c) : len(c) + n]), k, budget)
    assert tuple(got) == want
    assert session.forward_passes == -(-budget // (k + 1))  # every block: k accepted + the large model's bonus token


def test_wrong_drafts_cost_passes_but_never_change_the_answer(qwen_pair, easy_cloud):
    for large in (qwen_pair[1], easy_cloud):
        enc = _image(large, 3)
        want = large.generator().generate(enc, QUESTIONS[1], max_new_tokens=10).token_ids
        random_drafts = functools.partial(_random_drafts, rng=np.random.default_rng(0), vocab=large.manifest.model.vocab_size)
        got, _ = _speculate(large, enc, QUESTIONS[1], random_drafts, 4, 10)
        assert tuple(got) == want


def test_an_accepted_end_token_ends_the_answer_where_the_large_model_ends_it(easy_cloud):
    enc = _image(easy_cloud, 1)
    want = easy_cloud.generator().generate(enc, QUESTIONS[0], max_new_tokens=8)
    assert want.finish_reason == "stop" and len(want.token_ids) < 8  # the trained model says its end token
    drafts = [*want.token_ids, 5, 6, 7]  # drafts past the end token are never committed
    session = VerifySession(easy_cloud.generator(), enc, QUESTIONS[0], keep=None, max_new_tokens=8)
    verdict = session.verify(np.asarray(drafts, np.int64))
    assert verdict.token_ids == want.token_ids and verdict.finish_reason == "stop" and verdict.accepted == len(want.token_ids)
    with pytest.raises(FeedError, match="already ended"):
        session.verify(np.asarray([1], np.int64))


@pytest.mark.parametrize("ahead", [1, 3, 20])
def test_decoding_ahead_commits_the_large_models_own_next_tokens_one_pass_each(qwen_pair, easy_cloud, ahead):
    """Wrong drafts, then ``ahead`` tokens of its own per verdict (within the budget, up to its end token): the same greedy answer."""
    for large in (qwen_pair[1], easy_cloud):
        enc = _image(large, 4)
        budget = 10
        want = large.generator().generate(enc, QUESTIONS[1], max_new_tokens=budget).token_ids
        session = VerifySession(large.generator(), enc, QUESTIONS[1], keep=None, max_new_tokens=budget)
        vocab = large.manifest.model.vocab_size
        got, verdicts = [], []
        while not session.finish_reason:
            wrong = [(want[len(got)] + 1) % vocab] if len(got) < len(want) else []  # a draft the model rejects
            v = session.verify(np.asarray(wrong, np.int64), ahead)
            got += v.token_ids
            verdicts.append(v)
        assert tuple(got) == want and verdicts[-1].finish_reason == ("stop" if want[-1] in large.generator().eos else "length")
        assert all(v.accepted == 0 and v.decoded == len(v.token_ids) - 1 for v in verdicts)
        assert all(v.decoded == ahead for v in verdicts[:-1]) and verdicts[-1].decoded <= ahead
        assert len(verdicts) == -(-len(want) // (ahead + 1)) and session.forward_passes == len(want)  # one pass per token


def test_a_decode_ahead_that_is_not_a_small_count_is_refused(easy_cloud):
    session = VerifySession(easy_cloud.generator(), _image(easy_cloud, 0), QUESTIONS[0], keep=None, max_new_tokens=4)
    for bad in (-1, True, 1.5, 10**6):
        with pytest.raises(FeedError, match="decode_ahead"):
            session.verify(np.asarray([], np.int64), bad)
    assert session.verify(np.asarray([], np.int64), 0).committed == 1 and session.forward_passes == 1


def test_rollback_leaves_the_cache_as_if_the_rejected_tokens_never_came(qwen_pair):
    _, large = qwen_pair
    enc = _image(large, 2)
    seq = TokenSequence(large.generator())
    seq.start(enc, QUESTIONS[2], tokens=np.asarray([9, 10], np.int64))
    seq.feed(np.asarray([11, 12, 13], np.int64))
    seq.rollback(3)
    after = seq.feed(np.asarray([20, 21], np.int64))
    fresh = TokenSequence(large.generator())
    want = fresh.start(enc, QUESTIONS[2], tokens=np.asarray([9, 10, 11, 20, 21], np.int64))
    np.testing.assert_allclose(after, want[-2:], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="roll back"):
        seq.rollback(seq.fed + 1)


def test_bad_drafts_are_refused_with_the_reason(easy_cloud):
    enc = _image(easy_cloud, 0)
    session = VerifySession(easy_cloud.generator(), enc, QUESTIONS[0], keep=None, max_new_tokens=4)
    vocab = easy_cloud.manifest.model.vocab_size
    with pytest.raises(FeedError, match="lie in"):
        session.verify(np.asarray([vocab], np.int64))
    with pytest.raises(FeedError, match="1-D integer"):
        session.verify(np.asarray([[1]], np.int64))
    with pytest.raises(FeedError, match="1-D integer"):
        session.verify(np.asarray([1.0]))
    assert session.verify(np.asarray([], np.int64)).committed == 1  # the refused blocks changed nothing


def test_accept_greedy_counts_the_leading_drafts_the_model_would_pick():
    probs = np.eye(5)[[1, 2, 3, 4]]  # picks 1, 2, 3, then 4 after the last draft
    assert accept_greedy(np.asarray([1, 2, 3]), probs) == 3
    assert accept_greedy(np.asarray([1, 0, 3]), probs) == 1
    assert accept_greedy(np.asarray([0, 2, 3]), probs) == 0
    with pytest.raises(ValueError):
        accept_greedy(np.asarray([1, 2]), probs)
