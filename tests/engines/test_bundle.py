"""The bundle loader trusts nothing: hashes, paths, links and manifest keys are all checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from msao.engines.bundle import load_bundle
from msao.engines.manifest import MANIFEST_NAME, Manifest
from msao.errors import BundleError, HashMismatch


def _edit_manifest(root: Path, edit) -> None:
    path = root / MANIFEST_NAME
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def test_loads_a_fresh_export(edge_bundle_dir: Path):
    b = load_bundle(edge_bundle_dir)
    assert b.manifest.name == "msao-tiny-edge"
    assert [s.kind for s in b.manifest.segments][:2] == ["vision_encoder", "text_embed"]
    listed = {f.path for f in b.manifest.files}
    assert listed == {p.name for p in edge_bundle_dir.iterdir()} - {MANIFEST_NAME}


def test_rejects_bundle_with_one_flipped_byte(edge_bundle_copy: Path):
    path = edge_bundle_copy / "decoder_0_1.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(HashMismatch, match=r"(?s)decoder_0_1\.onnx: sha256 .*re-run `msao export`"):
        load_bundle(edge_bundle_copy)


def test_rejects_bundle_with_missing_file_and_lists_every_problem(edge_bundle_copy: Path):
    (edge_bundle_copy / "lm_head.onnx").unlink()
    (edge_bundle_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match=r"2 problem\(s\)") as err:
        load_bundle(edge_bundle_copy)
    assert "lm_head.onnx: missing" in str(err.value)
    assert "tokenizer.json:" in str(err.value)


def test_rejects_unknown_manifest_key(edge_bundle_copy: Path):
    _edit_manifest(edge_bundle_copy, lambda d: d.__setitem__("surprise", 1))
    with pytest.raises(BundleError, match=r"unknown keys \['surprise'\]"):
        load_bundle(edge_bundle_copy)


def test_rejects_unknown_nested_key(edge_bundle_copy: Path):
    _edit_manifest(edge_bundle_copy, lambda d: d["segments"][0]["inputs"][0].__setitem__("layout", "nchw"))
    with pytest.raises(BundleError, match=r"TensorSpec: unknown keys \['layout'\]"):
        load_bundle(edge_bundle_copy)


@pytest.mark.parametrize("evil", ["../outside.onnx", "/etc/passwd", "a/../../b", "sub\\x.onnx", ""])
def test_rejects_paths_outside_the_bundle(edge_bundle_copy: Path, evil: str):
    def point_lm_head_at(d):
        for f in d["files"]:
            if f["path"] == "lm_head.onnx":
                f["path"] = evil
        for s in d["segments"]:
            if s["file"] == "lm_head.onnx":
                s["file"] = evil

    _edit_manifest(edge_bundle_copy, point_lm_head_at)
    with pytest.raises(BundleError, match="not a plain relative path inside the bundle"):
        load_bundle(edge_bundle_copy)


def test_rejects_symlinked_file(edge_bundle_copy: Path, tmp_path: Path):
    target = edge_bundle_copy / "lm_head.onnx"
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    os.symlink(outside, target)
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(edge_bundle_copy)


def test_rejects_folder_without_manifest(tmp_path: Path):
    with pytest.raises(BundleError, match="no manifest.json; not a bundle. run `make export`"):
        load_bundle(tmp_path)


def test_rejects_manifest_that_is_not_json(edge_bundle_copy: Path):
    (edge_bundle_copy / MANIFEST_NAME).write_bytes(b"\xff\xfe not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(edge_bundle_copy)


def test_rejects_segment_file_not_listed_with_a_hash(edge_bundle_copy: Path):
    _edit_manifest(edge_bundle_copy, lambda d: d.__setitem__("files", [f for f in d["files"] if f["path"] != "lm_head.onnx"]))
    with pytest.raises(BundleError, match=r"not listed with a hash: \['lm_head.onnx'\]"):
        load_bundle(edge_bundle_copy)


def test_read_verified_notices_a_file_changed_after_loading(edge_bundle_copy: Path):
    b = load_bundle(edge_bundle_copy)
    (edge_bundle_copy / "lm_head.onnx").write_bytes(b"swapped")
    with pytest.raises(HashMismatch, match="changed since the bundle was verified"):
        b.read_verified("lm_head.onnx")


def test_manifest_json_round_trips(edge_bundle_dir: Path):
    raw = json.loads((edge_bundle_dir / MANIFEST_NAME).read_text())
    m = Manifest.from_dict(raw)
    assert json.loads(json.dumps(m.to_dict())) == raw
    assert Manifest.from_dict(m.to_dict()) == m


def test_golden_manifest_of_format_v1_still_parses():
    golden = Path(__file__).parents[1] / "golden" / "manifest_v1.json"
    raw = json.loads(golden.read_text())
    m = Manifest.from_dict(raw)
    assert json.loads(json.dumps(m.to_dict())) == raw
    assert m.decoder_chunks()[0].name == "decoder[0:1]"
