"""Generation from ONNX files alone: real answers, pruned token sets, exit heads, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from msao.engines.bundle import load_bundle
from msao.engines.generation import Generator
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import FeedError, ImageError


@pytest.fixture(scope="module")
def cloud(cloud_bundle_dir):
    gen = Generator(load_bundle(cloud_bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=2)))
    yield gen
    gen.close()


def _accuracy(gen, data, rows, **kw):
    hits = 0
    for r in rows:
        enc = gen.encode_image(gen.pixels_from_bytes(data.image_pngs[data.image_ids[r]]))
        hits += gen.generate(enc, data.questions[r], **kw).text == data.answers[r]
    return hits / len(rows)


def test_cloud_bundle_answers_real_questions(cloud, easyvqa_test):
    assert _accuracy(cloud, easyvqa_test, range(200)) >= 0.9


def test_answer_carries_confidence_timings_and_stops_at_eos(cloud, easyvqa_test):
    ans = cloud.answer(easyvqa_test.image_pngs[0], "what color is the shape?")
    assert ans.text in {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
    assert ans.token_ids[-1] in cloud.eos and len(ans.token_ids) == 2
    assert 0.0 < ans.confidence <= 1.0 and ans.confidence == min(ans.token_probs)
    t = ans.timings
    assert t.vision_ms > 0 and t.prefill_ms > 0 and t.total_ms >= t.prefill_ms + t.vision_ms
    assert ans.kept_tokens == cloud.info.image_tokens


def test_pruned_token_set_keeps_positions_and_still_answers(cloud, easyvqa_test):
    rows = range(100)
    half = np.arange(0, cloud.info.image_tokens, 2)
    full = _accuracy(cloud, easyvqa_test, rows)
    pruned = _accuracy(cloud, easyvqa_test, rows, keep=half)
    # trained with random token dropout: half the tokens cost little accuracy
    assert pruned >= full - 0.1
    enc = cloud.encode_image(cloud.pixels_from_bytes(easyvqa_test.image_pngs[0]))
    assert cloud.generate(enc, "what color is the shape?", keep=half).kept_tokens == len(half)


def test_exit_heads_answer_with_fewer_layers(cloud, easyvqa_test):
    for k in cloud.bundle.manifest.exit_layers:
        ans = cloud.answer(easyvqa_test.image_pngs[0], "is there a red shape?", exit_layer=k)
        assert ans.exit_layer == k and ans.text in {"yes", "no"}
        assert cloud.stack(k).end == k


@pytest.mark.parametrize(
    "keep, msg",
    [
        (np.array([3, 1]), "sorted, unique"),
        (np.array([0, 0]), "sorted, unique"),
        (np.array([64]), r"in \[0, 64\)"),
        (np.array([], np.int64), "non-empty"),
        (np.array([0.5]), "integer"),
    ],
)
def test_rejects_bad_keep_sets(cloud, easyvqa_test, keep, msg):
    enc = cloud.encode_image(cloud.pixels_from_bytes(easyvqa_test.image_pngs[0]))
    with pytest.raises(FeedError, match=msg):
        cloud.generate(enc, "what color is the shape?", keep=keep)


def test_rejects_bytes_that_are_not_an_image(cloud):
    with pytest.raises(ImageError, match=r"cannot decode image \(11 bytes\).*send a JPEG or PNG"):
        cloud.answer(b"hello world", "what color is the shape?")


def test_rejects_pixels_of_the_wrong_shape(cloud):
    with pytest.raises(FeedError, match=r"pixel_values: got shape \(1, 3, 32, 32\), expected \(batch, 3, 64, 64\)"):
        cloud.encode_image(np.zeros((3, 32, 32), np.float32))


def test_question_containing_the_image_placeholder_is_refused(cloud, easyvqa_test):
    with pytest.raises(FeedError, match="must not contain the image placeholder"):
        cloud.answer(easyvqa_test.image_pngs[0], "what is <image>?")
