"""Feeds are checked against the manifest before any backend runs them."""

from __future__ import annotations

import numpy as np
import pytest

from msao.engines.backend import CheckFeeds
from msao.engines.bundle import LoadBundle
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import FeedError


@pytest.fixture(scope="module")
def chunk(edge_bundle_dir):
    bundle = LoadBundle(edge_bundle_dir)
    return bundle, bundle.segment("decoder[0:1]")


def _feeds(batch=1, seq=4, past=2, d=64, hkv=1, hd=32):
    return {
        "hidden_states": np.zeros((batch, seq, d), np.float32),
        "position_ids": np.arange(past, past + seq, dtype=np.int64)[None].repeat(batch, 0),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "past_key_0": np.zeros((batch, hkv, past, hd), np.float32),
        "past_value_0": np.zeros((batch, hkv, past, hd), np.float32),
    }


def test_good_feeds_bind_symbolic_dims(chunk):
    _, spec = chunk
    assert CheckFeeds(spec, _feeds(batch=3, seq=4, past=2)) == {"batch": 3, "seq": 4, "past": 2, "past+seq": 6}


def test_wrong_dtype_is_named_with_got_and_expected(chunk):
    _, spec = chunk
    f = _feeds()
    f["position_ids"] = f["position_ids"].astype(np.int32)
    with pytest.raises(FeedError, match=r"input position_ids: got dtype int32, expected int64"):
        CheckFeeds(spec, f)


def test_wrong_fixed_dim_is_reported_with_symbolic_shape(chunk):
    _, spec = chunk
    f = _feeds()
    f["past_key_0"] = np.zeros((1, 1, 2, 16), np.float32)
    with pytest.raises(FeedError, match=r"past_key_0: got shape \(1, 1, 2, 16\), expected \(batch, 1, past, 32\)"):
        CheckFeeds(spec, f)


def test_inconsistent_batch_and_mask_length_are_all_reported_at_once(chunk):
    _, spec = chunk
    f = _feeds()
    f["position_ids"] = np.zeros((2, 4), np.int64)
    f["attention_mask"] = np.ones((1, 5), np.int64)
    del f["past_key_0"]
    f["extra"] = np.zeros(1)
    with pytest.raises(FeedError, match=r"4 feed problem\(s\)") as err:
        CheckFeeds(spec, f)
    msg = str(err.value)
    assert "unexpected input 'extra'" in msg and "missing input 'past_key_0'" in msg
    assert "dim 'batch' is 2 here but 1 in hidden_states" in msg
    assert "dim 'past+seq' is 5, expected past=2 + seq=4" in msg


def test_runner_refuses_bad_feeds_before_running(chunk):
    bundle, spec = chunk
    with OnnxRuntimeBackend(OrtOptions(threads=1)).open(bundle, spec) as runner:
        out = runner.infer(_feeds())
        assert out["present_key_0"].shape == (1, 1, 6, 32)
        assert runner.last_latency_ms > 0
        with pytest.raises(FeedError, match="hidden_states: got shape"):
            runner.infer({**_feeds(), "hidden_states": np.zeros((1, 4), np.float32)})


def test_unknown_provider_request_fails_with_what_is_available():
    with pytest.raises(Exception, match="none of the providers"):
        OnnxRuntimeBackend(OrtOptions(providers=("NoSuchExecutionProvider",)))
