"""Segments over protobuf's 2 GB limit go to one external data file each, hash-verified like every file.

A real 2 GB segment takes minutes and ~10 GB to export (``make bench-real-widths`` does it);
here the limit is lowered so that a tiny checkpoint's segments take the same path.
"""

from __future__ import annotations

import numpy as np
import pytest

from msao.engines.bundle import load_bundle
from msao.engines.generation import Generator
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.errors import HashMismatch
from msao.export import onnx_export
from msao.export.exporter import ExportOptions, export_bundle

from .tiny_llava import make_tiny_llava


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    folder = make_tiny_llava(root / "model", "clip-llama-gqa")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "PROTOBUF_LIMIT", 2**26 + 40_000)  # segments with more than 40 kB of weights go external
        manifest = export_bundle(
            folder, root / "bundle", ExportOptions(check_questions=8, profile_repeats=1, max_new_tokens=4), progress=lambda _m: None
        )
    return root / "bundle", manifest


def test_large_segments_keep_their_weights_in_one_hashed_data_file_and_answer_the_same(exported, tmp_path):
    bundle_dir, manifest = exported
    external = {s.name: s.external_data for s in manifest.segments if s.external_data}
    # 64 x 64 embeddings and head (16 kB) stay inline; the encoder and the decoder chunks go external
    assert set(external) == {"vision_encoder", "decoder[0:2]", "decoder[2:4]"}, external
    for spec in manifest.segments:
        assert spec.external_data in ((), (f"{spec.file}.data",)), spec.external_data
        if spec.external_data:
            data = bundle_dir / spec.external_data[0]
            assert data.stat().st_size > 40_000 and (bundle_dir / spec.file).stat().st_size < data.stat().st_size
            assert manifest.file(spec.external_data[0]).sha256
    assert not [p.name for p in bundle_dir.iterdir() if p.name.startswith(".")]  # the tracer's per-tensor files are gone
    assert manifest.checks is not None and manifest.checks.identical_answers == manifest.checks.questions == 8
    gen = Generator(load_bundle(bundle_dir), OnnxRuntimeBackend(OrtOptions(threads=1)))
    pixels = np.zeros((3, 32, 32), np.float32)
    assert len(gen.generate(gen.encode_image(pixels), "what color is the shape?", max_new_tokens=3).token_ids) >= 1
    gen.close()


def test_an_altered_external_data_file_is_refused_before_any_session_opens(exported, tmp_path):
    import shutil

    bundle_dir, manifest = exported
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    data = copy / next(s.external_data[0] for s in manifest.segments if s.name == "decoder[2:4]")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(HashMismatch, match="decoder_2_4.onnx.data"):
        load_bundle(copy)
