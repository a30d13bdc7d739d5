"""One segment module → one ONNX file, with dynamic dims named as in the manifest.

We use the TorchScript-based exporter (``dynamo=False``) at opset 17 on purpose: TensorRT 8.6
(JetPack 6.0) parses opsets up to 17, and the dynamo exporter starts at opset 18. Revisit when
JetPack 6.0 support is dropped (TensorRT 10 parses opset 18+); the manifest records the opset.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch

from msao.engines.manifest import TensorSpec

__all__ = ["OPSET", "onnx_from_segment"]

OPSET = 17
PROTOBUF_LIMIT = 2**31 - 1  # bytes: an ONNX file is one protobuf message; larger weights go to external data


def onnx_from_segment(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    path: Path,
    opset: int = OPSET,
) -> tuple[str, ...]:
    """Export ``module(*example)`` to ``path`` with every symbolic dim of the specs dynamic.

    The example should use non-degenerate sizes (past > 0, seq > 1, batch > 1) so that no
    dimension is specialised during tracing; zero-length pasts are checked afterwards.

    Returns the external data files written beside ``path`` (names relative to its folder):
    none for a segment under protobuf's 2 GB limit; else one ``<file>.data`` holding every
    weight (the tracer writes one file per tensor, named after it, which would collide
    between segments in one bundle folder).
    """
    dynamic_axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*inputs, *outputs)}
    module.eval()
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    if weights < PROTOBUF_LIMIT - 2**26:  # 64 MB of headroom for the graph itself
        _export(module, example, inputs, outputs, dynamic_axes, path, opset)
        return ()
    import onnx

    scratch = path.parent / f".{path.name}.parts"
    scratch.mkdir()
    try:
        _export(module, example, inputs, outputs, dynamic_axes, scratch / path.name, opset)
        model = onnx.load(str(scratch / path.name), load_external_data=True)
        data = f"{path.name}.data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return (data,)


def _export(module, example, inputs, outputs, dynamic_axes, path: Path, opset: int) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; correctness is checked numerically after
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=[t.name for t in inputs],
            output_names=[t.name for t in outputs],
            dynamic_axes={k: v for k, v in dynamic_axes.items() if v},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
