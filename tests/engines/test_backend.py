"""Feeds are checked against the manifest before any backend runs them."""

from __future__ import annotations

import numpy as np
import pytest

from msao.engines.backend import check_feeds
from msao.engines.bundle import load_bundle
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import FeedError


@pytest.fixture(scope="module")
def chunk(edge_bundle_dir):
    bundle = load_bundle(edge_bundle_dir)
    return bundle, bundle.segment("decoder[0:1]")


@pytest.fixture(scope="module")
def geometry(chunk):
    """(hidden width, kv heads, head dim) of the edge model, read from its manifest."""
    info = chunk[0].manifest.model
    assert info.num_kv_heads == 1  # the messages below spell the kv-head dim as 1
    return info.hidden_size, info.num_kv_heads, info.head_dim


def _feeds(batch=1, seq=4, past=2, geometry=(32, 1, 16)):
    d, hkv, hd = geometry
    return {
        "hidden_states": np.zeros((batch, seq, d), np.float32),
        "position_ids": np.arange(past, past + seq, dtype=np.int64)[None].repeat(batch, 0),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "past_key_0": np.zeros((batch, hkv, past, hd), np.float32),
        "past_value_0": np.zeros((batch, hkv, past, hd), np.float32),
    }


def test_good_feeds_bind_symbolic_dims(chunk, geometry):
    _, spec = chunk
    assert check_feeds(spec, _feeds(batch=3, seq=4, past=2, geometry=geometry)) == {"batch": 3, "seq": 4, "past": 2, "past+seq": 6}


def test_wrong_dtype_is_named_with_got_and_expected(chunk, geometry):
    _, spec = chunk
    f = _feeds(geometry=geometry)
    f["position_ids"] = f["position_ids"].astype(np.int32)
    with pytest.raises(FeedError, match=r"input position_ids: got dtype int32, expected int64"):
        check_feeds(spec, f)


def test_wrong_fixed_dim_is_reported_with_symbolic_shape(chunk, geometry):
    _, spec = chunk
    hd = geometry[2]
    f = _feeds(geometry=geometry)
    f["past_key_0"] = np.zeros((1, 1, 2, 2 * hd), np.float32)
    with pytest.raises(FeedError, match=rf"past_key_0: got shape \(1, 1, 2, {2 * hd}\), expected \(batch, 1, past, {hd}\)"):
        check_feeds(spec, f)


def test_inconsistent_batch_and_mask_length_are_all_reported_at_once(chunk, geometry):
    _, spec = chunk
    f = _feeds(geometry=geometry)
    f["position_ids"] = np.zeros((2, 4), np.int64)
    f["attention_mask"] = np.ones((1, 5), np.int64)
    del f["past_key_0"]
    f["extra"] = np.zeros(1)
    with pytest.raises(FeedError, match=r"4 feed problem\(s\)") as err:
        check_feeds(spec, f)
    msg = str(err.value)
    assert "unexpected input 'extra'" in msg and "missing input 'past_key_0'" in msg
    assert "dim 'batch' is 2 here but 1 in hidden_states" in msg
    assert "dim 'past+seq' is 5, expected past=2 + seq=4" in msg


def test_runner_refuses_bad_feeds_before_running(chunk, geometry):
    bundle, spec = chunk
    with OnnxRuntimeBackend(OrtOptions(threads=1)).open(bundle, spec) as runner:
        out = runner.infer(_feeds(geometry=geometry))
        assert out["new_key_0"].shape == (1, 1, 4, geometry[2])  # the 4 new tokens only: the caller keeps the cache
        assert runner.last_latency_ms > 0
        with pytest.raises(FeedError, match="hidden_states: got shape"):
            runner.infer({**_feeds(geometry=geometry), "hidden_states": np.zeros((1, 4), np.float32)})


def test_unknown_provider_request_fails_with_what_is_available():
    with pytest.raises(Exception, match="none of the providers"):
        OnnxRuntimeBackend(OrtOptions(providers=("NoSuchExecutionProvider",)))
