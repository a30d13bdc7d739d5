"""Prompt position ids per family: LLaVA's unchanged, M-RoPE's with each kept token at its original place."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from msao.engines.manifest import Manifest, ModelInfo, MropeSpec
from msao.engines.positions import decode_positions, image_positions, prefill_positions

GOLDEN = Path(__file__).parents[1] / "golden" / "manifest_v1.json"
LLAVA = Manifest.from_dict(json.loads(GOLDEN.read_text())).model  # 64 image tokens
MROPE = MropeSpec(grid_t=1, grid_h=6, grid_w=10, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, mrope_section=(16, 24, 24))
QWEN = replace(LLAVA, architecture="Qwen2VLForConditionalGeneration", image_tokens=15, family="qwen2_vl", mrope=MROPE)


@st.composite
def layouts(draw, n: int):
    keep = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1)))
    return draw(st.integers(0, 20)), np.asarray(keep, np.int64), draw(st.integers(0, 20))


@given(layouts(64))
def test_llava_positions_are_the_one_dimensional_count_as_before(layout):
    lp, keep, ls = layout
    pos, next_pos = prefill_positions(LLAVA, lp, 64, keep, ls)
    legacy = np.concatenate([np.arange(lp), lp + keep, lp + 64 + np.arange(ls)])[None].astype(np.int64)
    assert pos.dtype == np.int64 and pos.shape == legacy.shape and (pos == legacy).all()
    assert next_pos == lp + 64 + ls
    assert decode_positions(LLAVA, next_pos).tolist() == [[next_pos]]


@given(layouts(15))
def test_mrope_kept_tokens_keep_their_original_three_d_positions(layout):
    lp, keep, ls = layout
    full, next_full = prefill_positions(QWEN, lp, 15, np.arange(15), ls)
    pruned, next_pruned = prefill_positions(QWEN, lp, 15, keep, ls)
    cols = np.concatenate([np.arange(lp), lp + keep, lp + 15 + np.arange(ls)])
    assert pruned.shape == (3, 1, len(cols)) and (pruned == full[:, :, cols]).all()
    assert next_pruned == next_full == lp + max(MROPE.merged_grid) + ls
    assert decode_positions(QWEN, next_full).tolist() == [[[next_full]]] * 3


def test_mrope_image_positions_run_over_rows_then_columns_from_the_prefix():
    pos = image_positions(MROPE, 4)  # merged grid (1, 3, 5)
    assert pos.shape == (3, 15)
    assert pos[:, 0].tolist() == [4, 4, 4] and pos[:, 6].tolist() == [4, 5, 5] and pos[:, -1].tolist() == [4, 6, 8]


def test_mrope_text_only_turn_counts_text_on_all_axes():
    pos, next_pos = prefill_positions(QWEN, 3, 0, np.zeros(0, np.int64), 2)
    assert pos.tolist() == [[[0, 1, 2, 3, 4]]] * 3 and next_pos == 5


def test_mrope_refuses_an_image_of_another_grid():
    with pytest.raises(ValueError, match="declared grid"):
        prefill_positions(QWEN, 3, 16, np.arange(16), 2)


def test_model_info_needs_a_grid_exactly_for_the_mrope_families():
    with pytest.raises(ValueError, match="M-RoPE grid missing"):
        replace(QWEN, mrope=None)
    with pytest.raises(ValueError, match="M-RoPE grid given"):
        replace(LLAVA, mrope=MROPE)
    with pytest.raises(ValueError, match="makes 15 tokens"):
        replace(QWEN, image_tokens=16)
    with pytest.raises(ValueError, match="not in"):
        replace(LLAVA, family="qwen3_vl")


def test_qwen_model_info_round_trips_and_llava_json_has_no_family():
    assert ModelInfo.from_dict(json.loads(json.dumps(QWEN.to_dict()))) == QWEN
    assert "family" not in LLAVA.to_dict() and "mrope" not in LLAVA.to_dict()


def test_a_version_one_manifest_cannot_hold_an_mrope_model():
    raw = json.loads(GOLDEN.read_text())
    raw["model"] = QWEN.to_dict()
    with pytest.raises(ValueError, match="format_version 1 cannot hold a qwen2_vl model"):
        Manifest.from_dict(raw)
    raw["format_version"] = 2
    assert Manifest.from_dict(raw).model == QWEN
    raw["format_version"] = 3  # version 3 decoder chunks return new_* KV; the golden v1 chunks return present_*
    with pytest.raises(
        ValueError, match=r"decoder\[0:1\]: outputs \['present_key_0', 'present_value_0'\]; a version 3 decoder chunk returns new_\* KV"
    ):
        Manifest.from_dict(raw)
    raw["format_version"] = 4
    with pytest.raises(ValueError, match=r"this msao reads \[1, 2, 3\]"):
        Manifest.from_dict(raw)
