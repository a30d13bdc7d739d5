"""The scenes workload: deterministic, answers right from the object list, sparse, balanced."""

from __future__ import annotations

import collections
import io
import re

import numpy as np
import pytest
from PIL import Image

from msao.datasets.scenes import (
    ANSWER_WORDS,
    COLOURS,
    COUNT_WORDS,
    SHAPES,
    QuestionFamily,
    SceneObject,
    SceneStreamOptions,
    answer_vocabulary,
    image_from_scene,
    load_scenes,
    load_training_pool,
    owner_map,
    scene_stream,
    support_patches,
)
from msao.errors import ConfigError

MID_PX = 96
VISIBLE_SHARE = 0.8  # "most of it uncovered": the share questions may rely on


@pytest.fixture(scope="module")
def split():
    return load_scenes("validation", questions=1500)


@pytest.fixture(scope="module")
def stream():
    return scene_stream(SceneStreamOptions(scenes=3, frames_per_scene=10, question_every=1, seed=7))


def _the(objects, colour=None, shape=None):
    """The one object a question names; it must be unique and mostly uncovered to be answerable."""
    matches = [o for o in objects if colour in (None, o.colour) and shape in (None, o.shape)]
    assert len(matches) == 1 and _visible(matches[0]), (colour, shape, matches)
    return matches[0]


def _visible(o) -> bool:
    return o.visible_px >= VISIBLE_SHARE * o.area_px


def _quadrant(x: int, y: int) -> str:
    assert abs(x - MID_PX) > 4 and abs(y - MID_PX) > 4, "an ambiguous centre was asked about"
    return f"{'top' if y < MID_PX else 'bottom'} {'left' if x < MID_PX else 'right'}"


def _could_be_in(x: int, y: int) -> set[str]:
    """Quadrants a centre may be read as: a centre within 6 px of a midline is on both sides."""
    rows = [r for r, ok in (("top", y <= MID_PX + 6), ("bottom", y >= MID_PX - 6)) if ok]
    cols = [c for c, ok in (("left", x <= MID_PX + 6), ("right", x >= MID_PX - 6)) if ok]
    return {f"{r} {c}" for r in rows for c in cols}


def _answer_from_objects(question: str, objects) -> str:
    """The answer recomputed from the object list alone, by reading the question's template."""
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        return _the(objects, shape=m[1]).colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return _the(objects, colour=m[1]).shape
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        return _quadrant(*_the(objects, m[1], m[2]).centre)
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        matches = [o for o in objects if o.colour == m[1]]
    elif m := re.fullmatch(r"how many (\w+) are there\?", question):
        matches = [o for o in objects if m[1] in (o.shape + "s", o.shape + "es")]
    else:
        matches = None
    if matches is not None:
        assert all(_visible(o) for o in matches), "a count over a covered object"
        return COUNT_WORDS[len(matches)]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any(_visible(o) and (o.colour, o.shape) == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question):
        (xa, ya), (xb, yb) = _the(objects, m[1], m[2]).centre, _the(objects, m[4], m[5]).centre
        gap = {"left of": xb - xa, "right of": xa - xb, "above": yb - ya, "below": ya - yb}[m[3]]
        assert abs(gap) >= 16, "relation asked about objects less than a patch apart"
        return "yes" if gap > 0 else "no"
    if m := re.fullmatch(r"describe the object in the (\w+ \w+)", question):
        inside = [o for o in objects if m[1] in _could_be_in(*o.centre)]
        assert len(inside) == 1 and _visible(inside[0]), inside
        return f"{inside[0].size} {inside[0].colour} {inside[0].shape}"
    raise AssertionError(f"question fits no template: {question!r}")


def test_same_seed_gives_the_same_pixels_pngs_and_questions():
    build = load_scenes.__wrapped__  # bypass the cache: build twice for real
    a, b = build("test", 40), build("test", 40)
    assert (a.questions, a.answers, a.families, a.supports, a.scenes) == (b.questions, b.answers, b.families, b.supports, b.scenes)
    assert np.array_equal(a.image_ids, b.image_ids)
    assert a.images[np.arange(len(a.scenes))].tobytes() == b.images[np.arange(len(b.scenes))].tobytes()
    assert list(a.image_pngs) == list(b.image_pngs)


def test_a_smaller_split_is_a_prefix_of_the_full_one(split):
    small = load_scenes("validation", questions=37)
    assert len(small) == 37 and small.questions == split.questions[:37] and small.answers == split.answers[:37]
    assert small.scenes == split.scenes[: len(small.scenes)]


def test_splits_draw_different_scenes(split):
    others = [load_scenes(name, questions=50) for name in ("train", "test")]
    for other in others:
        assert other.scenes[:10] != split.scenes[:10] and other.questions[:50] != split.questions[:50]


def test_training_pools_continue_the_train_sequence_and_never_repeat_a_scene(split):
    train = load_scenes("train", questions=100)  # its first 20 scenes
    first, second = load_training_pool(0, 10), load_training_pool(1, 10)
    assert first.scenes == train.scenes[:10] and second.scenes == train.scenes[10:20]
    assert first.questions == train.questions[:50]  # the same questions about the same scenes
    assert second.name == "train-pool-1" and len(second.scenes) == 10 and len(second) == 50
    assert not set(second.scenes) & set(split.scenes)
    with pytest.raises(ConfigError, match="training pool -1 of 10 images"):
        load_training_pool(-1, 10)


def test_answers_are_in_the_vocabulary_and_describe_takes_three_words(split):
    vocabulary = set(answer_vocabulary())
    assert list(answer_vocabulary()) == sorted(vocabulary)
    assert set(split.answers) <= vocabulary
    assert {w for a in answer_vocabulary() for w in a.split()} == set(ANSWER_WORDS)
    described = [a for a, f in zip(split.answers, split.families) if f is QuestionFamily.DESCRIBE]
    assert described and all(len(a.split()) == 3 for a in described)
    assert len(COLOURS) >= 8 and len(SHAPES) >= 5


def test_every_family_is_asked_and_yes_no_is_balanced(split):
    by_family = collections.Counter(split.families)
    assert set(by_family) == set(QuestionFamily)
    assert min(by_family.values()) >= 0.08 * len(split), by_family
    for family in (QuestionFamily.PRESENCE, QuestionFamily.RELATION):
        answers = [a for a, f in zip(split.answers, split.families) if f is family]
        assert len(answers) >= 150 and set(answers) == {"yes", "no"}
        assert 0.4 <= answers.count("yes") / len(answers) <= 0.6, (family, collections.Counter(answers))
    counts = collections.Counter(a for a, f in zip(split.answers, split.families) if f is QuestionFamily.COUNT)
    assert max(counts.values()) <= 0.5 * sum(counts.values()), counts  # no answer dominates


def test_answers_follow_from_the_object_list(split):
    for q in range(len(split)):
        objects = split.scenes[split.image_ids[q]].objects
        assert _answer_from_objects(split.questions[q], objects) == split.answers[q], split.questions[q]


def test_images_are_192_px_rgb_with_3_to_7_objects(split):
    images = split.images[:6]
    assert images.shape == (6, 192, 192, 3) and images.dtype == np.uint8
    assert split.images.shape == (len(split.scenes), 192, 192, 3)
    assert {len(s.objects) for s in split.scenes} == set(range(3, 8))
    assert len(split) == 1500 and len(split.scenes) == 300  # five questions per image


def test_png_bytes_decode_to_the_same_pixels(split):
    for i in (0, 7, 299):
        with Image.open(io.BytesIO(split.image_pngs[i])) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), split.images[i])


def _boxes_meet(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_visible_objects_show_their_colour_at_their_centre(split):
    """The bookkeeping matches the pixels: an uncovered centre shows the object's colour, and
    the pixels of its colour in its box are its uncovered pixels."""
    checked = partly_covered = 0
    for i in range(60):
        pixels, objects = split.images[i].astype(float), split.scenes[i].objects
        for k, o in enumerate(objects):
            x0, y0, x1, y1 = o.bbox
            if not any(j != k and b.colour == o.colour and _boxes_meet(o.bbox, b.bbox) for j, b in enumerate(objects)):
                near = int((np.abs(pixels[y0:y1, x0:x1] - COLOURS[o.colour]).max(axis=2) < 45).sum())
                assert abs(near - o.visible_px) <= 0.03 * o.area_px + 2, (i, o, near)
            partly_covered += o.visible_px < o.area_px
            x, y = o.centre
            # the 3x3 window around the centre, against every box drawn later
            covered = any(b.bbox[0] <= x + 1 and x - 1 < b.bbox[2] and b.bbox[1] <= y + 1 and y - 1 < b.bbox[3] for b in objects[k + 1 :])
            if not covered:
                mean = pixels[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
                assert np.abs(mean - COLOURS[o.colour]).max() < 20, (i, o, mean)
                checked += 1
    assert checked > 150 and partly_covered > 10


def test_support_patches_are_the_grid_cells_under_the_boxes(split):
    obj = SceneObject("circle", "red", "large", 40, (25, 35), bbox=(5, 15, 45, 55), area_px=1200, visible_px=1200)
    # columns 0..2 and rows 0..3 of the 12x12 grid of 16 px patches
    assert support_patches([obj]).tolist() == [r * 12 + c for r in range(4) for c in range(3)]
    assert support_patches([obj], patch_px=32).tolist() == [0, 1, 6, 7]
    patches = np.array([len(split.relevant_patches(q)) for q in range(len(split))])
    assert 0.02 < patches.mean() / 144 < 0.12
    single = [f in (QuestionFamily.COLOUR, QuestionFamily.SHAPE, QuestionFamily.QUADRANT, QuestionFamily.DESCRIBE) for f in split.families]
    assert 2 <= patches[single].min() and patches[single].max() <= 16  # one object of 18..48 px


def test_stream_frames_change_a_minority_of_patches(stream):
    moved = 0
    for prev, cur in zip(stream.frames, stream.frames[1:]):
        if cur.scene != prev.scene:
            continue
        diff = np.any(prev.pixels != cur.pixels, axis=2).reshape(12, 16, 12, 16).any(axis=(1, 3))  # (12, 12) patches
        assert diff.sum() < 0.5 * 144, (cur.index, int(diff.sum()))
        moved += sum(a.centre != b.centre for a, b in zip(prev.objects, cur.objects))
        assert [(o.shape, o.colour, o.size) for o in prev.objects] == [(o.shape, o.colour, o.size) for o in cur.objects]
    assert moved >= 2 * 9 * 3  # both movers moved in every frame after each scene's first


def test_stream_movers_bounce_off_the_edges_and_stay_whole():
    long = scene_stream(SceneStreamOptions(scenes=2, frames_per_scene=80, movers=3, max_step_px=8, question_every=80))
    for f in long.frames:
        first = long.frames[f.scene * 80]
        assert [o.area_px for o in f.objects] == [o.area_px for o in first.objects], f.index  # never clipped by an edge
        assert all(0 <= o.bbox[0] and 0 <= o.bbox[1] and o.bbox[2] <= 192 and o.bbox[3] <= 192 for o in f.objects)


def test_stream_answers_follow_the_moved_objects(stream):
    asked = [f for f in stream.frames if f.question is not None]
    assert stream.questions == len(asked) == len(stream)
    for f in asked:
        assert _answer_from_objects(f.question, f.objects) == f.answer, (f.index, f.question)
    again = scene_stream(stream.options)
    assert [f.question for f in again.frames] == [f.question for f in asked]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(again.frames, stream.frames))


def test_bad_arguments_raise_config_error_with_a_hint():
    with pytest.raises(ConfigError, match="unknown scenes split 'val' \\(did you mean 'validation'\\?\\)"):
        load_scenes("val")
    with pytest.raises(ConfigError, match="questions=0 for the test split: expected 1..5000"):
        load_scenes("test", questions=0)
    with pytest.raises(ConfigError, match="questions=20001 for the train split"):
        load_scenes("train", questions=20_001)
    with pytest.raises(ConfigError, match="movers must be in 0..3.*max_step_px must be in 1..8"):
        SceneStreamOptions(movers=5, max_step_px=20)
    with pytest.raises(ConfigError, match="patch_px must divide the 192 px image"):
        support_patches([], patch_px=20)
    with pytest.raises(ConfigError, match="shape 'hexagon' not in"):
        SceneObject("hexagon", "red", "small", 20, (30, 30), bbox=(20, 20, 40, 40), area_px=300, visible_px=300)


def test_the_owner_map_shows_each_object_where_its_uncovered_pixels_are():
    data = load_scenes("test", questions=100)
    for scene in data.scenes[:10]:
        owners = owner_map(scene.objects)
        assert owners.shape == (192, 192) and owners.min() >= -1
        counts = np.bincount(owners[owners >= 0], minlength=len(scene.objects))
        assert counts.tolist() == [o.visible_px for o in scene.objects]
        pixels = image_from_scene(scene).astype(int)
        for k, o in enumerate(scene.objects):  # the owned pixels are that object's colour (give or take the noise)
            mean = pixels[owners == k].mean(axis=0)
            assert np.abs(mean - np.array(COLOURS[o.colour])).max() < 30, (o, mean)
