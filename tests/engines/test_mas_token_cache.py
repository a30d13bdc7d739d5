"""The stream token cache (edge) and its mirror (cloud), with the real edge bundle's encoder."""

from __future__ import annotations

import numpy as np
import pytest

from msao.engines.bundle import load_bundle
from msao.engines.generation import Generator
from msao.engines.images import pixels_from_image
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.engines.token_cache import StreamTokenCache, TokenCacheOptions, TokenDelta, TokenMirror
from msao.errors import ConfigError, StreamError


@pytest.fixture(scope="module")
def edge(edge_bundle_dir):
    gen = Generator(load_bundle(edge_bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    yield gen
    gen.close()


def _noisy(img: np.ndarray, seed: int, std: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(img + rng.normal(0, std, img.shape)), 0, 255).astype(np.uint8)


def _shift(img: np.ndarray, dx: int) -> np.ndarray:
    return np.pad(img, ((0, 0), (max(dx, 0), max(-dx, 0)), (0, 0)), mode="edge")[:, max(-dx, 0) : max(-dx, 0) + img.shape[1]]


def test_first_frame_is_encoded_and_sent_in_full(edge, easyvqa_test):
    cache = StreamTokenCache.for_generator(edge, "cam0")
    step = cache.step(easyvqa_test.images[0])
    n = edge.info.image_tokens
    assert not step.skipped_encoder and step.delta.base_version == 0 and step.delta.version == 1
    assert step.sent_tokens == n and step.delta.payload_bytes == n * 8 + n * edge.info.hidden_size * 4
    assert step.encoding.vision_ms > 0


def test_noise_only_frame_skips_the_encoder_and_sends_nothing(edge, easyvqa_test):
    cache = StreamTokenCache.for_generator(edge, "cam0")
    first = cache.step(_noisy(easyvqa_test.images[1], 0))
    step = cache.step(_noisy(easyvqa_test.images[1], 1))
    assert step.skipped_encoder and step.delta is None and step.encoding.vision_ms == 0.0
    assert np.array_equal(step.encoding.tokens, first.encoding.tokens)
    assert step.max_patch_change <= cache.options.skip_threshold


def test_shifted_frame_is_encoded_and_only_changed_tokens_are_sent(edge, easyvqa_test):
    cache = StreamTokenCache.for_generator(edge, "cam0")
    mirror = TokenMirror()
    img = easyvqa_test.images[2]
    mirror.apply(cache.step(img).delta)
    step = cache.step(_shift(img, 1))
    assert not step.skipped_encoder and step.delta is not None and step.delta.base_version == 1
    table = mirror.apply(step.delta)
    assert np.array_equal(table, step.encoding.tokens)  # both sides hold exactly the as-sent tokens
    fresh = edge.encode_image(edge.pixels_from_bytes(easyvqa_test.image_pngs[2])).tokens  # unshifted original
    unsent = np.setdiff1d(np.arange(fresh.shape[0]), step.delta.indices)
    assert np.array_equal(step.encoding.tokens[unsent], fresh[unsent])  # rows not re-sent are the cloud's old rows


def test_every_token_within_threshold_of_a_fresh_encoding(edge, easyvqa_test):
    # the as-sent tokens differ from a fresh encoding of the current frame by at most change_threshold (relative)
    opts = TokenCacheOptions(skip_threshold=0.0, change_threshold=0.05)
    cache = StreamTokenCache.for_generator(edge, "cam0", opts)
    img = easyvqa_test.images[3]
    for seed in range(4):
        frame = _noisy(img, seed)
        step = cache.step(frame)
        fresh = edge.encode_image(pixels_from_image(frame, edge.bundle.manifest.preprocess)).tokens
        rel = np.linalg.norm(step.encoding.tokens - fresh, axis=1) / np.linalg.norm(step.encoding.tokens, axis=1)
        assert rel.max() <= 0.05 * (1 + 1e-4)


def test_slow_drift_is_caught_against_the_last_encoded_frame(edge, easyvqa_test):
    # each frame brightens by 2 levels: below the skip threshold frame to frame, not in sum
    cache = StreamTokenCache.for_generator(edge, "cam0")
    img = easyvqa_test.images[4].astype(np.int32)
    steps = [cache.step(np.clip(img + 2 * k, 0, 255).astype(np.uint8)) for k in range(12)]
    skipped = [s.skipped_encoder for s in steps]
    assert skipped[1] and not all(skipped[1:])


def test_a_new_scene_resends_most_tokens(edge, easyvqa_test):
    cache = StreamTokenCache.for_generator(edge, "cam0")
    cache.step(easyvqa_test.images[5])
    step = cache.step(easyvqa_test.images[6])
    assert not step.skipped_encoder and step.sent_tokens > 0.5 * edge.info.image_tokens


def test_frame_of_another_size_is_refused_until_reset(edge, easyvqa_test):
    cache = StreamTokenCache.for_generator(edge, "cam0")
    cache.step(easyvqa_test.images[0])
    big = np.zeros((96, 96, 3), np.uint8)
    with pytest.raises(StreamError, match=r"frame of shape \(96, 96, 3\).*previous frame was \(64, 64, 3\).*reset\(\)"):
        cache.step(big)
    cache.reset()
    step = cache.step(big)
    assert step.delta.base_version == 0 and step.sent_tokens == edge.info.image_tokens


def test_mirror_refuses_a_delta_on_a_stale_base():
    mirror = TokenMirror()
    full = TokenDelta("s", 0, 1, 4, np.arange(4, dtype=np.int64), np.zeros((4, 2), np.float32))
    mirror.apply(full)
    skip = TokenDelta("s", 2, 3, 4, np.array([1], np.int64), np.ones((1, 2), np.float32))
    with pytest.raises(StreamError, match="delta from version 2 but the cloud holds version 1; reset the edge cache"):
        mirror.apply(skip)
    with pytest.raises(StreamError, match="holds nothing"):
        mirror.apply(TokenDelta("other", 1, 2, 4, np.array([0], np.int64), np.ones((1, 2), np.float32)))
    ok = mirror.apply(TokenDelta("s", 1, 2, 4, np.array([1, 3], np.int64), np.ones((2, 2), np.float32)))
    assert ok[:, 0].tolist() == [0, 1, 0, 1] and mirror.tokens("s", 2) is ok
    with pytest.raises(StreamError, match="version 1 asked, held 2"):
        mirror.tokens("s", 1)


def test_token_delta_checks_itself():
    with pytest.raises(StreamError, match="must carry all 4 rows"):
        TokenDelta("s", 0, 1, 4, np.arange(2, dtype=np.int64), np.zeros((2, 2), np.float32))
    with pytest.raises(StreamError, match="sorted, unique"):
        TokenDelta("s", 1, 2, 4, np.array([2, 1], np.int64), np.zeros((2, 2), np.float32))
    with pytest.raises(StreamError, match="0 <= base < version"):
        TokenDelta("s", 2, 2, 4, np.array([1], np.int64), np.zeros((1, 2), np.float32))
    with pytest.raises(ConfigError):
        TokenCacheOptions(skip_threshold=-1.0)
