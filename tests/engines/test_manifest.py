"""Manifest dataclasses: strict round trips and the invariants their checks promise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from msao.engines.backend import check_feeds
from msao.engines.manifest import FlopsModel, SegmentSpec, TensorSpec
from msao.errors import FeedError

from ..strategies import flops_models, tensor_specs


@given(tensor_specs())
def test_tensor_spec_json_round_trip(spec: TensorSpec):
    assert TensorSpec.from_dict(json.loads(json.dumps(spec.__dict__))) == spec


@given(flops_models, st.integers(1, 4), st.integers(0, 300), st.integers(0, 300))
def test_flops_model_round_trip_and_monotone(model: FlopsModel, batch, tokens, past):
    assert FlopsModel.from_dict(json.loads(json.dumps(model.__dict__))) == model
    assert model.flops(batch, tokens + 1, past) >= model.flops(batch, tokens, past) >= 0


@pytest.mark.parametrize("bad", [{"name": "x", "dtype": "float64", "shape": [1]}, {"name": "x", "dtype": "float32", "shape": [-1]},
                                 {"name": "x", "dtype": "float32", "shape": ["Batch"]}, {"name": "x", "dtype": "int64", "shape": [True]}])  # fmt: skip
def test_tensor_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TensorSpec.from_dict(bad)


def test_segment_names_must_match_their_layers():
    io = dict(inputs=(), outputs=())
    with pytest.raises(ValueError, match="decoder chunks need layers"):
        SegmentSpec("decoder[0:2]", "decoder", "d.onnx", layers=(0, 3), **io)
    with pytest.raises(ValueError, match="kind 'encoder' not in"):
        SegmentSpec("x", "encoder", "x.onnx", **io)


@given(
    st.lists(tensor_specs(), min_size=1, max_size=4, unique_by=lambda t: t.name), st.integers(1, 3), st.integers(0, 3), st.integers(0, 3)
)
def test_feeds_built_from_the_spec_always_pass_and_bind_every_symbol(inputs, batch, seq, past):
    spec = SegmentSpec("text_embed", "text_embed", "t.onnx", inputs=tuple(inputs), outputs=())
    sizes = {"batch": batch, "seq": seq, "past": past}
    feeds = {t.name: np.zeros([sizes.get(d, d) for d in t.shape], dtype=t.dtype) for t in inputs}  # type: ignore[misc]
    bound = check_feeds(spec, feeds)
    used = {d for t in inputs for d in t.shape if isinstance(d, str)}
    assert bound == {k: v for k, v in sizes.items() if k in used}


@given(tensor_specs(name="x").filter(lambda t: len(t.shape) > 0))
def test_feed_with_one_extra_dimension_is_always_refused(t):
    spec = SegmentSpec("text_embed", "text_embed", "t.onnx", inputs=(t,), outputs=())
    shape = [2 if isinstance(d, str) else d for d in t.shape] + [1]
    with pytest.raises(FeedError, match="input x: got shape"):
        check_feeds(spec, {"x": np.zeros(shape, dtype=t.dtype)})
