"""The edge's speculation loop (``speculate``) against a large model's ``VerifySession`` in this process.

The verifier is the real session a worker runs, called directly instead of over MQTT, so the
loop's own logic is what is tested here: drafting ahead, reconciling and rolling back, the block
size, a lost session started again, and a cloud that vanishes mid-answer. The worker and the
link are tested through real processes in tests/cloud_bridge/test_worker.py and
tests/edge_runtime/test_qwen_pair.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from msao.edge_runtime.token_speculation import BlockReply, block_size, speculate
from msao.engines.speculation import TokenSequence, VerifySession
from msao.errors import CloudJobFailed, CloudUnavailable

from ..engines.test_speculation import QUESTIONS, _image, qwen_pair  # noqa: F401  (a fixture)

BUDGET = 10


class LocalVerifier:
    """``verify(drafts, committed, restart, ahead)`` as the daemon's link offers it, on a local session.

    ``lose_after``: the session is forgotten after that many blocks (a worker restart), once.
    ``fail_after``: every block after that many raises CloudUnavailable (the cloud is gone).
    """

    def __init__(self, large, enc, question, lose_after=None, fail_after=None):
        self.large, self.enc, self.question = large, enc, question
        self.lose_after, self.fail_after = lose_after, fail_after
        self.session = None
        self.calls = 0
        self.restarts = 0

    def __call__(self, drafts, committed, restart, ahead):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise CloudUnavailable("test: the worker and the link are gone")
        if restart:
            self.restarts += 1
            self.session = VerifySession(self.large.generator(), self.enc, self.question, keep=None, max_new_tokens=BUDGET)
        elif self.session is None:
            raise CloudJobFailed("test: this worker holds no speculation session", "session_unknown")
        elif len(self.session.committed) != len(committed):
            raise CloudJobFailed("test: committed lengths differ", "session_mismatch")
        v = self.session.verify(np.asarray(drafts, np.int64), ahead)
        if self.lose_after is not None and self.calls == self.lose_after:
            self.session, self.lose_after = None, None
        return BlockReply(v.token_ids, v.token_probs, v.committed, v.finish_reason)


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as p:
        yield p


def _run(qwen_pair, pool, seed, question, verifier_kw=None, **kw):  # noqa: F811
    edge, large = qwen_pair
    enc_edge, enc_large = _image(edge, seed), _image(large, seed)
    want = large.generator().generate(enc_large, question, max_new_tokens=BUDGET).token_ids
    verifier = LocalVerifier(large, enc_large, question, **(verifier_kw or {}))
    gen = edge.generator()
    seq = TokenSequence(gen)
    first = seq.start(enc_edge, question, capacity=BUDGET)[-1]
    opts = dict(budget=BUDGET, eos=gen.eos, round_trip_ms=20.0, edge_step_ms=2.0) | kw
    out = speculate(seq, first, verifier, pool.submit, **opts)
    return out, want, verifier


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_committed_answer_is_the_large_models_greedy_answer(qwen_pair, pool, seed):  # noqa: F811
    out, want, verifier = _run(qwen_pair, pool, seed, QUESTIONS[seed % len(QUESTIONS)])
    assert out.token_ids == want and out.fallback == "" and out.verified == len(want)
    assert out.blocks == verifier.calls and out.drafted == sum(out.block_sizes) and 0 <= out.accepted <= out.drafted
    assert out.edge_steps > 0  # the edge drafted (and rolled back) meanwhile


def test_a_first_block_of_zero_drafts_starts_the_cloud_prefill_at_once(qwen_pair, pool):  # noqa: F811
    out, want, _ = _run(qwen_pair, pool, 3, QUESTIONS[0], first_block=0)
    assert out.block_sizes[0] == 0 and out.token_ids == want


def test_a_lost_session_is_started_again_with_the_committed_tokens_and_the_answer_is_unchanged(qwen_pair, pool):  # noqa: F811
    out, want, verifier = _run(qwen_pair, pool, 4, QUESTIONS[1], verifier_kw={"lose_after": 2})
    assert verifier.restarts == 2  # the first block, and once after the loss
    assert out.token_ids == want and out.fallback == ""


def test_a_cloud_gone_mid_answer_leaves_the_edge_to_finish_after_the_verified_prefix(qwen_pair, pool):  # noqa: F811
    edge, _ = qwen_pair
    out, want, _ = _run(qwen_pair, pool, 5, QUESTIONS[2], verifier_kw={"fail_after": 3})
    assert out.fallback.startswith("CloudUnavailable") and 0 < out.verified < len(want)
    assert out.token_ids[: out.verified] == want[: out.verified]  # what the cloud committed stays committed
    seq = TokenSequence(edge.generator())  # the rest is the edge model's greedy continuation of that prefix
    probs = seq.start(_image(edge, 5), QUESTIONS[2], tokens=np.asarray(out.token_ids[: out.verified], np.int64), capacity=BUDGET)
    assert out.token_ids[out.verified] == int(probs[-1].argmax())
    assert len(out.token_ids) == BUDGET or out.token_ids[-1] in edge.generator().eos


@pytest.mark.parametrize("verifier_kw", [None, {"fail_after": 3}], ids=["whole", "cloud-gone"])
def test_each_verdict_passes_on_only_verified_tokens_each_a_prefix_of_the_answer(qwen_pair, pool, verifier_kw):  # noqa: F811
    """What a stream shows early is final: growing prefixes of the committed answer, never the edge's unverified drafts."""
    seen: list[tuple[int, ...]] = []
    out, want, verifier = _run(qwen_pair, pool, 7, QUESTIONS[1], verifier_kw, on_commit=seen.append)
    assert len(want) >= 3 and len(seen) >= 2  # several verdicts, each adding tokens
    assert all(len(a) < len(b) for a, b in zip(seen, seen[1:])) and all(out.token_ids[: len(t)] == t for t in seen)
    assert len(seen[-1]) == out.verified and all(want[: len(t)] == t for t in seen)  # the cloud model's tokens only
    assert (out.fallback == "") == (verifier_kw is None) and (out.verified == len(want)) == (verifier_kw is None)


@pytest.mark.parametrize("ahead", [2, BUDGET])
def test_decoding_ahead_takes_fewer_blocks_and_the_answer_stays_the_large_models(qwen_pair, pool, ahead):  # noqa: F811
    """The prompt's verdict and every later one carry ``ahead`` of the cloud's own tokens: the loop keeps them committed,
    the edge's cache follows them, and a budget within one verdict needs one round trip."""
    out, want, verifier = _run(qwen_pair, pool, 8, QUESTIONS[2], first_block=0, decode_ahead=ahead)
    base, _, _ = _run(qwen_pair, pool, 8, QUESTIONS[2], first_block=0)
    assert out.token_ids == want == base.token_ids and out.fallback == "" and out.verified == len(want)
    assert out.decoded > 0 and out.blocks < base.blocks and out.blocks == verifier.calls
    if ahead == BUDGET:
        assert out.blocks == 1 and out.decoded == len(want) - 1 and out.drafted == 0


@pytest.mark.parametrize("verifier_kw", [None, {"fail_after": 0}], ids=["cloud-answers", "cloud-gone"])
def test_an_edge_prefill_passed_as_a_callable_runs_only_when_a_draft_is_needed(qwen_pair, pool, verifier_kw):  # noqa: F811
    """The cloud decoding to the budget needs no draft: the edge never prefills; a cloud gone at once: it prefills and answers."""
    edge, large = qwen_pair
    verifier = LocalVerifier(large, _image(large, 10), QUESTIONS[1], **(verifier_kw or {}))
    want = large.generator().generate(_image(large, 10), QUESTIONS[1], max_new_tokens=BUDGET).token_ids
    gen = edge.generator()
    seq = TokenSequence(gen)
    calls = []

    def prefill():
        calls.append(1)
        return seq.start(_image(edge, 10), QUESTIONS[1], capacity=BUDGET)[-1]

    out = speculate(seq, prefill, verifier, pool.submit, budget=BUDGET, eos=gen.eos, round_trip_ms=20.0, edge_step_ms=2.0, first_block=0,
                    decode_ahead=BUDGET)  # fmt: skip
    if verifier_kw is None:
        assert calls == [] and out.token_ids == want and out.blocks == 1 and out.edge_steps == 0
    else:
        assert calls == [1] and out.fallback and out.verified == 0 and len(out.token_ids) >= 1 and out.edge_steps > 0


def test_a_prompt_block_sent_before_the_edge_prefill_is_the_loops_first_verdict(qwen_pair, pool):  # noqa: F811
    """The daemon sends the prompt first so the cloud's prefill overlaps the edge's: the loop uses that block, sends it not again."""
    edge, large = qwen_pair
    verifier = LocalVerifier(large, _image(large, 9), QUESTIONS[0])
    sent = pool.submit(verifier, [], [], True, 0)
    want = large.generator().generate(_image(large, 9), QUESTIONS[0], max_new_tokens=BUDGET).token_ids
    gen = edge.generator()
    seq = TokenSequence(gen)
    first = seq.start(_image(edge, 9), QUESTIONS[0], capacity=BUDGET)[-1]
    out = speculate(seq, first, verifier, pool.submit, budget=BUDGET, eos=gen.eos, round_trip_ms=20.0, edge_step_ms=2.0, first_block=0,
                    first_sent=sent)  # fmt: skip
    assert out.token_ids == want and out.fallback == "" and verifier.calls == out.blocks and verifier.restarts == 1
    with pytest.raises(ValueError, match="first_block=0"):
        speculate(seq, first, verifier, pool.submit, budget=BUDGET, eos=gen.eos, round_trip_ms=20.0, edge_step_ms=2.0, first_sent=sent)


def test_a_deadline_already_past_sends_no_block(qwen_pair, pool):  # noqa: F811
    out, _, verifier = _run(qwen_pair, pool, 6, QUESTIONS[0], deadline=0.0)
    assert verifier.calls == 0 and out.blocks == 0 and out.verified == 0 and "deadline" in out.fallback


def test_block_size_grows_with_acceptance_and_round_trip_and_shrinks_with_a_slow_edge():
    assert block_size(0.0, 50.0, 1.0) == 1  # nothing is ever accepted: one draft per block is all that pays
    assert block_size(0.9, 50.0, 1.0) > block_size(0.5, 50.0, 1.0) > 1
    assert block_size(0.8, 200.0, 5.0) >= block_size(0.8, 20.0, 5.0)
    assert block_size(0.8, 50.0, 50.0) <= block_size(0.8, 50.0, 1.0)
    assert 1 <= block_size(0.999, 1e6, 0.0) <= 16
