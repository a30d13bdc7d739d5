"""KvCache on real exported chunks: a preallocated buffer with masked slots gives the exact past's
numbers, new slots land where the next step reads them, growth and truncation keep the sequence."""

from __future__ import annotations

import numpy as np
import pytest

from msao.engines.bundle import load_bundle
from msao.engines.generation import DecoderStack
from msao.engines.kv_cache import KvCache
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions

ATOL = 1e-5  # masked slots add exp(-30000) = 0 exactly; only summation order differs


@pytest.fixture(scope="module")
def chunks(edge_bundle_dir):
    bundle = load_bundle(edge_bundle_dir)
    backend = OnnxRuntimeBackend(OrtOptions(threads=1))
    info = bundle.manifest.model
    return [backend.open(bundle, s) for s in bundle.manifest.decoder_chunks()], info


def _exact_past_run(runners, steps):
    """The reference: each chunk fed exactly the concatenated past, no buffer, no masked slot."""
    past: dict[str, np.ndarray] = {}
    outs = []
    length = 0
    for h, pos in steps:
        for r in runners:
            feeds = {"hidden_states": h, "position_ids": pos, "attention_mask": np.ones((1, length + h.shape[1]), np.int64)}
            for t in r.spec.inputs:
                if t.name.startswith("past_"):
                    feeds[t.name] = past.get(t.name, np.zeros((1, *t.shape[1:2], 0, t.shape[3]), np.float32))
            out = r.infer(feeds)
            for t in r.spec.inputs:
                if t.name.startswith("past_"):
                    past[t.name] = np.concatenate([feeds[t.name], out["new_" + t.name[len("past_") :]]], axis=2)
            h = out["hidden_states_out"]
        length += steps[0][0].shape[1] if not outs else 1
        outs.append(h)
    return outs, past


def _steps(d: int, prompt: int, decode: int):
    rng = np.random.default_rng(1)
    steps = [(rng.standard_normal((1, prompt, d)).astype(np.float32), np.arange(prompt)[None])]
    steps += [(rng.standard_normal((1, 1, d)).astype(np.float32), np.asarray([[prompt + i]])) for i in range(decode)]
    return steps


@pytest.mark.parametrize("capacity", [0, 9, 40], ids=["grows-from-empty", "grows-midway", "preallocated"])
def test_buffered_decode_equals_the_exact_past(chunks, capacity):
    runners, info = chunks
    steps = _steps(info.hidden_size, 6, 5)
    want, past = _exact_past_run(runners, steps)
    stack = DecoderStack(runners, info.num_kv_heads, info.head_dim)
    stack.reset(capacity=capacity)
    for (h, pos), ref in zip(steps, want):
        got = stack.run(h, pos, np.ones((1, stack.past_length + h.shape[1]), np.int64))
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    assert stack.past_length == 11
    for cache in stack.caches:
        assert cache.capacity >= 11 and (capacity != 40 or cache.capacity == 40)  # sized once when told the need
        for name in cache.names:
            np.testing.assert_allclose(cache.buffer(name)[:, :, :11], past[name], atol=ATOL, rtol=0)


def test_truncating_drops_a_rejected_token_and_the_next_step_is_exact(chunks):
    runners, info = chunks
    steps = _steps(info.hidden_size, 6, 2)
    want, _ = _exact_past_run(runners, steps)
    stack = DecoderStack(runners, info.num_kv_heads, info.head_dim)
    stack.reset(capacity=16)
    stack.run(*steps[0], np.ones((1, 6), np.int64))
    wrong = np.full_like(steps[1][0], 3.0)
    stack.run(wrong, steps[1][1], np.ones((1, 7), np.int64))  # a token the verifier will reject
    stack.truncate(6)
    got = [stack.run(h, pos, np.ones((1, stack.past_length + 1), np.int64)) for h, pos in steps[1:]]
    for g, ref in zip(got, want[1:]):
        np.testing.assert_allclose(g, ref, atol=ATOL, rtol=0)


def test_key_mask_puts_the_sequence_at_the_buffer_front_and_the_new_tokens_after_the_buffer():
    cache = KvCache(["past_key_0", "past_value_0"], batch=1, kv_heads=1, head_dim=2)
    assert cache.key_mask(np.ones((1, 3), np.int64), 3).tolist() == [[1, 1, 1]]  # empty: no buffer read at all
    assert cache.past_feeds()["past_key_0"].shape == (1, 1, 0, 2)
    cache.reserve(5)
    cache.append({"new_key_0": np.ones((1, 1, 3, 2), np.float32), "new_value_0": np.ones((1, 1, 3, 2), np.float32)}, 3)
    assert cache.key_mask(np.asarray([[1, 0, 1, 1]]), 1).tolist() == [[1, 0, 1, 0, 0, 1]]
    assert cache.past_feeds()["past_key_0"].shape == (1, 1, 5, 2)
    epoch = cache.epoch
    cache.reserve(6)  # grows to twice the capacity, keeps the slots, and is a new epoch for device copies
    assert (cache.capacity, cache.length, cache.epoch != epoch) == (10, 3, True)
    assert cache.buffer("past_key_0")[0, 0, :3].tolist() == [[1, 1]] * 3 and not cache.buffer("past_key_0")[0, 0, 3:].any()
    with pytest.raises(ValueError, match="the cache holds 3 slots and 1 come"):
        cache.key_mask(np.ones((1, 3), np.int64), 1)
    with pytest.raises(ValueError, match="cannot truncate a cache of 3 slots to 4"):
        cache.truncate(4)


def test_a_format_two_chunks_whole_present_cache_is_held_and_cannot_be_truncated():
    cache = KvCache(["past_key_0", "past_value_0"], batch=1, kv_heads=1, head_dim=2)
    present = {"present_key_0": np.ones((1, 1, 4, 2), np.float32), "present_value_0": np.ones((1, 1, 4, 2), np.float32)}
    cache.replace(present)
    assert (cache.length, cache.capacity, cache.whole) == (4, 4, True)
    assert cache.past_feeds()["past_key_0"] is present["present_key_0"]  # fed back as is: TensorRT's ping-pong relies on it
    with pytest.raises(ValueError, match="re-export the bundle"):
        cache.truncate(2)
