"""FLOPs of a whole request, from the per-segment FLOPs models in the manifest.

Follows exactly the calls ``Generator.generate`` makes, so that FLOPs reported for a plan
are the FLOPs of the work actually done (kept tokens, exit layer, tokens generated).
"""

from __future__ import annotations

from msao.engines.manifest import Manifest, exit_segment_name

__all__ = ["request_flops"]


def request_flops(
    manifest: Manifest,
    *,
    image_tokens: int,
    text_tokens: int,
    new_tokens: int,
    exit_layer: int | None = None,
    include_vision: bool = True,
    layers: tuple[int, int] | None = None,
    include_head: bool = True,
) -> int:
    """FLOPs of one batch-1 request, or of the part of it one side of a split runs.

    Args:
        image_tokens: image tokens entering prefill (after any keep-set).
        text_tokens: prompt tokens other than the image tokens.
        new_tokens: generated tokens, EOS included (the last one needs no decode step).
        exit_layer: answer from ``exit_head@k`` (layers beyond k are not run).
        include_vision: count the vision encoder (False when its output was reused, or ran elsewhere).
        layers: only decoder layers [a, b) (one side of a split); None = all up to the head.
        include_head: count the head (False for the side of a split that hands hidden states on).
    """
    by_name = {s.name: s for s in manifest.segments}
    missing = [s.name for s in manifest.segments if s.flops is None]
    if missing:
        raise ValueError(f"bundle {manifest.name} has no FLOPs for {missing}; re-export it")
    end = manifest.model.num_layers if exit_layer is None else exit_layer
    start, end = layers if layers is not None else (0, end)
    chunks = [s for s in manifest.decoder_chunks() if s.layers and start <= s.layers[0] and s.layers[1] <= end]
    head = by_name["lm_head" if exit_layer is None else exit_segment_name(exit_layer)]
    head_flops = head.flops.flops(tokens=1) if include_head else 0  # type: ignore[union-attr]
    prompt = image_tokens + text_tokens
    total = by_name["vision_encoder"].flops.flops() if include_vision else 0  # type: ignore[union-attr]
    total += sum(c.flops.flops(tokens=prompt) for c in chunks) + head_flops  # type: ignore[union-attr]
    for i in range(max(0, new_tokens - 1)):
        total += sum(c.flops.flops(tokens=1, past=prompt + i) for c in chunks) + head_flops  # type: ignore[union-attr]
    return total
