"""Position ids of a prompt for each model family, in NumPy (the edge never imports torch).

LLaVA counts 1-D positions: prefix, then one position per image token, then the suffix.
Qwen2-VL and Qwen2.5-VL use M-RoPE: every token has three position ids (t, h, w). Text
tokens carry the same value on all three axes; the merged image tokens of a (T, H, W) grid
starting at position s get (s + t, s + h, s + w), row-major; text after the image continues
from s + max(T, H, W) — what transformers' ``get_rope_index`` computes for a still image.

A pruned keep-set selects image tokens but never moves them: each kept token keeps its
original position (1-D or 3-D) and the suffix starts where it would with every token kept,
so the edge and the cloud model given the same keep-set see the same positions.

    prefix ids | image tokens (keep-set) | suffix ids
    llava:  0..P-1 | P + k          | P + N + i
    mrope:  p,p,p  | P+t, P+h, P+w  | P + max(T,H,W) + i   (on all three axes)
"""

from __future__ import annotations

import numpy as np

from msao.engines.manifest import ModelInfo, MropeSpec

__all__ = ["decode_positions", "image_positions", "prefill_positions"]


def image_positions(mrope: MropeSpec, start: int) -> np.ndarray:
    """int64 (3, N): the (t, h, w) positions of every merged image token, starting at ``start``."""
    t, h, w = mrope.merged_grid
    grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)  # (3, N)
    return (grid + start).astype(np.int64)


def prefill_positions(info: ModelInfo, prefix_len: int, n: int, keep: np.ndarray, suffix_len: int) -> tuple[np.ndarray, int]:
    """Position ids of a prefill and the position of the first generated token.

    Args:
        info: the bundle's model (its family and, for M-RoPE, its grid).
        prefix_len / suffix_len: text tokens before and after the image.
        n: the image's tokens before pruning: ``info.image_tokens``, or 0 for a text-only turn.
        keep: sorted indices of the image tokens that enter prefill.

    Returns:
        int64 (1, T) for LLaVA or (3, 1, T) for the M-RoPE families, T = prefix + kept + suffix;
        and the next position (decode steps count on from it, one per token).
    """
    if info.mrope is None:
        positions = np.concatenate([np.arange(prefix_len), prefix_len + keep, prefix_len + n + np.arange(suffix_len)])[None].astype(
            np.int64
        )
        return positions, prefix_len + n + suffix_len
    if n not in (0, info.image_tokens):
        raise ValueError(f"an image of {n} tokens; this bundle's declared grid {info.mrope.merged_grid} makes {info.image_tokens}")
    after_image = prefix_len + (max(info.mrope.merged_grid) if n else 0)
    text_before = np.broadcast_to(np.arange(prefix_len), (3, prefix_len))
    text_after = np.broadcast_to(after_image + np.arange(suffix_len), (3, suffix_len))
    image = image_positions(info.mrope, prefix_len)[:, keep] if n else np.zeros((3, 0), np.int64)  # (3, N) -> (3, K)
    positions = np.concatenate([text_before, image, text_after], axis=1)[:, None].astype(np.int64)  # (3, 1, T)
    return positions, after_image + suffix_len


def decode_positions(info: ModelInfo, position: int, batch: int = 1) -> np.ndarray:
    """Position ids of one decode step: int64 (B, 1), or (3, B, 1) with all axes equal for M-RoPE."""
    pos = np.full((batch, 1), position, np.int64)
    return pos if info.mrope is None else np.ascontiguousarray(np.broadcast_to(pos, (3, batch, 1)))
