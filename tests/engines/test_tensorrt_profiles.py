"""Optimisation profiles follow from the manifest's symbolic shapes and the user's limits (no TensorRT needed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msao.engines.bundle import load_bundle
from msao.engines.manifest import SegmentSpec, TensorSpec
from msao.engines.profile import TEXT_TOKENS
from msao.engines.tensorrt_profiles import InputRange, ProfileLimits, ShapeProfile, choose_profile, profiles_for_segment
from msao.errors import ConfigError, FeedError


@pytest.fixture(scope="module")
def edge(edge_bundle_dir):
    return load_bundle(edge_bundle_dir)


def _ranges(profile: ShapeProfile) -> dict[str, InputRange]:
    return {r.name: r for r in profile.inputs}


def test_decoder_chunks_get_a_decode_profile_then_a_general_one(edge):
    m = edge.manifest
    spec = edge.segment("decoder[0:1]")
    decode, prefill = profiles_for_segment(spec, m.model, ProfileLimits(max_seq=128, max_past=200))
    assert (decode.name, prefill.name) == ("decode", "prefill")
    d, p = _ranges(decode), _ranges(prefill)
    hd = m.model.head_dim
    assert d["hidden_states"].min == d["hidden_states"].max == (1, 1, m.model.hidden_size)
    assert d["past_key_0"].min == (1, m.model.num_kv_heads, 0, hd) and d["past_key_0"].max == (1, m.model.num_kv_heads, 200, hd)
    assert d["past_key_0"].opt[2] == m.model.image_tokens + TEXT_TOKENS  # decode tuned for a full-image prompt's KV
    assert p["hidden_states"].max == (1, 128, m.model.hidden_size) and p["past_value_0"].opt[2] == 0
    # attention_mask is (batch, past+seq): each bound is the sum of the parts' bounds
    assert d["attention_mask"].min == (1, 1) and d["attention_mask"].max == (1, 201)
    assert p["attention_mask"].max == (1, 328) and p["attention_mask"].opt == (1, p["position_ids"].opt[1])


def test_defaults_cover_every_position_of_the_model(edge):
    m = edge.manifest
    (profile,) = profiles_for_segment(edge.segment("text_embed"), m.model)
    assert _ranges(profile)["input_ids"].max == (1, m.model.max_positions)
    assert _ranges(profile)["input_ids"].opt == (1, TEXT_TOKENS)


def test_heads_are_tuned_for_the_last_token_and_the_encoder_for_batch_only(edge):
    m = edge.manifest
    (head,) = profiles_for_segment(edge.segment("lm_head"), m.model, ProfileLimits(max_batch=4, opt_batch=2))
    assert _ranges(head)["hidden_states"].opt == (2, 1, m.model.hidden_size)
    (vision,) = profiles_for_segment(edge.segment("vision_encoder"), m.model, ProfileLimits(max_batch=4))
    r = _ranges(vision)["pixel_values"]
    assert r.min[0] == 1 and r.max[0] == 4 and r.min[1:] == r.max[1:]  # only the batch is dynamic


def test_every_segment_of_both_bundles_gets_profiles(edge_bundle_dir, cloud_bundle_dir):
    for root in (edge_bundle_dir, cloud_bundle_dir):
        b = load_bundle(root)
        for spec in b.manifest.segments:
            profiles = profiles_for_segment(spec, b.manifest.model)
            dynamic = {t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)}
            assert profiles and all({r.name for r in p.inputs} == dynamic for p in profiles), spec.name


def test_unknown_symbolic_dim_is_refused_with_the_flag_to_set_it(edge):
    spec = SegmentSpec("vision_encoder", "vision_encoder", "v.onnx", (TensorSpec("frames", "float32", ("batch", "clips", 3)),), ())
    with pytest.raises(ConfigError, match=r"\['clips'\].*--dim NAME=MIN:OPT:MAX"):
        profiles_for_segment(spec, edge.manifest.model)
    (p,) = profiles_for_segment(spec, edge.manifest.model, ProfileLimits(extra=(("clips", 1, 2, 8),)))
    assert p.inputs[0].min == (1, 1, 3) and p.inputs[0].opt == (1, 2, 3) and p.inputs[0].max == (1, 8, 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_batch=0), "max_batch must be >= 1"),
        (dict(opt_seq=300, max_seq=256), "opt_seq 300 > max_seq 256"),
        (dict(opt_batch=2, max_batch=1), "opt_batch 2 > max_batch 1"),
        (dict(max_past=-1), "max_past must be >= 0"),
        (dict(extra=(("seq", 1, 1, 1),)), "have their own limits"),
        (dict(extra=(("clips", 3, 2, 8),)), "min <= opt <= max"),
    ],
)
def test_bad_limits_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ProfileLimits(**kwargs)


def test_decode_steps_pick_the_decode_profile_and_prefill_the_general_one(edge):
    spec = edge.segment("decoder[0:1]")
    profiles = profiles_for_segment(spec, edge.manifest.model, ProfileLimits(max_seq=128, max_past=200))

    def shapes(seq, past):
        return {
            "hidden_states": (1, seq, 32),
            "position_ids": (1, seq),
            "attention_mask": (1, past + seq),
            "past_key_0": (1, 1, past, 16),
            "past_value_0": (1, 1, past, 16),
        }

    assert choose_profile(profiles, shapes(1, 90)) == 0
    assert choose_profile(profiles, shapes(80, 0)) == 1
    assert choose_profile(profiles, shapes(1, 0)) == 0


def test_shapes_beyond_every_profile_name_the_limit_to_raise(edge):
    spec = edge.segment("decoder[0:1]")
    profiles = profiles_for_segment(spec, edge.manifest.model, ProfileLimits(max_seq=128, max_past=200))
    too_long = {
        "hidden_states": (1, 129, 32),
        "position_ids": (1, 129),
        "attention_mask": (1, 129),
        "past_key_0": (1, 1, 0, 16),
        "past_value_0": (1, 1, 0, 16),
    }
    with pytest.raises(FeedError, match=r"decoder\[0:1\].*hidden_states \(1, 129, 32\).*--max-seq"):
        choose_profile(profiles, too_long, "decoder[0:1]")


@given(
    ranges=st.lists(
        st.tuples(st.integers(0, 64), st.integers(0, 64), st.integers(0, 64)).map(sorted).map(tuple),
        min_size=1,
        max_size=4,
    )
)
def test_profiles_round_trip_through_json(ranges):
    p = ShapeProfile("any", tuple(InputRange(f"x{i}", (r[0],), (r[1],), (r[2],)) for i, r in enumerate(ranges)))
    assert ShapeProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_profile_json_with_unknown_keys_is_refused():
    with pytest.raises(ValueError, match="expected keys"):
        ShapeProfile.from_dict({"name": "any", "inputs": [], "extra": 1})
