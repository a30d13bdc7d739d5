"""Qwen2-VL and Qwen2.5-VL folders export, check and answer like LLaVA ones, with M-RoPE positions."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from msao.engines.bundle import load_bundle
from msao.engines.generation import Generator
from msao.engines.images import pixels_from_image
from msao.engines.manifest import MANIFEST_NAME, Manifest
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import ModelFolderError
from msao.export.checkpoint import load_checkpoint
from msao.export.exporter import ExportOptions, export_bundle
from msao.export.qwen import patches_from_pixels

from .tiny_llava import make_tiny_llava
from .tiny_qwen import make_tiny_qwen

FAST = ExportOptions(check_questions=12, profile_repeats=1, max_new_tokens=4)
# qwen2_5_vl at 40x40 px: a 5x5 merged grid, so its 2x2-token attention windows need padding (uneven windows)
CASES = {"qwen2_vl": (32 * 32, None, (8, 8)), "qwen2_5_vl": (48 * 48, (40, 40), (10, 10))}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    arch = request.param
    max_pixels, image_size, _ = CASES[arch]
    root = tmp_path_factory.mktemp(arch)
    folder = make_tiny_qwen(root / "model", arch, max_pixels=max_pixels)
    opts = ExportOptions(check_questions=12, profile_repeats=1, max_new_tokens=4, image_size=image_size)
    manifest = export_bundle(folder, root / "bundle", opts, progress=lambda _m: None)
    return arch, folder, root / "bundle", manifest


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_exports_checks_and_answers_a_local_qwen_checkpoint(exported):
    arch, _, bundle_dir, manifest = exported
    grid = CASES[arch][2]
    info = manifest.model
    assert (info.family, manifest.format_version) == (arch, 3)
    assert (info.mrope.grid_t, info.mrope.grid_h, info.mrope.grid_w) == (1, *grid)
    assert info.image_tokens == grid[0] * grid[1] // 4 and info.mrope.mrope_section == (2, 3, 3)
    assert manifest.preprocess.crop_height == grid[0] * 4
    decoder = manifest.decoder_chunks()[0]
    assert next(t.shape for t in decoder.inputs if t.name == "position_ids") == (3, "batch", "seq")
    assert all(s.check is not None and s.check.max_abs_err <= 1e-4 for s in manifest.segments)
    assert manifest.checks is not None and manifest.checks.identical_answers == manifest.checks.questions == 12
    raw = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    assert Manifest.from_dict(raw) == manifest and json.loads(json.dumps(manifest.to_dict())) == raw
    gen = Generator(load_bundle(bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    ans = gen.answer(_png(np.full((64, 64, 3), 90, np.uint8)), "what color is the shape?", max_new_tokens=3)
    assert len(ans.token_ids) >= 1 and ans.kept_tokens == info.image_tokens
    gen.close()


def _hf_rope_index(model, ids: np.ndarray, image_token_id: int, grid) -> torch.Tensor:
    """transformers' own 3-D positions (3, 1, T) of the unpruned prompt."""
    mm = torch.from_numpy((ids == image_token_id).astype(np.int64)[None])
    pos, _ = model.model.get_rope_index(torch.from_numpy(ids[None]), mm_token_type_ids=mm, image_grid_thw=torch.tensor([grid]))
    return pos


def test_keep_set_answer_matches_hf_given_the_kept_tokens_at_their_original_positions(exported):
    arch, folder, bundle_dir, manifest = exported
    info = manifest.model
    gen = Generator(load_bundle(bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    rgb = (np.random.default_rng(3).random((48, 48, 3)) * 255).astype(np.uint8)
    pixels = pixels_from_image(rgb, manifest.preprocess)
    question = "is there a red circle in the image?"
    keep = np.arange(1, info.image_tokens, 3)
    ans = gen.generate(gen.encode_image(pixels), question, keep=keep, max_new_tokens=4)
    gen.close()

    model = load_checkpoint(folder, image_size=CASES[arch][1]).model
    prefix, suffix = gen.prompt_ids(question)
    n, lp = info.image_tokens, len(prefix)
    full_ids = np.concatenate([prefix, np.full(n, info.image_token_id), suffix]).astype(np.int64)
    g = info.mrope
    full_pos = _hf_rope_index(model, full_ids, info.image_token_id, [g.grid_t, g.grid_h, g.grid_w])
    cols = np.concatenate([np.arange(lp), lp + keep, lp + n + np.arange(len(suffix))])
    pos = full_pos[:, :, torch.from_numpy(cols)]  # (3, 1, T_keep): each kept token at its original (t, h, w)
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(patches_from_pixels(pixels, g)), torch.tensor([[1, g.grid_h, g.grid_w]]))
        image = out.pooler_output[0][torch.from_numpy(keep)]
        emb = model.get_input_embeddings()(torch.from_numpy(np.concatenate([prefix, suffix])[None]))
        hidden = torch.cat([emb[:, :lp], image[None], emb[:, lp:]], dim=1)  # (1, T_keep, D)
        consecutive = torch.arange(hidden.shape[1]).expand(3, 1, -1)
        assert not torch.allclose(
            model(inputs_embeds=hidden, position_ids=consecutive).logits, model(inputs_embeds=hidden, position_ids=pos).logits
        )
        ref = []
        for _ in range(len(ans.token_ids)):  # greedy without a cache: every step re-reads the whole sequence
            tok = int(model(inputs_embeds=hidden, position_ids=pos).logits[0, -1].argmax())
            ref.append(tok)
            hidden = torch.cat([hidden, model.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
            pos = torch.cat([pos, pos[:, :, -1:] + 1], dim=2)
    assert list(ans.token_ids) == ref


def test_prompt_positions_equal_transformers_rope_index(exported):
    from msao.engines.positions import prefill_positions

    arch, folder, _, manifest = exported
    info, g = manifest.model, manifest.model.mrope
    model = load_checkpoint(folder, image_size=CASES[arch][1]).model
    lp, ls = 9, 7
    ids = np.concatenate([np.full(lp, 10), np.full(info.image_tokens, info.image_token_id), np.full(ls, 11)]).astype(np.int64)
    ours, next_pos = prefill_positions(info, lp, info.image_tokens, np.arange(info.image_tokens), ls)
    theirs = _hf_rope_index(model, ids, info.image_token_id, [g.grid_t, g.grid_h, g.grid_w])
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert next_pos == int(theirs.max()) + 1


@pytest.mark.parametrize("arch", sorted(CASES))
def test_patches_match_the_qwen_image_processor(tmp_path: Path, arch):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    max_pixels, image_size, _ = CASES[arch]
    folder = make_tiny_qwen(tmp_path / arch, arch, max_pixels=max_pixels)
    ck = load_checkpoint(folder, image_size=image_size)
    h, w = ck.preprocess.crop_height, ck.preprocess.crop_width
    rgb = (np.random.default_rng(1).random((h, w, 3)) * 255).astype(np.uint8)
    theirs = Qwen2VLImageProcessorPil.from_pretrained(folder)(images=[rgb], return_tensors="np")
    assert theirs["image_grid_thw"].tolist() == [[1, ck.mrope.grid_h, ck.mrope.grid_w]]
    np.testing.assert_allclose(patches_from_pixels(pixels_from_image(rgb, ck.preprocess), ck.mrope), theirs["pixel_values"], atol=1e-6)


@pytest.mark.parametrize(
    "size, msg",
    [
        ((30, 30), r"multiples of patch 4 x merge 2 = 8; the processor would use 32x32"),
        ((64, 64), r"outside the processor's budget \[64, 1024\]"),
    ],
)
def test_image_size_off_the_grid_or_budget_is_refused_naming_the_processors_size(tmp_path: Path, size, msg):
    folder = make_tiny_qwen(tmp_path / "m", "qwen2_vl")
    with pytest.raises(ModelFolderError, match=msg):
        export_bundle(folder, tmp_path / "out", ExportOptions(image_size=size), progress=lambda _m: None)
    assert not (tmp_path / "out").exists()


def test_image_size_is_refused_for_a_llava_checkpoint(tmp_path: Path):
    folder = make_tiny_llava(tmp_path / "m", "siglip-qwen2")
    with pytest.raises(ModelFolderError, match="--image-size sets a Qwen model's grid"):
        export_bundle(folder, tmp_path / "out", ExportOptions(image_size=(32, 32)), progress=lambda _m: None)


def test_refuses_other_architectures_naming_the_supported_ones(tmp_path: Path):
    folder = tmp_path / "qwen3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"]}))
    with pytest.raises(
        ModelFolderError,
        match="LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration checkpoints only",
    ):
        export_bundle(folder, tmp_path / "out", FAST)


def test_cli_image_size_reads_h_or_hxw_and_refuses_anything_else():
    import argparse

    from msao.cli.export_cmd import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--model", "m", "--image-size", "448"]).image_size == (448, 448)
    assert p.parse_args(["--model", "m", "--image-size", "336x448"]).image_size == (336, 448)
    assert p.parse_args(["--model", "m"]).image_size is None
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--image-size", "big"])
