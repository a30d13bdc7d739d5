"""Which ONNX operators TensorRT's ONNX parser accepts, and a static check of exported segments.

The allow-lists below are TensorRT's published support matrix (onnx/onnx-tensorrt
``docs/operators.md``, the rows marked ``Y``), one per TensorRT line the edge meets:

- ``8.6`` (JetPack 6.0): the TensorRT 8.5 table (onnx-tensorrt commit 6d0ab7be, "TensorRT 8.5
  supports operators up to Opset 17") plus what ``docs/Changelog.md`` lists for 8.6 EA/GA:
  ``GroupNormalization``, ``LayerNormalization``, ``IsInf`` (and N-D ``Trilu``). No 8.6 table is
  published separately. Opset <= 17. INT64 tensors are cast down to INT32 by the parser (the
  9.0 EA changelog ends that), and ONNX local functions are not parsed (added in 9.0).
- ``10`` (JetPack 6.1/6.2 ship 10.3, JetPack 7 a later 10.x): the TensorRT 10.15 table
  (onnx-tensorrt main, "opset 9 to opset 24"). Native INT64. Ops that the changelog says came
  after 10.0 are in ``ADDED_IN_10`` with their first release, so a model that needs them is
  flagged for older 10.x.

Regenerate a list from a newer ``operators.md`` with ``ops_from_operators_md``. The check is
static (names, domains, opset, constant-input restrictions); whether an engine builds and
matches ONNX Runtime is only known on a GPU (tests/engines/test_tensorrt_gpu.py).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ADDED_IN_10",
    "CONSTANT_INPUTS",
    "OPSET_RANGE",
    "SOURCES",
    "SUPPORTED_OPS",
    "TRT_LINES",
    "check_onnx_ops",
    "ops_from_operators_md",
    "OpsReport",
]

SOURCES = {
    "8.6": "https://github.com/onnx/onnx-tensorrt/blob/6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc/docs/operators.md (TensorRT 8.5 table) "
    "+ docs/Changelog.md 'TensorRT 8.6 EA/GA Release'",
    "10": "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md (TensorRT 10.15 table) + docs/Changelog.md 10.x entries",
}
TRT_LINES = ("8.6", "10")
OPSET_RANGE = {"8.6": (7, 17), "10": (9, 24)}  # default ("ai.onnx") domain

_COMMON = """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow
PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
"""
_ONLY_10 = """
Attention BlackmanWindow CastLike DeformConv Gelu HammingWindow Hardmax HannWindow Mish RMSNormalization
RotaryEmbedding STFT TensorScatter
"""
SUPPORTED_OPS: dict[str, frozenset[str]] = {
    "8.6": frozenset(_COMMON.split()),
    "10": frozenset(_COMMON.split()) | frozenset(_ONLY_10.split()),
}
# First 10.x release with the op, per docs/Changelog.md; the opset-23/24 ops (Attention,
# RMSNormalization, RotaryEmbedding, TensorScatter) postdate the 10.6 entry we read.
ADDED_IN_10 = {
    "DeformConv": "10.1",
    "BlackmanWindow": "10.4",
    "HammingWindow": "10.4",
    "HannWindow": "10.4",
    "STFT": "10.5",
    "Attention": ">10.6",
    "RMSNormalization": ">10.6",
    "RotaryEmbedding": ">10.6",
    "TensorScatter": ">10.6",
}
# Inputs the parser needs as build-time constants (initializer or Constant node), by op and
# input index, per TensorRT line ("must be an initializer" / "constant" in the Restrictions
# column). 10.3 added tensor ``axes`` for Slice; ReduceX ``axes`` is an input from opset 18.
CONSTANT_INPUTS: dict[str, dict[int, tuple[str, ...]]] = {
    "Slice": {3: ("8.6",)},
    "Squeeze": {1: ("8.6", "10")},
    "Unsqueeze": {1: ("8.6", "10")},
    "CumSum": {1: ("8.6", "10")},
    "TopK": {1: ("8.6",)},
    **{
        op: {1: ("10",)}
        for op in (
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
        )
    },
}


@dataclass
class OpsReport:
    """What one ONNX file uses, and what each TensorRT line would refuse.

    Attributes:
        ops: node count per (domain, op type), subgraphs (If/Loop/Scan bodies) included.
        opset: version of the default domain.
        functions: names of ONNX local functions in the model.
        problems: per TensorRT line, every reason the parser would refuse the file.
        dtypes: per op type, the element types of its first input (or output for sources),
            for the notes in docs/tensorrt.md (INT64 becomes INT32 under 8.6).
        notes: ops supported by the newest 10.x only (see ``ADDED_IN_10``).
    """

    path: str
    ops: Counter = field(default_factory=Counter)
    opset: int = 0
    functions: tuple[str, ...] = ()
    problems: dict[str, list[str]] = field(default_factory=dict)
    dtypes: dict[str, set[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def verdict(self, line: str) -> str:
        return "ok" if not self.problems.get(line) else "refused: " + "; ".join(self.problems[line])


def _graphs(graph):
    """The graph and every subgraph in it (If branches, Loop/Scan bodies), depth first."""
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def check_onnx_ops(path: Path, lines: tuple[str, ...] = TRT_LINES) -> OpsReport:
    """Check one ONNX file against each TensorRT line's published support (needs ``onnx``).

    External weights are not read: only the graph matters here.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    report = OpsReport(path=str(path))
    report.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    report.functions = tuple(f.name for f in model.functions)
    types = _elem_types(model)
    for graph in _graphs(model.graph):
        const = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        for node in graph.node:
            domain = node.domain or "ai.onnx"
            report.ops[(domain, node.op_type)] += 1
            first = next((x for x in node.input if x), None) or (node.output[0] if node.output else "")
            report.dtypes.setdefault(node.op_type, set()).add(types.get(first, "?"))
            for index, needing in CONSTANT_INPUTS.get(node.op_type, {}).items():
                if len(node.input) > index and node.input[index] and node.input[index] not in const:
                    for line in needing:
                        report.problems.setdefault(line, []).append(
                            f"{node.op_type} {node.name or '?'}: input {index} must be a build-time constant"
                        )
    for line in lines:
        problems = report.problems.setdefault(line, [])
        lo, hi = OPSET_RANGE[line]
        if not lo <= report.opset <= hi:
            problems.append(f"opset {report.opset} outside {lo}..{hi}")
        for (domain, op), n in sorted(report.ops.items()):
            if domain != "ai.onnx":
                problems.append(f"{domain}::{op} x{n} (custom domain: needs a TensorRT plugin)")
            elif op not in SUPPORTED_OPS[line]:
                problems.append(f"{op} x{n} not supported")
            elif line == "10" and op in ADDED_IN_10:
                report.notes.append(f"{op} needs TensorRT {ADDED_IN_10[op]} or later (JetPack 6.1/6.2 ship 10.3)")
        if line == "8.6" and report.functions:
            problems.append(f"ONNX local functions {list(report.functions)} (parsed from TensorRT 9.0 on); export with them inlined")
    return report


def _elem_types(model) -> dict[str, str]:
    """Value name -> ONNX element type name, from shape inference (best effort)."""
    import onnx
    from onnx import shape_inference

    try:
        g = shape_inference.infer_shapes(model).graph  # non-strict: values it cannot type are left out
    except shape_inference.InferenceError:  # e.g. a custom domain without an opset import: notes only, the check goes on
        g = model.graph
    out = {v.name: onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type) for v in (*g.input, *g.output, *g.value_info)}
    out.update({i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in g.initializer})
    return out


def ops_from_operators_md(text: str) -> dict[str, tuple[bool, str]]:
    """Parse onnx-tensorrt's ``docs/operators.md`` table: op -> (supported, restrictions)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.fullmatch(r"[A-Z][A-Za-z0-9]*", cells[0]) or cells[0] == "Operator":
            continue
        if not re.match(r"^[YN]\b", cells[1]):
            continue
        out[cells[0]] = (cells[1].startswith("Y"), cells[3] if len(cells) > 3 else "")
    return out
