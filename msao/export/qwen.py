"""The Qwen2-VL / Qwen2.5-VL parts of export: the declared image grid and the vision encoder segment.

Everything else of these models exports with the generic segments (``TextEmbed``,
``DecoderChunk`` with 3-D position ids, ``LmHead``): their decoders are Qwen2 layers whose
rotary embedding reads (3, B, T) M-RoPE positions. What differs is the vision side:

    pixels (B, 3, H, W) ─patchify─► (B*L, 3*2*p*p) ─patch_embed─► (B, L, Dv)      L = grid_h * grid_w
      [Qwen2.5: reorder patches into attention windows]
      ─blocks (2-D rotary; Qwen2.5: window attention except fullatt_block_indexes)─► (B, L, Dv)
      ─merger (2x2 patches → 1 token)─► image_tokens (B, N, D)    N = L / 4
      [Qwen2.5: undo the window order]
    hidden after block k ─mean over each 2x2 block─► mas_features (B, N, Dv)

The grid is fixed per bundle (``declare_grid``), so L, N, the rotary angles and the window
mask are constants of the graph. Hugging Face runs the vision tower on a packed
(sum of L, Dv) sequence split per image by ``cu_seqlens``; a traced split would freeze the
batch size, so ``QwenVisionEncoder`` keeps a batch axis and calls HF's own submodules
(patch embed, norms, qkv/proj, MLP, merger) around an eager attention of the same math.
``check_vision_against_hf`` compares it with HF's ``get_image_features`` at export.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from msao.engines.images import ImagePreprocess
from msao.engines.manifest import MropeSpec
from msao.errors import ModelFolderError
from msao.export.segments import MASK_NEG

__all__ = [
    "DEFAULT_IMAGE_SIDE",
    "QWEN_PROMPT_TEMPLATE",
    "PixelBudget",
    "QwenVisionEncoder",
    "check_vision_against_hf",
    "declare_grid",
    "hf_vision_inputs",
    "patches_from_pixels",
    "pixel_budget_from_folder",
    "preprocess_from_grid",
]

# Qwen2-VL's chat template for one user turn with one image (what ``apply_chat_template`` writes).
QWEN_PROMPT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
)
# Without --image-size, the declared grid is what the processor makes of a 448x448 image:
# 32x32 patches of 14 px, 256 merged tokens for the real checkpoints (their budget allows it).
DEFAULT_IMAGE_SIDE = 448
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PixelBudget:
    """What a Qwen2-VL ``preprocessor_config.json`` says about image sizes.

    Attributes:
        min_pixels / max_pixels: the processor resizes every image into this pixel range
            (``size.shortest_edge`` / ``size.longest_edge`` in transformers 5, the older
            ``min_pixels`` / ``max_pixels`` keys before).
        patch_size / temporal_patch_size / merge_size: must agree with the vision config.
    """

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    mean: tuple[float, float, float] = _OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = _OPENAI_CLIP_STD

    @property
    def factor(self) -> int:
        """Image sides must be multiples of this (one merged token = factor x factor pixels)."""
        return self.patch_size * self.merge_size


def pixel_budget_from_folder(folder: Path) -> PixelBudget:
    """Read the pixel budget from ``folder/preprocessor_config.json``.

    Raises:
        ModelFolderError: the file is missing or names no pixel range.
    """
    path = folder / "preprocessor_config.json"
    if not path.exists():
        raise ModelFolderError(f"{folder}: no preprocessor_config.json; copy the one from the model's Hugging Face repo")
    d = json.loads(path.read_text())
    size = d.get("size") or {}
    lo = d.get("min_pixels", size.get("shortest_edge"))
    hi = d.get("max_pixels", size.get("longest_edge"))
    if lo is None or hi is None:
        raise ModelFolderError(f"{path}: no pixel range (min_pixels/max_pixels or size.shortest_edge/longest_edge); got size={size}")
    return PixelBudget(
        min_pixels=int(lo),
        max_pixels=int(hi),
        patch_size=int(d.get("patch_size", 14)),
        temporal_patch_size=int(d.get("temporal_patch_size", 2)),
        merge_size=int(d.get("merge_size", 2)),
        mean=tuple(float(x) for x in d.get("image_mean", _OPENAI_CLIP_MEAN)),  # type: ignore[arg-type]
        std=tuple(float(x) for x in d.get("image_std", _OPENAI_CLIP_STD)),  # type: ignore[arg-type]
    )


def declare_grid(budget: PixelBudget, config, image_size: tuple[int, int] | None) -> MropeSpec:
    """The bundle's fixed image grid: ``image_size`` (H, W) in pixels, or the processor's choice for 448x448.

    Raises:
        ModelFolderError: the size is not a multiple of patch x merge, lies outside the
            processor's pixel budget, or the preprocessor disagrees with the vision config.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vc = config.vision_config
    ours = (vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
    theirs = (budget.patch_size, budget.temporal_patch_size, budget.merge_size)
    if ours != theirs:
        raise ModelFolderError(
            f"preprocessor_config.json has patch/temporal/merge {theirs}, the vision config {ours}; use the model's own preprocessor file"
        )
    f = budget.factor
    if image_size is None:
        h, w = smart_resize(DEFAULT_IMAGE_SIDE, DEFAULT_IMAGE_SIDE, factor=f, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
    else:
        h, w = image_size
        problems = []
        if h % f or w % f or min(h, w) <= 0:
            problems.append(f"sides must be positive multiples of patch {budget.patch_size} x merge {budget.merge_size} = {f}")
        if not budget.min_pixels <= h * w <= budget.max_pixels:
            problems.append(f"{h * w} pixels is outside the processor's budget [{budget.min_pixels}, {budget.max_pixels}]")
        if problems:
            near = smart_resize(h, w, factor=f, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
            raise ModelFolderError(f"--image-size {h}x{w}: " + "; ".join(problems) + f"; the processor would use {near[0]}x{near[1]}")
    section = tuple(int(x) for x in config.text_config.rope_parameters.get("mrope_section", (16, 24, 24)))
    p = budget.patch_size
    return MropeSpec(
        grid_t=1,
        grid_h=h // p,
        grid_w=w // p,
        patch_size=p,
        temporal_patch_size=budget.temporal_patch_size,
        spatial_merge_size=budget.merge_size,
        mrope_section=section,
    )


def preprocess_from_grid(mrope: MropeSpec, budget: PixelBudget) -> ImagePreprocess:
    """Resize (shorter side), centre-crop to the declared grid, normalise with the processor's mean/std.

    For an image of the grid's aspect ratio this is the processor's resize; other images are
    cropped to the grid where the processor would change their grid instead.
    """
    h, w = mrope.grid_h * mrope.patch_size, mrope.grid_w * mrope.patch_size
    return ImagePreprocess(shortest_edge=min(h, w), crop_height=h, crop_width=w, mean=budget.mean, std=budget.std, resample="bicubic")


def patches_from_pixels(pixels: np.ndarray, mrope: MropeSpec) -> np.ndarray:
    """float32 (3, H, W) → (L, 3 * T * p * p) in the Qwen2-VL processor's patch order (block-major over 2x2)."""
    p, m, tp = mrope.patch_size, mrope.spatial_merge_size, mrope.temporal_patch_size
    c = pixels.shape[0]
    x = pixels.reshape(c, mrope.grid_h // m, m, p, mrope.grid_w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))  # (gh/m, gw/m, m, m, C, T, p, p)
    return np.ascontiguousarray(x.reshape(mrope.grid_h * mrope.grid_w, c * tp * p * p), dtype=np.float32)


def hf_vision_inputs(pixels: np.ndarray, mrope: MropeSpec, input_ids: np.ndarray, image_token_id: int) -> dict[str, torch.Tensor]:
    """What HF ``generate`` takes for one image: flat patches, ``image_grid_thw`` and ``mm_token_type_ids``."""
    return {
        "pixel_values": torch.from_numpy(patches_from_pixels(pixels, mrope)),
        "image_grid_thw": torch.tensor([[mrope.grid_t, mrope.grid_h, mrope.grid_w]]),
        "mm_token_type_ids": torch.from_numpy((input_ids == image_token_id).astype(np.int64)[None]),
    }


def _window_layout(visual, grid: torch.Tensor, n_patches: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL: patch order of the attention windows (L,), the additive window mask (L, L), the window index."""
    from transformers.vision_utils import get_vision_window_index

    window_index, cu_window = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)
    unit = visual.spatial_merge_unit
    order = (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)  # merged-token order -> patch order
    window_of = torch.searchsorted(cu_window[1:].long(), torch.arange(n_patches), right=True)  # (L,) window id per position
    same = window_of[:, None] == window_of[None, :]
    mask = torch.where(same, torch.zeros(()), torch.full((), MASK_NEG))
    return order, mask, window_index


class QwenVisionEncoder(nn.Module):
    """pixels (B, 3, H, W) at the declared grid → merged image tokens (B, N, D) and MAS features (B, N, Dv).

    Args:
        model: a ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``.
        mrope: the declared grid (H = grid_h * patch_size, W likewise).
        mas_feature_layer: the MAS probe reads the hidden states after this many blocks,
            averaged over each 2x2 merge block so they align 1:1 with the image tokens.
    """

    def __init__(self, model, mrope: MropeSpec, mas_feature_layer: int):
        super().__init__()
        from transformers.vision_utils import get_vision_position_ids

        visual = model.model.visual
        self.patch_embed, self.blocks, self.merger = visual.patch_embed, visual.blocks, visual.merger
        self.rotate = sys.modules[type(visual).__module__].apply_rotary_pos_emb_vision  # HF's own, per family
        self.mrope, self.mas_feature_layer = mrope, mas_feature_layer
        self.unit = mrope.spatial_merge_size**2
        self.n_patches = mrope.grid_t * mrope.grid_h * mrope.grid_w
        grid = torch.tensor([[mrope.grid_t, mrope.grid_h, mrope.grid_w]])
        with torch.no_grad():
            pos = get_vision_position_ids(grid, visual.spatial_merge_size)  # (L, 2): (h, w) per patch
            cos, sin = visual.rotary_pos_emb(torch.zeros(1), pos)  # (L, d) each
        full = set(getattr(visual, "fullatt_block_indexes", range(len(self.blocks))))
        self.windowed = tuple(i not in full for i in range(len(self.blocks)))
        order = torch.arange(self.n_patches)
        merged_back = torch.arange(mrope.image_tokens)
        mask = torch.zeros(self.n_patches, self.n_patches)
        if any(self.windowed):
            order, mask, window_index = _window_layout(visual, grid, self.n_patches)
            merged_back = torch.argsort(window_index)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("merged_back", merged_back, persistent=False)
        self.register_buffer("window_mask", mask, persistent=False)
        self.register_buffer("cos", cos[order].float(), persistent=False)
        self.register_buffer("sin", sin[order].float(), persistent=False)

    def _attention(self, attn, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # the math of HF's eager VisionAttention over one image per batch row
        b, seq, _ = x.shape
        q, k, v = attn.qkv(x).reshape(b, seq, 3, attn.num_heads, -1).permute(2, 0, 1, 3, 4).unbind(0)  # 3 x (B, L, H, d)
        q, k = self.rotate(q, k, self.cos, self.sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)
        weights = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
        if mask is not None:
            weights = weights + mask
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, seq, -1)  # (B, L, Dv)
        return attn.proj(out)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, c = self.mrope, pixel_values.shape[1]
        p, m, tp = g.patch_size, g.spatial_merge_size, g.temporal_patch_size
        x = pixel_values.reshape(-1, c, g.grid_h // m, m, p, g.grid_w // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, tp, -1, -1)  # (B, gh/m, gw/m, m, m, C, T, p, p)
        hidden = self.patch_embed(x.reshape(-1, c * tp * p * p)).reshape(-1, self.n_patches, self.patch_embed.embed_dim)
        hidden = hidden[:, self.order]  # (B, L, Dv), in window order for Qwen2.5 (identity for Qwen2)
        mas = hidden
        for i, blk in enumerate(self.blocks):
            hidden = hidden + self._attention(blk.attn, blk.norm1(hidden), self.window_mask if self.windowed[i] else None)
            hidden = hidden + blk.mlp(blk.norm2(hidden))
            if i + 1 == self.mas_feature_layer:
                mas = hidden
        n = self.mrope.image_tokens
        tokens = self.merger(hidden.reshape(-1, hidden.shape[-1])).reshape(-1, n, self.merger.mlp[-1].out_features)
        mas = mas.reshape(-1, n, self.unit, mas.shape[-1]).mean(dim=2)  # (B, L, Dv) -> (B, N, Dv)
        return tokens[:, self.merged_back], mas[:, self.merged_back]


def check_vision_against_hf(encoder: QwenVisionEncoder, model, pixels: np.ndarray) -> float:
    """Largest |ours - HF| over one image's tokens per unit of scale, |diff| / max(1, max |HF|), as the segment checks.

    HF runs ``get_image_features`` on the processor's flat patches with ``image_grid_thw``.
    """
    g = encoder.mrope
    with torch.no_grad():
        ours = encoder(torch.from_numpy(pixels[None]))[0][0]
        out = model.model.get_image_features(
            torch.from_numpy(patches_from_pixels(pixels, g)), torch.tensor([[g.grid_t, g.grid_h, g.grid_w]]), return_dict=True
        )
        theirs = torch.cat(list(out.pooler_output), dim=0)
    return float((ours - theirs).abs().max() / max(1.0, float(theirs.abs().max())))
