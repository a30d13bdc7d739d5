"""Any LlavaForConditionalGeneration in a local folder exports, checks and runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from msao.engines.bundle import load_bundle
from msao.engines.generation import Generator
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import ModelFolderError
from msao.export.exporter import ExportOptions, export_bundle

from .tiny_llava import make_tiny_llava

FAST = ExportOptions(check_questions=12, profile_repeats=1, max_new_tokens=4)


@pytest.mark.parametrize(
    "arch, vision, text, tokens, chunks",
    [
        ("clip-llama-gqa", "clip_vision_model", "llama", 64, ["decoder[0:2]", "decoder[2:4]"]),
        ("siglip-qwen2", "siglip_vision_model", "qwen2", 16, ["decoder[0:1]", "decoder[1:3]"]),
    ],
)
def test_exports_checks_and_runs_a_local_llava_checkpoint(tmp_path: Path, arch, vision, text, tokens, chunks):
    folder = make_tiny_llava(tmp_path / arch, arch)
    manifest = export_bundle(folder, tmp_path / "bundle", FAST, progress=lambda _m: None)
    assert (manifest.model.vision_model_type, manifest.model.text_model_type) == (vision, text)
    assert manifest.model.image_tokens == tokens and manifest.model.num_kv_heads == 2
    assert [s.name for s in manifest.decoder_chunks()] == chunks
    assert all(s.check is not None and s.check.max_abs_err <= 1e-4 for s in manifest.segments)
    assert manifest.checks is not None and manifest.checks.identical_answers == manifest.checks.questions == 12
    bundle = load_bundle(tmp_path / "bundle")
    gen = Generator(bundle, OnnxRuntimeBackend(OrtOptions(threads=1)))
    rgb = np.zeros((64, 64, 3), np.uint8)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    ans = gen.answer(buf.getvalue(), "what color is the shape?", max_new_tokens=3)
    assert len(ans.token_ids) == 3  # random weights: no EOS, stops at the bound


def test_model_hash_is_stable_across_exports_and_differs_between_models(tmp_path: Path):
    a = make_tiny_llava(tmp_path / "a", "siglip-qwen2", seed=0)
    b = make_tiny_llava(tmp_path / "b", "siglip-qwen2", seed=1)
    opts = ExportOptions(check_questions=4, profile_repeats=0, max_new_tokens=2)
    h1 = export_bundle(a, tmp_path / "a1", opts, progress=lambda _m: None).model_hash
    h2 = export_bundle(a, tmp_path / "a2", opts, progress=lambda _m: None).model_hash
    h3 = export_bundle(b, tmp_path / "b1", opts, progress=lambda _m: None).model_hash
    assert h1 == h2 != h3


def test_failed_export_leaves_no_half_bundle_and_keeps_the_old_one(tmp_path: Path):
    folder = make_tiny_llava(tmp_path / "m", "siglip-qwen2")
    out = tmp_path / "bundle"
    export_bundle(folder, out, ExportOptions(check_questions=4, profile_repeats=0, max_new_tokens=2), progress=lambda _m: None)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ModelFolderError, match="split points"):
        export_bundle(folder, out, ExportOptions(split_points=(7,), check_questions=4, profile_repeats=0), progress=lambda _m: None)
    assert (out / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == []


def test_rejects_a_folder_that_is_not_llava(tmp_path: Path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(
        ModelFolderError,
        match="LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration checkpoints only",
    ):
        export_bundle(folder, tmp_path / "out", FAST)


@pytest.mark.parametrize(
    "remove, msg",
    [("tokenizer.json", "no tokenizer.json"), ("model.safetensors", "no .safetensors weights"), ("config.json", "no config.json")],
)
def test_rejects_incomplete_checkpoint_folders(tmp_path: Path, remove, msg):
    folder = make_tiny_llava(tmp_path / "m", "siglip-qwen2")
    (folder / remove).unlink()
    with pytest.raises(ModelFolderError, match=msg):
        export_bundle(folder, tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()


def test_rejects_a_missing_folder_naming_the_builtins(tmp_path: Path):
    with pytest.raises(ModelFolderError, match="neither a built-in model .*msao-tiny-edge"):
        export_bundle(tmp_path / "nope", tmp_path / "out", FAST)
