"""One segment module → one ONNX file, with dynamic dims named as in the manifest.

We use the TorchScript-based exporter (``dynamo=False``) at opset 17 on purpose: TensorRT 8.6
(JetPack 6.0) parses opsets up to 17, and the dynamo exporter starts at opset 18. Revisit when
JetPack 6.0 support is dropped (TensorRT 10 parses opset 18+); the manifest records the opset.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from msao.engines.manifest import TensorSpec

__all__ = ["OPSET", "onnx_from_segment"]

OPSET = 17


def onnx_from_segment(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    path: Path,
    opset: int = OPSET,
) -> None:
    """Export ``module(*example)`` to ``path`` with every symbolic dim of the specs dynamic.

    The example should use non-degenerate sizes (past > 0, seq > 1, batch > 1) so that no
    dimension is specialised during tracing; zero-length pasts are checked afterwards.
    """
    dynamic_axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*inputs, *outputs)}
    module.eval()
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
