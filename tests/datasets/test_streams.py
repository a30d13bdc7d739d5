"""The stream workload: deterministic, scene structure as configured, questions about the shown image."""

from __future__ import annotations

import numpy as np
import pytest

from msao.datasets.streams import StreamOptions, stream_from_split
from msao.errors import ConfigError


@pytest.fixture(scope="module")
def stream(easyvqa_test):
    return stream_from_split(easyvqa_test, StreamOptions(scenes=12, seed=5))


def test_same_seed_same_stream(easyvqa_test, stream):
    again = stream_from_split(easyvqa_test, StreamOptions(scenes=12, seed=5))
    assert len(again) == len(stream)
    for a, b in zip(stream.frames, again.frames):
        assert (a.image_id, a.shift, a.question) == (b.image_id, b.shift, b.question) and np.array_equal(a.pixels, b.pixels)
    other = stream_from_split(easyvqa_test, StreamOptions(scenes=12, seed=6))
    assert [f.image_id for f in other.frames] != [f.image_id for f in stream.frames]


def test_scenes_are_held_for_min_to_max_frames_then_cut(stream):
    o = stream.options
    scenes = [f.scene for f in stream.frames]
    assert scenes == sorted(scenes) and set(scenes) == set(range(o.scenes))
    lengths = np.bincount(scenes)
    assert lengths.min() >= o.min_frames and lengths.max() <= o.max_frames
    images = {f.scene: f.image_id for f in stream.frames}
    assert len(set(images.values())) == o.scenes  # a new scene is a new image
    assert all(f.image_id == images[f.scene] for f in stream.frames)


def test_frames_are_the_image_with_small_noise_and_shifts(stream, easyvqa_test):
    o = stream.options
    for f in stream.frames:
        assert f.pixels.dtype == np.uint8 and f.pixels.shape == (64, 64, 3)
        assert max(abs(f.shift[0]), abs(f.shift[1])) <= o.max_shift_px
        if f.shift == (0, 0):
            diff = f.pixels.astype(int) - easyvqa_test.images[f.image_id]
            assert np.abs(diff).mean() < 3 * o.noise_std and np.abs(diff).max() <= 8 * o.noise_std + 1
    assert any(f.shift != (0, 0) for f in stream.frames)


def test_questions_are_about_the_shown_image(stream, easyvqa_test):
    asked = [f for f in stream.frames if f.question is not None]
    assert stream.questions == len(asked) >= stream.options.scenes  # the first frame of every scene asks
    pairs = set(zip(easyvqa_test.questions, easyvqa_test.answers, easyvqa_test.image_ids.tolist()))
    assert all((f.question, f.answer, f.image_id) in pairs for f in asked)


def test_bad_options_are_refused_with_every_problem(easyvqa_test):
    with pytest.raises(ConfigError, match="min_frames <= max_frames.*question_prob"):
        StreamOptions(min_frames=5, max_frames=2, question_prob=1.5)
    with pytest.raises(ConfigError, match="2000 scenes asked, the test split has 1000 images"):
        stream_from_split(easyvqa_test, StreamOptions(scenes=2000))
