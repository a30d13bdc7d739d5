"""Random-init checkpoints at the real widths of LLaVA-1.5-7B and Qwen2-VL-2B, depth reduced, saved as transformers saves them.

Why: nothing else in msao runs at a real model's widths (a 4096-wide decoder, 576 image tokens,
a 151,936-token vocabulary), so segment sizes, external data, export time and memory, and
per-token costs at that scale are only known from these. Widths, heads, vocabulary and image
geometry are the published configs'; only the number of layers is cut, to what this 24 GiB
machine exports. Weights are random (nothing is downloaded): the numbers are costs, not quality.

The tokenizer is word-level with the vocabulary padded to the model's size (``w<i>`` fillers
after the special tokens and the words of easy-VQA and the prompt templates), so the export's
easy-VQA checks tokenize, and every id the LM head can emit decodes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from msao.export.builtin import ANSWERS, IMAGE_TOKEN, QUESTION_WORDS, SPECIAL_TOKENS, TEMPLATE_WORDS

__all__ = [
    "LLAVA_7B_VOCAB",
    "QWEN2_VL_2B_TEXT",
    "QWEN2_VL_2B_VOCAB",
    "make_llava_15_7b_widths",
    "make_qwen2_vl_2b_widths",
    "padded_tokenizer",
]

LLAVA_7B_VOCAB = 32064  # llava-hf/llava-1.5-7b-hf: Llama's 32,000 + <image> + padding to a multiple of 64
QWEN2_VL_2B_VOCAB = 151936
QWEN_SPECIALS = (
    "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
_QWEN_TEMPLATE_WORDS = ("system", "you", "are", "a", "helpful", "assistant", ".", "user", "?")
# Qwen2-VL-2B-Instruct's text decoder (also Qwen2-1.5B's widths): what the onnxruntime-genai comparison builds too.
QWEN2_VL_2B_TEXT = dict(
    hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2, vocab_size=QWEN2_VL_2B_VOCAB,
    max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
)  # fmt: skip
QWEN2_VL_2B_ROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}


def padded_tokenizer(specials: tuple[str, ...], words: set[str], size: int, bos: str | None):
    """Word-level tokenizer: ``specials`` (ids 0..), sorted ``words``, then ``w<i>`` fillers up to ``size`` ids."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {tok: i for i, tok in enumerate((*specials, *sorted(words)))}
    for i in range(len(vocab), size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    return tok


def _spread_logits(lm_head: torch.nn.Linear) -> None:
    """Random logits far apart, so greedy tokens are not coin flips between runtimes (fp32 sums differ in order)."""
    with torch.no_grad():
        lm_head.weight.normal_(0.0, 1.0)


def make_llava_15_7b_widths(folder: Path, text_layers: int = 4, vision_layers: int = 2, seed: int = 0) -> Path:
    """LLaVA-1.5-7B's widths: CLIP ViT-L/14 at 336 px (1024 wide, 16 heads; 576 image tokens from layer -2,
    CLS dropped), a 2-layer GELU projector, a Llama decoder 4096 wide (11,008 MLP, 32 heads, no GQA)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from msao.engines.images import ImagePreprocess
    from msao.export.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    tok = padded_tokenizer(SPECIAL_TOKENS, set(ANSWERS) | set(QUESTION_WORDS) | set(TEMPLATE_WORDS), LLAVA_7B_VOCAB, "<s>")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vision = CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
        num_attention_heads=16, projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=LLAVA_7B_VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=ids[IMAGE_TOKEN], vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config).eval()
    _spread_logits(model.lm_head)
    save_checkpoint(folder, model, tok, ImagePreprocess(shortest_edge=336, crop_height=336, crop_width=336), None)
    return folder


def make_qwen2_vl_2b_widths(folder: Path, text_layers: int = 4, vision_depth: int = 2, seed: int = 0) -> Path:
    """Qwen2-VL-2B's widths: its vision tower (1280 wide, 16 heads, MLP ratio 4, patch 14, temporal patch 2,
    2x2 merger into 1536) and its Qwen2 decoder (1536 wide, 8,960 MLP, 12 heads, 2 KV heads, M-RoPE 16+24+24,
    tied embeddings in the original). The processor's budget is Qwen2-VL's own (56*56 to 28*28*1280 pixels).

    The embeddings are untied here, so the LM head's logits can be spread without touching the
    input embeddings (see ``_spread_logits``); an exported bundle holds a separate LM head either way."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tok = padded_tokenizer(QWEN_SPECIALS, set(ANSWERS) | set(QUESTION_WORDS) | set(_QWEN_TEMPLATE_WORDS), QWEN2_VL_2B_VOCAB, None)
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIALS}
    text = dict(
        **QWEN2_VL_2B_TEXT, num_hidden_layers=text_layers, rope_parameters=QWEN2_VL_2B_ROPE,
        bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    vision = dict(
        depth=vision_depth, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2,
    )  # fmt: skip
    special = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    config = Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **special)
    model = Qwen2VLForConditionalGeneration(config).eval()
    _spread_logits(model.lm_head)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    processor.save_pretrained(folder)
    return folder
