"""Count a segment's FLOPs with PyTorch's FlopCounterMode and fit the manifest's FlopsModel."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from msao.engines.manifest import FlopsModel, ModelInfo, SegmentSpec
from msao.engines.profile import synthetic_feeds
from msao.errors import ExportCheckFailed

__all__ = ["count_flops", "flops_model_from_module", "torch_feeds"]


def torch_feeds(spec: SegmentSpec, info: ModelInfo, batch: int, seq: int, past: int) -> tuple[torch.Tensor, ...]:
    """``synthetic_feeds`` as torch tensors in the segment's input order."""
    feeds = synthetic_feeds(spec, batch=batch, seq=seq, past=past, vocab=info.vocab_size, rng=np.random.default_rng(0))
    return tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)


def count_flops(module: torch.nn.Module, spec: SegmentSpec, info: ModelInfo, batch: int = 1, seq: int = 1, past: int = 0) -> int:
    """FLOPs of one call at the given sizes (matmuls, convolutions and attention)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*torch_feeds(spec, info, batch, seq, past))
    return int(counter.get_total_flops())


def flops_model_from_module(module: torch.nn.Module, spec: SegmentSpec, info: ModelInfo) -> FlopsModel:
    """Fit ``FlopsModel`` from counts at a few shapes, then verify it at another shape.

    Raises:
        ExportCheckFailed: the counts do not follow the model (a segment whose cost is not
            per-call + linear + attention-shaped; a bug to report).
    """
    if spec.kind == "vision_encoder":
        model = FlopsModel(per_call=count_flops(module, spec, info, batch=1))
    elif spec.kind == "decoder":
        f1 = count_flops(module, spec, info, seq=8, past=0)  # = 8a + 64b
        f2 = count_flops(module, spec, info, seq=4, past=8)  # = 4a + 48b
        b = (2 * f2 - f1) // 32  # 2*f2 - f1 = 96b - 64b
        a = (f1 - 64 * b) // 8
        model = FlopsModel(per_token=a, per_token_pair=b)
    else:
        model = FlopsModel(per_token=count_flops(module, spec, info, seq=1))
    if spec.kind != "vision_encoder":
        got = count_flops(module, spec, info, batch=2, seq=5, past=3)
        if got != model.flops(batch=2, tokens=5, past=3):
            raise ExportCheckFailed(f"segment {spec.name}: FLOPs {got} at (B=2, T=5, P=3) do not fit {model}")
    return model
