"""Nothing in the msao package ever unpickles: a scan of its source, and a test that the scan finds what it must.

Unpickling runs code chosen by whoever wrote the bytes, so none of these may appear in msao/:
importing pickle, cPickle, _pickle, dill, cloudpickle, joblib, jsonpickle, marshal or shelve;
``torch.load`` without ``weights_only=True``; any call with ``allow_pickle=True`` (``numpy.load``
and friends); ``pandas.read_pickle`` / ``torch.serialization.load``; ``yaml.load`` without a safe
Loader, ``yaml.unsafe_load`` / ``yaml.full_load``. Weights load from safetensors, bundles from
ONNX + JSON, wire payloads from safetensors bytes parsed by ``cloud_bridge/codec.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "msao"
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "jsonpickle", "marshal", "shelve"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
UNSAFE_CALLS = {  # dotted name (after resolving import aliases) -> why
    "pandas.read_pickle": "unpickles",
    "torch.serialization.load": "unpickles unless weights_only=True",
    "yaml.unsafe_load": "constructs arbitrary Python objects",
    "yaml.unsafe_load_all": "constructs arbitrary Python objects",
    "yaml.full_load": "constructs Python objects",
    "yaml.full_load_all": "constructs Python objects",
    "numpy.lib.format.read_array": "unpickles object arrays when allow_pickle=True",
}


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``np.lib.format.read_array`` -> ``numpy.lib.format.read_array`` (import aliases resolved)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def find_unpickling(source: str, filename: str = "<source>") -> list[str]:
    """Every line of ``source`` that unpickles or imports an unpickler, as ``file:line: why: code``."""
    tree = ast.parse(source, filename)
    lines = source.splitlines()
    aliases: dict[str, str] = {}
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append((node.lineno, f"imports {a.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append((node.lineno, f"imports from {node.module}"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        why = None
        if name in UNSAFE_CALLS:
            why = f"{name} {UNSAFE_CALLS[name]}"
        elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            why = "torch.load without weights_only=True unpickles"
        elif _is_true(_keyword(node, "allow_pickle")):
            why = f"{name or 'a call'} with allow_pickle=True unpickles"
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = (_dotted(loader, aliases) or "").rsplit(".", 1)[-1] if loader is not None else ""
            if loader_name not in SAFE_YAML_LOADERS:
                why = f"{name} without a safe Loader constructs Python objects"
        elif name in ("importlib.import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.split(".")[0] in FORBIDDEN_MODULES:
                why = f"imports {arg.value} dynamically"
        if why:
            found.append((node.lineno, why))
    return [f"{filename}:{n}: {why}: {lines[n - 1].strip()}" for n, why in sorted(set(found))]


def test_msao_package_never_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} Python files under {PACKAGE}"
    offending = [hit for f in files for hit in find_unpickling(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE.parent)))]
    assert not offending, "unpickling in the msao package (load safetensors / JSON / ONNX instead):\n" + "\n".join(offending)


BAD = {
    "import pickle": "imports pickle",
    "import cPickle as cp": "imports cPickle",
    "from dill import loads": "imports from dill",
    "import joblib.numpy_pickle": "imports joblib",
    "from marshal import loads": "imports from marshal",
    "import shelve": "imports shelve",
    "import torch\ntorch.load(f)": "torch.load without weights_only",
    "import torch\ntorch.load(f, weights_only=False)": "torch.load without weights_only",
    "from torch import load\nload(f)": "torch.load without weights_only",
    "import numpy as np\nnp.load(f, allow_pickle=True)": "numpy.load with allow_pickle=True",
    "import numpy\nnumpy.lib.format.read_array(f)": "numpy.lib.format.read_array",
    "import pandas as pd\npd.read_pickle(p)": "pandas.read_pickle",
    "import yaml\nyaml.load(s)": "yaml.load without a safe Loader",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)": "yaml.load without a safe Loader",
    "import yaml\nyaml.unsafe_load(s)": "yaml.unsafe_load",
    "import yaml\nyaml.full_load(s)": "yaml.full_load",
    "import importlib\nimportlib.import_module('pickle')": "imports pickle dynamically",
}
GOOD = [
    "import torch\ntorch.load(f, weights_only=True)",
    "import numpy as np\nnp.load(f)",
    "import numpy as np\nnp.load(f, allow_pickle=False)",
    "import yaml\nyaml.safe_load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
    "import json\njson.loads(s)",
    "from safetensors.torch import load_file\nload_file(p)",
    "pickled = 'a word in a string is not an import'",
]


@pytest.mark.parametrize("source", list(BAD))
def test_scan_flags_each_way_to_unpickle(source: str):
    hits = find_unpickling(source)
    assert hits and BAD[source] in hits[0], hits


@pytest.mark.parametrize("source", GOOD)
def test_scan_leaves_safe_loading_alone(source: str):
    assert find_unpickling(source) == []
