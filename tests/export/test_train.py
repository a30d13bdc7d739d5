"""The training recipe still trains, and the pixel-derived auxiliary labels it relies on are right."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from msao.datasets.easyvqa import load_easy_vqa
from msao.export.builtin import BUILTIN_MODELS
from msao.export.checkpoint import load_checkpoint
from msao.export.train import COLOURS, RECIPES, SHAPES, TrainOptions, aux_labels_from_images, train_builtin


def test_aux_labels_agree_with_every_answer_that_names_the_shape_or_colour():
    data = load_easy_vqa("train")
    shape_ids, colour_ids = aux_labels_from_images(data.images)
    checked = 0
    for q, a, img in zip(data.questions, data.answers, data.image_ids):
        if a in SHAPES:
            assert SHAPES[shape_ids[img]] == a, (q, a, img)
            checked += 1
        elif a in COLOURS:
            assert COLOURS[colour_ids[img]] == a, (q, a, img)
            checked += 1
    assert checked > 9000


@pytest.mark.slow  # trains
def test_recipe_trains_a_few_steps_and_writes_a_loadable_checkpoint(tmp_path: Path):
    spec = BUILTIN_MODELS["msao-tiny-edge"]
    options = replace(RECIPES[spec.name], steps=60, batch_size=32, warmup_steps=10, eval_every=60, eval_questions=200)
    report = train_builtin(spec, tmp_path / "ck", options, progress=lambda _m: None)
    assert report.final_loss < 0.8 * report.first_loss
    assert report.eval_accuracy["final"] > 0.3  # above chance after 60 small steps
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.exit_heads is not None and ck.exit_heads.layers == spec.exit_layers
    assert (tmp_path / "ck" / "train_report.json").exists()


@pytest.mark.slow  # trains
def test_training_is_deterministic_for_a_seed(tmp_path: Path):
    spec = BUILTIN_MODELS["msao-tiny-edge"]
    options = replace(RECIPES[spec.name], vision_steps=20, steps=5, batch_size=8, warmup_steps=2, eval_every=5, eval_questions=16)
    a = train_builtin(spec, tmp_path / "a", options, progress=lambda _m: None)
    b = train_builtin(spec, tmp_path / "b", options, progress=lambda _m: None)
    assert a.final_loss == b.final_loss
    wa = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert wa == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert np.isfinite(a.final_loss)


@pytest.mark.slow  # trains
def test_a_run_split_over_two_sittings_trains_the_same_model_as_one(tmp_path: Path):
    spec = BUILTIN_MODELS["msao-tiny-edge"]
    options = replace(RECIPES[spec.name], vision_steps=2, steps=6, batch_size=8, warmup_steps=2, eval_every=6, eval_questions=16)
    whole = train_builtin(spec, tmp_path / "whole", options, progress=lambda _m: None)
    first = train_builtin(spec, tmp_path / "split", replace(options, stop_at_step=3), progress=lambda _m: None)
    assert not first.complete and first.steps == 3
    assert (tmp_path / "split" / "resume.pt").exists() and not (tmp_path / "split" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="other options"):
        train_builtin(spec, tmp_path / "split", replace(options, lr=1e-3), progress=lambda _m: None)
    second = train_builtin(spec, tmp_path / "split", options, progress=lambda _m: None)
    assert second.complete and not (tmp_path / "split" / "resume.pt").exists()
    assert (tmp_path / "split" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert second.final_loss == whole.final_loss


@pytest.mark.slow  # trains
def test_a_scenes_model_trains_on_multi_word_answers_with_their_families(tmp_path: Path):
    from msao.datasets.scenes import QuestionFamily
    from msao.export.builtin import BuiltinSpec

    spec = BuiltinSpec(
        name="scenes-test", vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=2, text_heads=2,
        text_kv_heads=1, exit_layers=(1,), split_points=(1,), image_size=192, patch_size=16, dataset="scenes",
    )  # fmt: skip
    # fresh pools of 40 scenes, 10 steps each: the sitting that stops mid-pool resumes into the same pool.
    # One thread: questions sharing an image make torch's CPU backward sum in thread order (last bits differ).
    options = TrainOptions(
        vision_steps=5, steps=30, batch_size=16, warmup_steps=5, eval_every=30, eval_questions=128, pool_images=40, pool_steps=10,
        threads=1,
    )  # fmt: skip
    report = train_builtin(spec, tmp_path / "ck", options, progress=lambda _m: None)
    assert report.complete and report.final_loss < report.first_loss
    train_builtin(spec, tmp_path / "split", replace(options, stop_at_step=15), progress=lambda _m: None)
    train_builtin(spec, tmp_path / "split", options, progress=lambda _m: None)
    assert (tmp_path / "split" / "model.safetensors").read_bytes() == (tmp_path / "ck" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="fixed train split"):
        train_builtin(replace(spec, dataset="easy-vqa", image_size=64, patch_size=8), tmp_path / "e", options, progress=lambda _m: None)
    assert {f"final/{f.value}" for f in QuestionFamily} <= set(report.eval_accuracy)  # validation questions of every family
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.exit_heads is not None and ck.exit_heads.layers == (1,)
    # the export checks a scenes model on scenes questions (its tokenizer knows none of easy-VQA's words)
    from msao.export.exporter import ExportOptions, export_bundle

    manifest = export_bundle(
        tmp_path / "ck", tmp_path / "bundle", ExportOptions(check_questions=6, check_dataset="scenes", profile_repeats=0, threads=1),
        progress=lambda _m: None,
    )  # fmt: skip
    assert manifest.model.image_tokens == 144 and (tmp_path / "bundle" / "manifest.json").exists()
