"""Random-init LLaVA checkpoints of real architectures, scaled down, written like HF would.

These stand in for a downloaded LLaVA: same classes, same config fields, same files, so the
exporter's generic path is exercised without any hub access.
"""

from __future__ import annotations

from pathlib import Path

import torch

from msao.engines.images import ImagePreprocess
from msao.export.builtin import tokenizer_for_easy_vqa
from msao.export.checkpoint import save_checkpoint

ARCHS = ("clip-llama-gqa", "siglip-qwen2")


def make_tiny_llava(folder: Path, arch: str, seed: int = 0) -> Path:
    """Write a random-init ``LlavaForConditionalGeneration`` checkpoint to ``folder``.

    clip-llama-gqa: LLaVA-1.5 geometry scaled down (CLIP, feature layer -2, CLS dropped;
    Llama with grouped-query attention). siglip-qwen2: SigLIP (no CLS, "full" strategy,
    two feature layers concatenated), Qwen2 (q/k/v biases, GQA).
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    ids = dict(vocab_size=64, bos_token_id=2, eos_token_id=3, pad_token_id=0, max_position_embeddings=256)
    if arch == "clip-llama-gqa":
        vision = CLIPVisionConfig(
            image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
        )
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, **ids)
        layer, strategy = -2, "default"
    elif arch == "siglip-qwen2":
        vision = SiglipVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        )
        text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, **ids)
        layer, strategy = [-2, -1], "full"
    else:
        raise ValueError(arch)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=layer, vision_feature_select_strategy=strategy
    )
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # spread the logits so greedy choices are not coin flips between runtimes
        model.lm_head.weight.normal_(0.0, 1.0)
    save_checkpoint(folder, model, tokenizer_for_easy_vqa(), ImagePreprocess(shortest_edge=32, crop_height=32, crop_width=32), None)
    return folder
