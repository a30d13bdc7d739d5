"""The segments of a LLaVA-style model as small torch modules: what gets exported and trained.

Each module wraps the Hugging Face model's own submodules, so the math is exactly the
checkpoint's; what the wrappers add is an explicit, export-friendly interface: named tensors,
an explicit attention mask and KV cache as plain tensors in and out. Training uses the same
modules, so the graph we ship is the graph we trained.

    pixel_values ─► vision_encoder ─► image_tokens (B, N, D)   mas_features (B, N, Dv)
    input_ids ────► text_embed ─────► embeddings (B, T, D)
    hidden ───────► decoder[a:b] ───► hidden (B, T, D) + the new tokens' KV per layer
    hidden ───────► lm_head / exit_head@k ─► logits (B, T, V)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface

__all__ = [
    "DecoderChunk",
    "ExitHead",
    "LmHead",
    "MASK_NEG",
    "SPLIT_ATTENTION",
    "TextEmbed",
    "VisionEncoder",
    "causal_mask_from_padding",
    "image_token_layout",
    "split_past_attention",
]

# Additive mask value: representable in fp16 (TensorRT FP16 engines) yet exp() underflows to 0.
MASK_NEG = -30000.0


def image_token_layout(cfg) -> tuple[int | list[int], str]:
    """(vision_feature_layer, select_strategy) of a ``LlavaConfig``, validated."""
    layer = cfg.vision_feature_layer
    strategy = cfg.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")
    return layer, strategy


class VisionEncoder(nn.Module):
    """pixels → projected image tokens, plus early-layer features for the MAS probe.

    Honours ``vision_feature_layer`` (an int or a list, concatenated as LLaVA does) and
    ``vision_feature_select_strategy`` ("default" drops the CLS token, "full" keeps it). The MAS
    features follow the same token selection so they align 1:1 with the image tokens.
    """

    def __init__(self, model, mas_feature_layer: int):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layout = image_token_layout(model.config)
        self.mas_feature_layer = mas_feature_layer

    def select(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision features LLaVA feeds its projector (B, N, Dv * layers), and the MAS features (B, N, Dv)."""
        # Same selection as HF LlavaModel.get_image_features, without its per-image list
        # (a Python list of a traced batch would freeze the batch size into the graph).
        layer, strategy = self.layout
        hs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        picked = [hs[layer]] if isinstance(layer, int) else [hs[i] for i in layer]
        mas = hs[self.mas_feature_layer]
        if strategy == "default":
            picked = [h[:, 1:] for h in picked]
            mas = mas[:, 1:]
        return torch.cat(picked, dim=-1), mas

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, mas = self.select(pixel_values)
        return self.projector(features), mas  # (B, N, D_text), (B, N, D_vision)


class TextEmbed(nn.Module):
    """token ids (B, T) → embeddings (B, T, D)."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def causal_mask_from_padding(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, P+T) from a 0/1 key mask (B, P+T) for the last T queries.

    Query i sits at key index P+i; it may see key j when j <= P+i and the key is not padding.
    Always explicit: HF's implicit ``is_causal`` is wrong for T > 1 with a past.
    """
    total = attention_mask.shape[1]
    past = total - query_len
    q_idx = torch.arange(query_len, device=attention_mask.device).unsqueeze(1) + past  # (T, 1)
    k_idx = torch.arange(total, device=attention_mask.device).unsqueeze(0)  # (1, P+T)
    allowed = (k_idx <= q_idx).unsqueeze(0) & (attention_mask.unsqueeze(1) > 0)  # (B, T, P+T)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), MASK_NEG, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg).unsqueeze(1)


SPLIT_ATTENTION = "msao_split_past"  # the attention function decoder chunks run (registered below)


def split_past_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, msao_past=None, **kwargs):
    """Attention over a given past and this call's new keys, without concatenating them.

    Why: a graph that returns the whole present cache copies every past key and value on every
    decode step, and its caller allocates a new cache per step. Here the scores of the past
    (B, Hkv, g*T, P) and of the new keys (B, Hkv, g*T, T) are joined (small: no head dim), one
    softmax runs over both, and the two weighted sums are added; the past is only read, so the
    runtime may hand in a preallocated buffer whose unused slots the mask hides. Query heads
    are grouped per KV head (g = H / Hkv), so grouped-query attention repeats no past either.
    """
    past_key, past_value = msao_past[module.layer_idx]
    bsz, heads, t, d = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(bsz, kv_heads, (heads // kv_heads) * t, d)  # HF repeat_kv order: head h reads kv head h // g
    scores = torch.cat([q @ past_key.transpose(-1, -2), q @ key.transpose(-1, -2)], dim=-1) * scaling
    scores = scores.reshape(bsz, heads, t, -1)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype).reshape(bsz, kv_heads, (heads // kv_heads) * t, -1)
    p = past_key.shape[2]
    out = probs[..., :p] @ past_value + probs[..., p:] @ value  # (B, Hkv, g*T, d)
    return out.reshape(bsz, heads, t, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(SPLIT_ATTENTION, split_past_attention)


class _ChunkCache:
    """Duck-typed HF cache for one forward pass: keeps the given past apart from the new KV.

    HF attention calls ``cache.update(k, v, layer_idx)``; we record the new (rotated) key and
    value as the layer's output and hand them back unchanged: ``split_past_attention`` reads
    the past from ``past`` itself. Plain tensors in and out keep export simple.
    """

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.new[layer_idx] = (key, value)
        return key, value


class DecoderChunk(nn.Module):
    """Decoder layers [start:end) over explicit tensors; prefill and decode share the graph.

    Inputs: hidden (B, T, D), position_ids (B, T), attention_mask (B, P+T) of 0/1, and for
    each layer past_key / past_value (B, Hkv, P, d). Outputs hidden (B, T, D) and the new
    tokens' key/value (B, Hkv, T, d) per layer: the caller appends them to its cache, which
    may be a preallocated buffer of P slots with the unused ones masked out (``KvCache``).
    Position ids are explicit so that pruned image tokens keep their original positions.
    """

    def __init__(self, model, start: int, end: int):
        super().__init__()
        lm = model.model.language_model
        self.layers = nn.ModuleList(lm.layers[start:end])
        self.rotary_emb = lm.rotary_emb
        self.config = lm.config
        self.start, self.end = start, end

    def forward(self, hidden, position_ids, attention_mask, *past_kv):
        n = self.end - self.start
        if len(past_kv) != 2 * n:
            raise ValueError(f"decoder[{self.start}:{self.end}] needs {2 * n} past tensors, got {len(past_kv)}")
        past = {self.start + i: (past_kv[2 * i], past_kv[2 * i + 1]) for i in range(n)}
        cache = _ChunkCache(past)
        mask = causal_mask_from_padding(attention_mask, hidden.shape[1], hidden.dtype)
        cos_sin = self.rotary_emb(hidden, position_ids)
        # Training feeds an empty past: the configured kernel (sdpa) is the same math, faster.
        split = past_kv[0].shape[2] > 0 or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
        configured = self.config._attn_implementation
        if split:
            self.config._attn_implementation = SPLIT_ATTENTION
        try:
            for layer in self.layers:
                out = layer(
                    hidden, attention_mask=mask, position_ids=position_ids, cache=cache, position_embeddings=cos_sin, msao_past=past
                )
                hidden = out[0] if isinstance(out, tuple) else out
        finally:
            self.config._attn_implementation = configured
        news = []
        for i in range(n):
            news.extend(cache.new[self.start + i])
        return (hidden, *news)


class LmHead(nn.Module):
    """Final norm + LM head: hidden (B, T, D) → logits (B, T, V)."""

    def __init__(self, model):
        super().__init__()
        self.norm = model.model.language_model.norm
        self.head = model.lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


class ExitHead(nn.Module):
    """Early-exit head after decoder layer k: RMS norm + linear → logits (B, T, V)."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float = 1e-6):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.proj = nn.Linear(hidden_size, vocab_size, bias=False)
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        var = hidden.pow(2).mean(-1, keepdim=True)
        return self.proj(hidden * torch.rsqrt(var + self.eps) * self.norm_weight)
