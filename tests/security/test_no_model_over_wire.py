"""No model file is accepted over the network: what the wire carries, and what the receiving code can do with it.

- The codec turns bytes into named arrays of plain numbers plus a str -> str metadata dict;
  nothing else decodes (no object arrays, no nested metadata; more in
  tests/cloud_bridge/test_codec.py).
- The code that handles bytes from the broker or HTTP never loads a model, opens a file, or
  runs code: checked here on its source. Bundles are loaded at start-up from a path in the
  configuration (``msao cloud --bundle``, ``msao edge --bundle``), verified by hash first
  (test_bundle_tamper.py).
- A real worker refuses a job that carries a model file as a tensor or names a bundle in its
  metadata: test_end_to_end_tls.py.
"""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from msao.cloud_bridge.codec import DTYPE_NAMES, payload_from_tensors, tensors_from_payload
from msao.errors import CodecError

PACKAGE = Path(__file__).resolve().parents[2] / "msao"
# every module that parses, routes or serves what arrives from the broker or over HTTP
RECEIVING = sorted(
    [*(PACKAGE / "cloud_bridge").glob("*.py")]
    + [PACKAGE / "edge_runtime" / f"{m}.py" for m in ("mqtt_intake", "http_api", "openai_chat", "requests", "edge_client")]
)
FORBIDDEN_IMPORTS = {
    "onnx", "onnxruntime", "tensorrt", "subprocess", "tempfile", "zipfile", "tarfile", "shutil", "importlib",
    "urllib.request", "http.client", "requests",
}  # fmt: skip
FORBIDDEN_NAMES = {"open", "exec", "eval", "compile", "__import__", "load_bundle", "InferenceSession"}  # called as bare names
FORBIDDEN_METHODS = {
    "read_bytes", "read_text", "write_bytes", "write_text", "mkdir", "unlink", "load_bundle", "InferenceSession",
    "load_model", "deserialize_cuda_engine", "from_file", "load_from_string",
}  # fmt: skip


def _forbidden_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in FORBIDDEN_IMPORTS)


def _violations(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{where}: imports {a.name}" for a in node.names if _forbidden_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if _forbidden_module(node.module):
                out.append(f"{where}: imports from {node.module}")
            out += [f"{where}: imports {a.name} from {node.module}" for a in node.names if a.name in ("load_bundle", "InferenceSession")]
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in FORBIDDEN_NAMES:
                out.append(f"{where}: calls {f.id}()")
            elif isinstance(f, ast.Attribute) and f.attr in FORBIDDEN_METHODS:
                out.append(f"{where}: calls .{f.attr}()")
    return out


def test_code_that_receives_network_bytes_never_loads_models_touches_files_or_runs_code():
    assert len(RECEIVING) >= 10 and all(p.is_file() for p in RECEIVING), RECEIVING
    found = [v for p in RECEIVING for v in _violations(p)]
    assert not found, "network-facing code must not load models, touch files or run code (do that at start-up):\n" + "\n".join(found)


def test_the_source_check_notices_a_model_loaded_from_a_message(tmp_path: Path):
    bad = tmp_path / "msao" / "evil.py"
    bad.parent.mkdir()
    bad.write_text(
        "import onnxruntime as ort\nfrom msao.engines.bundle import load_bundle\n"
        "def on_message(msg):\n    open('/tmp/m.onnx', 'wb').write(msg.payload)\n    load_bundle(msg.topic)\n"
        "    ort.InferenceSession(bytes(msg.payload))\n"
    )
    found = _violations(bad, tmp_path)
    assert {v.split(": ", 1)[1] for v in found} == {
        "imports onnxruntime", "imports load_bundle from msao.engines.bundle", "calls open()", "calls load_bundle()",
        "calls .InferenceSession()",
    }, found  # fmt: skip


def test_wire_tensors_are_plain_numbers_only():
    kinds = {np.dtype(name).kind for name in DTYPE_NAMES}
    assert kinds <= set("biuf"), f"the codec would carry dtype kinds {kinds - set('biuf')} (object/void/str arrays are not data)"


@pytest.mark.parametrize("tag", ["O", "|O", "V8", "U4", "PICKLE", "object"])
def test_payload_declaring_an_object_dtype_is_refused(tag: str):
    header = json.dumps({"m": {"dtype": tag, "shape": [1], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    with pytest.raises(CodecError, match="is not supported"):
        tensors_from_payload(struct.pack("<Q", len(header)) + header + bytes(8))


def test_encoder_refuses_objects_and_non_string_metadata():
    with pytest.raises(CodecError, match="cannot be sent"):
        payload_from_tensors({"m": np.array([object()], dtype=object)})
    with pytest.raises(CodecError):
        payload_from_tensors({}, {"bundle": b"\x00model"})  # type: ignore[dict-item]
