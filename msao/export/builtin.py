"""The built-in model pair trained here on easy-VQA: their tokenizer, architectures and names.

Both are plain Hugging Face ``LlavaForConditionalGeneration`` models (CLIP vision tower,
Llama decoder with grouped-query attention) so that every code path exercised by them is the
path a real LLaVA checkpoint takes. Their trained weights live in ``checkpoints/<name>/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ANSWERS",
    "BUILTIN_MODELS",
    "BuiltinSpec",
    "CHECKPOINT_ROOT",
    "PROMPT_TEMPLATE",
    "tokenizer_for_easy_vqa",
    "tokenizer_for_scenes",
    "builtin_checkpoint_dir",
]

CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"

# LLaVA-1.5's conversation format, so prompts look like a real LLaVA's.
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)

ANSWERS = (
    "circle", "rectangle", "triangle",
    "black", "blue", "brown", "gray", "green", "red", "teal", "yellow",
    "yes", "no",
)  # fmt: skip
QUESTION_WORDS = (
    "a", "color", "contain", "does", "image", "in", "is", "not", "of", "present", "shape",
    "the", "there", "what",
)  # fmt: skip
TEMPLATE_WORDS = ("user", "assistant", ":", "?")
# The scenes workload's question templates (msao/datasets/scenes.py); its answers come from
# scenes.ANSWER_WORDS. Fixed here so a scenes model's ids never move.
SCENES_QUESTION_WORDS = (
    "a", "above", "an", "are", "below", "circles", "color", "crosses", "describe", "diamonds", "how", "in", "is", "many",
    "object", "objects", "of", "shape", "squares", "stars", "the", "there", "triangles", "what", "where",
)  # fmt: skip


@dataclass(frozen=True)
class BuiltinSpec:
    """Architecture of one built-in model; sizes chosen for a 2-core CPU trainer.

    Attributes:
        name: bundle and checkpoint name.
        vision_hidden / vision_layers / vision_heads: CLIP vision tower width, depth, heads.
        text_hidden / text_layers / text_heads / text_kv_heads: Llama decoder; kv < heads is GQA.
        exit_layers: decoder layers after which an early-exit head is trained.
        split_points: decoder layer boundaries exported as chunk edges (edge/cloud split candidates).
        mas_feature_layer: vision layer whose output the MAS probe reads (early, cheap, spatial).
        image_size / patch_size: input side and patch side in px (their ratio squared: image tokens).
        dataset: the workload it is trained on, which also picks its tokenizer.
    """

    name: str
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    exit_layers: tuple[int, ...]
    split_points: tuple[int, ...]
    mas_feature_layer: int = 1
    image_size: int = 64
    patch_size: int = 8
    dataset: str = "easy-vqa"  # what it is trained on (msao.datasets.vqa.DATASETS)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"{self.name}: image_size {self.image_size} not a multiple of patch {self.patch_size}")
        for k in (*self.exit_layers, *self.split_points):
            if not 0 < k < self.text_layers:
                raise ValueError(f"{self.name}: layer {k} outside 1..{self.text_layers - 1}")
        if self.text_heads % self.text_kv_heads:
            raise ValueError(f"{self.name}: {self.text_heads} heads not divisible by {self.text_kv_heads} kv heads")


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    spec.name: spec
    for spec in (
        BuiltinSpec(
            name="msao-tiny-edge",
            vision_hidden=32, vision_layers=2, vision_heads=2,
            text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1,
            exit_layers=(1,), split_points=(1,),
        ),
        BuiltinSpec(
            name="msao-tiny-cloud",
            vision_hidden=128, vision_layers=4, vision_heads=4,
            text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2,
            exit_layers=(1, 2), split_points=(1, 2, 3),
        ),
        # the scenes pair (docs/scenes.md): 192 px at patch 16 = 144 image tokens, multi-word answers
        BuiltinSpec(
            name="msao-scenes-edge",
            vision_hidden=32, vision_layers=2, vision_heads=2,
            text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1,
            exit_layers=(1,), split_points=(1,), image_size=192, patch_size=16, dataset="scenes",
        ),
        BuiltinSpec(
            name="msao-scenes-cloud",
            vision_hidden=128, vision_layers=4, vision_heads=4,
            text_hidden=128, text_layers=4, text_heads=4, text_kv_heads=2,
            exit_layers=(1, 2), split_points=(1, 2, 3), image_size=192, patch_size=16, dataset="scenes",
        ),
    )
}  # fmt: skip


def builtin_checkpoint_dir(name: str) -> Path:
    """Folder holding the trained HF checkpoint of built-in model ``name``."""
    return CHECKPOINT_ROOT / name


def tokenizer_for_easy_vqa():
    """Word-level tokenizer covering easy-VQA, LLaVA-1.5's prompt words and the image token.

    The vocabulary is fixed in code (not read from data) so both built-in models share ids
    forever. Words are lower-cased; ``<s>`` is prepended like a Llama tokenizer does.
    """
    return _word_tokenizer(set(ANSWERS) | set(QUESTION_WORDS))


def tokenizer_for_scenes():
    """Word-level tokenizer covering every scenes question and answer (multi-word answers are several ids)."""
    from msao.datasets.scenes import ANSWER_WORDS

    return _word_tokenizer(set(ANSWER_WORDS) | set(SCENES_QUESTION_WORDS))


def _word_tokenizer(words: set[str]):
    """Special tokens, then ``words`` and the prompt template's words in sorted order: ids fixed by the word list."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = sorted(words | set(TEMPLATE_WORDS))
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return tok
