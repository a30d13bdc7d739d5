"""Keep policies and the question side of MAS, on the real edge bundle and real easy-VQA images."""

from __future__ import annotations

import numpy as np
import pytest

from msao.engines.bundle import load_bundle
from msao.engines.generation import Generator
from msao.engines.keep_policy import KEEP_POLICIES, keep_policy_from_name
from msao.engines.mas import MasOptions
from msao.engines.mas_text import QuestionEmbedder, content_token_mask, mas_question_from_text
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import ConfigError, MasInputError

TESTED_POLICIES = {"mas", "mas-blind", "saliency", "random"}


@pytest.fixture(scope="module")
def edge(edge_bundle_dir):
    gen = Generator(load_bundle(edge_bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def encodings(edge, easyvqa_test):
    rows = range(60)
    return [(edge.encode_image(edge.pixels_from_bytes(easyvqa_test.image_pngs[easyvqa_test.image_ids[i]])), i) for i in rows]


def test_every_registered_policy_is_tested():
    assert set(KEEP_POLICIES) == TESTED_POLICIES


@pytest.mark.parametrize("name", sorted(TESTED_POLICIES))
@pytest.mark.parametrize("ratio", [1.0, 0.25, 1 / 64])
def test_policy_returns_a_valid_keep_set_of_the_budget(name, ratio, edge, encodings, easyvqa_test):
    policy = keep_policy_from_name(name, MasOptions(keep_ratio=ratio))
    embed = QuestionEmbedder(edge)
    for enc, i in encodings[:10]:
        q = embed(easyvqa_test.questions[i])
        d = policy.decide(enc.tokens, enc.mas_features, q, request_id=i)
        assert d.keep.indices.size == max(1, round(ratio * 64)) and d.keep.n_tokens == 64
        assert (d.mas is not None) == name.startswith("mas")


def test_random_policy_repeats_per_request_and_differs_across_requests(encodings):
    enc, _ = encodings[0]
    p = keep_policy_from_name("random", MasOptions(keep_ratio=0.25), seed=3)
    a = p.decide(enc.tokens, enc.mas_features, request_id=7).keep.indices
    assert np.array_equal(
        a, keep_policy_from_name("random", MasOptions(keep_ratio=0.25), seed=3).decide(enc.tokens, enc.mas_features, request_id=7).keep.indices
    )
    assert not np.array_equal(a, p.decide(enc.tokens, enc.mas_features, request_id=8).keep.indices)


def test_saliency_keeps_the_shape_and_mas_adds_context(edge, encodings, easyvqa_test):
    from msao.export.train import foreground_from_images

    fg = foreground_from_images(easyvqa_test.images)  # (N, 64, 64): the shape's pixels
    fg_tokens = fg.reshape(-1, 8, 8, 8, 8).transpose(0, 1, 3, 2, 4).reshape(-1, 64, 64).any(-1)  # (N, 64)
    sal = keep_policy_from_name("saliency", MasOptions(keep_ratio=0.125))
    mas = keep_policy_from_name("mas", MasOptions(keep_ratio=0.125))
    embed = QuestionEmbedder(edge)
    on_shape_sal, on_shape_mas = [], []
    for enc, i in encodings:
        on = fg_tokens[easyvqa_test.image_ids[i]]
        on_shape_sal.append(on[sal.decide(enc.tokens, enc.mas_features).keep.indices].mean())
        on_shape_mas.append(on[mas.decide(enc.tokens, enc.mas_features, embed(easyvqa_test.questions[i])).keep.indices].mean())
    assert np.mean(on_shape_sal) > 0.8  # saliency finds the shape
    assert 0.05 < np.mean(on_shape_mas) < 0.6  # MAS keeps shape and context in proportion


def test_pruned_answers_stay_sane(edge, encodings, easyvqa_test):
    # loose bounds only: the checkpoints get retrained; docs/mas.md holds the measured numbers
    mas = keep_policy_from_name("mas", MasOptions(keep_ratio=0.25))
    embed = QuestionEmbedder(edge)
    full = pruned = 0
    for enc, i in encodings:
        q = easyvqa_test.questions[i]
        full += edge.generate(enc, q).text == easyvqa_test.answers[i]
        keep = mas.decide(enc.tokens, enc.mas_features, embed(q)).keep.indices
        pruned += edge.generate(enc, q, keep=keep).text == easyvqa_test.answers[i]
    assert pruned >= full - 0.2 * len(encodings) and pruned > 0.5 * len(encodings)


def test_mas_needs_the_question_and_unknown_policies_are_named(encodings):
    enc, _ = encodings[0]
    with pytest.raises(MasInputError, match="needs the question"):
        keep_policy_from_name("mas").decide(enc.tokens, enc.mas_features)
    with pytest.raises(ConfigError, match=r"unknown keep policy 'best'; choose one of \['mas', 'mas-blind', 'random', 'saliency'\]"):
        keep_policy_from_name("best")


# -- the question side ----------------------------------------------------------------------------


def test_content_words_skip_function_words_and_piece_marks():
    assert content_token_mask(["what", "color", "is", "the", "shape", "?"]).tolist() == [False, True, False, False, True, False]
    assert content_token_mask(["\u2581Is", "\u2581there", "\u2581a", "\u2581red", "##dish", "<image>"]).tolist() == [
        False,
        False,
        False,
        True,
        True,
        False,
    ]


def test_question_embeddings_are_the_content_words_rows(edge):
    q = mas_question_from_text(edge, "is there a red circle in the image?")
    assert q.content_words == 2 and q.visual_words == 2 and q.question_tokens == 9
    ids = [edge.tokenizer.token_to_id(w) for w in ("red", "circle")]
    rows = edge.runners["text_embed"].infer({"input_ids": np.asarray([ids], np.int64)})["embeddings"][0]
    assert np.array_equal(q.embeddings, rows)
    cached = QuestionEmbedder(edge)
    cached("what shape is red?")
    assert np.array_equal(cached("is there a red circle in the image?").embeddings, rows)


def test_deictic_question_uses_every_token(edge):
    q = mas_question_from_text(edge, "what is this?")
    assert q.content_words == 0 and q.embeddings.shape[0] == q.question_tokens


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_question_is_refused(edge, text):
    with pytest.raises(MasInputError, match="empty question"):
        mas_question_from_text(edge, text)
