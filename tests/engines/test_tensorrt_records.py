"""Engine bookkeeping: an engine runs only where, and from what, it was built; the bundle's own checks stay intact."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from msao.engines.bundle import load_bundle
from msao.engines.engine_records import (
    SIDECAR_NAME,
    EngineSet,
    EngineTarget,
    engine_sets_of,
    find_engine,
    jetpack_from_l4t,
    read_engine_verified,
    read_l4t_release,
)
from msao.errors import BundleError, EngineMismatch, HashMismatch
from tests.engines.trt_parts import ORIN_TRT10, write_engine_set


def test_engine_set_round_trips_through_its_json_file(edge_bundle_copy):
    folder, written = write_engine_set(edge_bundle_copy)
    ((found_folder, read),) = engine_sets_of(edge_bundle_copy)
    assert found_folder == folder and read == written
    assert folder.name == "trt10.3.0-sm87-orin"


def test_engine_records_with_unknown_keys_are_refused(edge_bundle_copy):
    folder, _ = write_engine_set(edge_bundle_copy)
    d = json.loads((folder / SIDECAR_NAME).read_text())
    d["engines"][0]["int8"] = True
    (folder / SIDECAR_NAME).write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"malformed engine record .*unknown keys \['int8'\].*msao build-engines"):
        engine_sets_of(edge_bundle_copy)


def test_the_bundle_itself_still_loads_and_verifies_with_engines_beside_it(edge_bundle_copy):
    write_engine_set(edge_bundle_copy)
    before = (edge_bundle_copy / "manifest.json").read_bytes()
    bundle = load_bundle(edge_bundle_copy)  # verifies every listed file; engines/ is not listed
    assert (edge_bundle_copy / "manifest.json").read_bytes() == before
    assert not any(f.path.startswith("engines/") for f in bundle.manifest.files)


def test_matching_engine_is_found_and_its_bytes_verified(edge_bundle_copy):
    write_engine_set(edge_bundle_copy)
    bundle = load_bundle(edge_bundle_copy)
    _, record = find_engine(bundle, bundle.segment("decoder[0:1]"), ORIN_TRT10)
    assert read_engine_verified(bundle.root, record) == b"plan of decoder[0:1] for trt10.3.0-sm87-orin"


@pytest.mark.parametrize(
    "here, expected",
    [
        (dataclasses.replace(ORIN_TRT10, tensorrt_version="10.7.0"), r"built with TensorRT 10\.3\.0, this is TensorRT 10\.7\.0"),
        (dataclasses.replace(ORIN_TRT10, tensorrt_version="8.6.2"), r"built with TensorRT 10\.3\.0, this is TensorRT 8\.6\.2"),
        (EngineTarget("10.3.0", "NVIDIA H200", "9.0"), r"built for Orin \(sm 8\.7\), this GPU is NVIDIA H200 \(sm 9\.0\)"),
    ],
)
def test_engine_for_another_tensorrt_or_gpu_is_refused_with_the_rebuild_hint(edge_bundle_copy, here, expected):
    write_engine_set(edge_bundle_copy)
    bundle = load_bundle(edge_bundle_copy)
    with pytest.raises(EngineMismatch, match=expected + r".*rebuild on this device with `msao build-engines --bundle "):
        find_engine(bundle, bundle.segment("vision_encoder"), here)


def test_another_l4t_release_alone_is_not_a_mismatch():
    assert ORIN_TRT10.mismatches(dataclasses.replace(ORIN_TRT10, l4t_release="36.4.3", jetpack="6.2")) == []


def test_altered_engine_file_is_refused_as_a_hash_mismatch(edge_bundle_copy):
    write_engine_set(edge_bundle_copy)
    bundle = load_bundle(edge_bundle_copy)
    _, record = find_engine(bundle, bundle.segment("lm_head"), ORIN_TRT10)
    path = bundle.root / record.file
    path.write_bytes(path.read_bytes().replace(b"plan", b"PLAN"))  # same size, other bytes
    with pytest.raises(HashMismatch, match=r"lm_head\.engine.*sha256.*rebuild with `msao build-engines"):
        read_engine_verified(bundle.root, record)
    path.write_bytes(b"short")
    with pytest.raises(HashMismatch, match=r"5 bytes"):
        read_engine_verified(bundle.root, record)


def test_engine_built_from_an_older_export_is_refused(edge_bundle_copy):
    folder, engine_set = write_engine_set(edge_bundle_copy)
    stale = dataclasses.replace(engine_set.engines[0], onnx_sha256="0" * 64)
    d = engine_set.to_dict()
    d["engines"][0] = stale.to_dict()
    (folder / SIDECAR_NAME).write_text(json.dumps(d))
    bundle = load_bundle(edge_bundle_copy)
    with pytest.raises(EngineMismatch, match=re.escape(f"segment {stale.segment}: engine built from") + ".*re-exported"):
        find_engine(bundle, bundle.segment(stale.segment), ORIN_TRT10)


def test_engines_of_another_model_are_refused(edge_bundle_copy):
    folder, engine_set = write_engine_set(edge_bundle_copy)
    other = EngineSet.from_dict({**engine_set.to_dict(), "model_hash": "f" * 64})
    (folder / SIDECAR_NAME).write_text(json.dumps(other.to_dict()))
    bundle = load_bundle(edge_bundle_copy)
    with pytest.raises(EngineMismatch, match="built from another export"):
        find_engine(bundle, bundle.segment("text_embed"), ORIN_TRT10)


def test_missing_engines_say_how_to_build_them(edge_bundle_copy):
    bundle = load_bundle(edge_bundle_copy)
    with pytest.raises(BundleError, match=r"no TensorRT engines .*msao build-engines --bundle"):
        find_engine(bundle, bundle.segment("text_embed"), ORIN_TRT10)
    write_engine_set(edge_bundle_copy, segments=("text_embed",))
    with pytest.raises(BundleError, match=r"has no engine for segment lm_head"):
        find_engine(bundle, bundle.segment("lm_head"), ORIN_TRT10)


def test_engine_paths_outside_the_engines_folder_are_refused(edge_bundle_copy):
    folder, engine_set = write_engine_set(edge_bundle_copy)
    d = engine_set.to_dict()
    d["engines"][0]["file"] = "../../etc/passwd"
    (folder / SIDECAR_NAME).write_text(json.dumps(d))
    with pytest.raises(BundleError, match="must lie under engines/"):
        engine_sets_of(edge_bundle_copy)


def test_l4t_release_and_jetpack_are_read_from_nv_tegra_release(tmp_path: Path):
    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n")
    assert read_l4t_release(f) == "36.4.3" and jetpack_from_l4t("36.4.3") == "6.2"
    assert jetpack_from_l4t("36.3.0") == "6.0" and jetpack_from_l4t("99.1.0") == ""
    assert read_l4t_release(tmp_path / "absent") == ""  # not a Jetson
