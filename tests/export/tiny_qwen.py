"""Random-init Qwen2-VL and Qwen2.5-VL checkpoints, scaled down, written the way transformers writes them.

They stand in for a downloaded Qwen2-VL-2B / Qwen2.5-VL-7B folder: the same classes and config
fields, ``save_pretrained`` weights, a ``tokenizer.json`` with Qwen's special tokens and the
image processor's own ``preprocessor_config.json``, so the exporter's Qwen path runs with no
hub access. Patch 4, merge 2: an image side must be a multiple of 8 pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from msao.export.builtin import ANSWERS, QUESTION_WORDS

ARCHS = ("qwen2_vl", "qwen2_5_vl")
QWEN_SPECIALS = (
    "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
_PROMPT_WORDS = ("system", "you", "are", "helpful", "assistant", "user", ".", "?")


def tokenizer_for_qwen_tests():
    """Word-level tokenizer with Qwen's special tokens first (ids 0..7), then easy-VQA's and the chat template's words."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    words = sorted(set(ANSWERS) | set(QUESTION_WORDS) | set(_PROMPT_WORDS))
    vocab = {tok: i for i, tok in enumerate((*QWEN_SPECIALS, *words))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(QWEN_SPECIALS))
    return tok


def make_tiny_qwen(folder: Path, arch: str, seed: int = 0, max_pixels: int = 32 * 32) -> Path:
    """Write a random-init ``Qwen2VLForConditionalGeneration`` (``qwen2_vl``) or ``Qwen2_5_VLForConditionalGeneration``.

    Both: 2 vision blocks of width 32, a 3-layer Qwen2 decoder of width 64 with GQA (4 heads,
    2 KV heads, head_dim 16, mrope_section 2+3+3). Qwen2.5 adds RMSNorm + SwiGLU vision blocks and
    16-pixel attention windows (2x2 merged tokens) in block 0, full attention in block 1.
    The processor's budget is [8*8, ``max_pixels``]: 32x32 by default, i.e. 16 image tokens.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tok = tokenizer_for_qwen_tests()
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIALS}
    text = dict(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    special = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    patch = dict(patch_size=4, temporal_patch_size=2, spatial_merge_size=2, num_heads=2, depth=2)
    if arch == "qwen2_vl":
        vision = dict(embed_dim=32, hidden_size=64, mlp_ratio=2, **patch)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **special))
    elif arch == "qwen2_5_vl":
        vision = dict(hidden_size=32, out_hidden_size=64, intermediate_size=64, window_size=16, fullatt_block_indexes=[1], **patch)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text, **special))
    else:
        raise ValueError(arch)
    model.eval()
    with torch.no_grad():  # spread the logits so greedy choices are not coin flips between runtimes
        model.lm_head.weight.normal_(0.0, 1.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 8 * 8, "longest_edge": max_pixels}, patch_size=4, temporal_patch_size=2, merge_size=2
    )
    processor.save_pretrained(folder)
    return folder
