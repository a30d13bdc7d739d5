"""One loader for the datasets msao evaluates and calibrates on; per-kind accuracy groups by what each dataset means."""

from __future__ import annotations

import pytest

from msao.datasets.scenes import QuestionFamily
from msao.datasets.vqa import DATASETS, EASY_VQA_ANSWER_KINDS, dataset_splits, load_vqa, question_kinds
from msao.errors import ConfigError


def test_both_datasets_load_through_one_loader_with_images_by_id():
    for dataset in DATASETS:
        data = load_vqa(dataset, "test")
        assert len(data) == len(data.questions) == len(data.answers) == len(data.image_ids) > 1000
        i = int(data.image_ids[0])
        assert data.images[i].ndim == 3 and data.images[i].shape[2] == 3
        assert data.image_pngs[i].startswith(b"\x89PNG")


def test_kinds_are_scene_families_or_what_an_easy_vqa_answer_names():
    scenes = load_vqa("scenes", "validation")
    assert question_kinds(scenes) == tuple(f.value for f in scenes.families)
    assert set(question_kinds(scenes)) == {f.value for f in QuestionFamily}
    easy = load_vqa("easy-vqa", "test")
    kinds = question_kinds(easy)
    for answer, kind in zip(easy.answers[:500], kinds[:500]):
        assert answer in EASY_VQA_ANSWER_KINDS[kind]


def test_unknown_datasets_and_splits_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="easy-vqa, scenes"):
        load_vqa("vqav2", "test")
    with pytest.raises(ConfigError, match="train, test, not 'validation'"):
        load_vqa("easy-vqa", "validation")
    assert dataset_splits("scenes") == ("train", "validation", "test")
