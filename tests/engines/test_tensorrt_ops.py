"""Every exported segment of both built-in bundles uses only operators, opsets and constant inputs that
TensorRT 8.6 and 10.x publish as supported (msao/engines/tensorrt_ops.py); the check itself refuses
what it should. Results are recorded in docs/tensorrt.md."""

from __future__ import annotations

from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx", reason="the operator check reads ONNX graphs: pip install 'msao[export]'")

from msao.engines.bundle import load_bundle  # noqa: E402
from msao.engines.tensorrt_ops import SUPPORTED_OPS, TRT_LINES, check_onnx_ops, ops_from_operators_md  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p.parent for p in (ROOT / "bundles").glob("*/manifest.json"))  # `make export` output, when present


def _check_bundle(root: Path) -> None:
    bundle = load_bundle(root)
    offending = []
    for spec in bundle.manifest.segments:
        report = check_onnx_ops(bundle.path_of(spec.file))
        for line in TRT_LINES:
            offending += [f"{bundle.manifest.name} {spec.name} ({spec.file}), TensorRT {line}: {p}" for p in report.problems[line]]
    assert not offending, "segments TensorRT would refuse:\n  " + "\n  ".join(offending)


@pytest.mark.parametrize("fixture", ["edge_bundle_dir", "cloud_bundle_dir"])
def test_every_segment_of_the_built_in_bundles_is_engine_friendly(fixture, request):
    _check_bundle(request.getfixturevalue(fixture))


@pytest.mark.parametrize("root", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_segment_of_the_exported_bundles_in_bundles_dir_is_engine_friendly(root):
    _check_bundle(root)


def _model(nodes, opset=17, inputs=("x",), functions=()):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in inputs],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(f.domain, 1) for f in functions]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def test_the_check_refuses_unsupported_ops_custom_domains_and_new_opsets(tmp_path):
    from onnx import helper

    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Unique", ["a"], ["b"]),  # "N" in every table
        helper.make_node("FusedGemm", ["b"], ["c"], domain="com.microsoft"),
    ]
    path = tmp_path / "bad.onnx"
    onnx.save(_model(nodes, opset=18), path)
    report = check_onnx_ops(path)
    assert "Unique x1 not supported" in report.problems["8.6"] and "Unique x1 not supported" in report.problems["10"]
    assert any("com.microsoft::FusedGemm" in p for p in report.problems["10"])
    assert "opset 18 outside 7..17" in report.problems["8.6"] and not any("opset" in p for p in report.problems["10"])
    assert report.verdict("10").startswith("refused: ")


def test_the_check_refuses_axes_that_are_not_build_time_constants(tmp_path):
    from onnx import helper

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "s", "s"], ["axes"]),
        helper.make_node("Unsqueeze", ["x", "axes"], ["y"]),  # axes computed at run time
    ]
    path = tmp_path / "dynamic_axes.onnx"
    onnx.save(_model(nodes), path)
    report = check_onnx_ops(path)
    for line in TRT_LINES:
        assert any("Unsqueeze" in p and "input 1 must be a build-time constant" in p for p in report.problems[line]), line


def test_local_functions_are_refused_for_8_6_only(tmp_path):
    from onnx import helper

    fn = helper.make_function(
        "msao.test", "Twice", ["i"], ["o"], [helper.make_node("Add", ["i", "i"], ["o"])], [helper.make_opsetid("", 17)]
    )
    path = tmp_path / "fn.onnx"
    onnx.save(_model([helper.make_node("Twice", ["x"], ["y"], domain="msao.test")], functions=[fn]), path)
    report = check_onnx_ops(path)
    assert any("local functions ['Twice']" in p for p in report.problems["8.6"])
    assert not any("local functions" in p for p in report.problems["10"])


def test_layer_normalization_is_what_separates_8_6_from_8_5():
    # The built-in vision towers use LayerNormalization (opset 17): TensorRT 8.6 EA added it.
    assert "LayerNormalization" in SUPPORTED_OPS["8.6"] and "LayerNormalization" in SUPPORTED_OPS["10"]
    assert SUPPORTED_OPS["8.6"] <= SUPPORTED_OPS["10"]
    assert "Attention" in SUPPORTED_OPS["10"] and "Attention" not in SUPPORTED_OPS["8.6"]


def test_operators_md_tables_parse_into_support_and_restrictions():
    text = """
| Operator                  | Supported  | Supported Types | Restrictions |
|---------------------------|------------|-----------------|--------------|
| Abs                       | Y          | FP32, FP16, INT32 |
| BitShift                  | N          |
| Slice                     | Y          | FP32, FP16 | `axes` must be an initializer |
| NonMaxSuppression         | Y [EXPERIMENTAL] | FP32, FP16 |
"""
    ops = ops_from_operators_md(text)
    assert ops == {
        "Abs": (True, ""),
        "BitShift": (False, ""),
        "Slice": (True, "`axes` must be an initializer"),
        "NonMaxSuppression": (True, ""),
    }
