"""Reading and writing checkpoints in Hugging Face format, plus msao's exit heads.

Reads LLaVA, Qwen2-VL and Qwen2.5-VL folders (``ARCHITECTURES``); writes LLaVA (the built-ins).
A checkpoint folder is what ``save_pretrained`` writes (config.json, model.safetensors),
a ``tokenizer.json`` and a ``preprocessor_config.json``; msao adds ``exit_heads.json`` +
``exit_heads.safetensors`` when early-exit heads were trained. Nothing is ever unpickled:
weights load only from safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from msao.engines.images import ImagePreprocess
from msao.engines.manifest import MropeSpec
from msao.errors import ModelFolderError
from msao.export.segments import ExitHead

__all__ = [
    "ARCHITECTURES",
    "ExitHeads",
    "LlavaCheckpoint",
    "load_checkpoint",
    "llava_from_spec",
    "save_checkpoint",
]

EXIT_HEADS_JSON = "exit_heads.json"
EXIT_HEADS_WEIGHTS = "exit_heads.safetensors"
# model family (config.json model_type) -> the transformers class msao exports it with
ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


class ExitHeads(nn.Module):
    """Early-exit heads keyed by the decoder layer they follow."""

    def __init__(self, layers: tuple[int, ...], hidden_size: int, vocab_size: int, eps: float = 1e-6):
        super().__init__()
        self.layers = tuple(sorted(layers))
        self.heads = nn.ModuleDict({str(k): ExitHead(hidden_size, vocab_size, eps) for k in self.layers})
        self.hidden_size, self.vocab_size, self.eps = hidden_size, vocab_size, eps

    def __getitem__(self, layer: int) -> ExitHead:
        return self.heads[str(layer)]

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        meta = {"layers": list(self.layers), "hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "eps": self.eps}
        (folder / EXIT_HEADS_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / EXIT_HEADS_WEIGHTS))

    @classmethod
    def load(cls, folder: Path) -> ExitHeads | None:
        from safetensors.torch import load_file

        meta_path = folder / EXIT_HEADS_JSON
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        heads = cls(tuple(meta["layers"]), meta["hidden_size"], meta["vocab_size"], meta["eps"])
        heads.load_state_dict(load_file(str(folder / EXIT_HEADS_WEIGHTS)))
        return heads


@dataclass
class LlavaCheckpoint:
    """A loaded checkpoint of any family in ``ARCHITECTURES``: the HF model in eval mode and what travels with it.

    ``family`` is the config's model_type; ``mrope`` is the declared image grid of a Qwen
    family (None for LLaVA), from which ``preprocess`` was derived.
    """

    name: str
    folder: Path
    model: nn.Module
    tokenizer_json: str
    preprocess: ImagePreprocess
    exit_heads: ExitHeads | None
    family: str = "llava"
    mrope: MropeSpec | None = None


def llava_from_spec(spec, vocab_size: int, attn_implementation: str = "sdpa"):
    """A randomly initialised ``LlavaForConditionalGeneration`` for a built-in ``BuiltinSpec``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.text_hidden,
        intermediate_size=3 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=4,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    return LlavaForConditionalGeneration(config)


def _preprocess_from_folder(folder: Path) -> ImagePreprocess:
    path = folder / "preprocessor_config.json"
    if not path.exists():
        raise ModelFolderError(f"{folder}: no preprocessor_config.json; copy the one from the model's Hugging Face repo")
    d = json.loads(path.read_text())
    size = d.get("size", {})
    crop = d.get("crop_size", size)
    shortest = size.get("shortest_edge") or size.get("height")
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if shortest is None or "height" not in crop:
        raise ModelFolderError(f"{path}: cannot read image size from size={size} crop_size={crop}")
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(d.get("resample", 3), "bicubic")
    return ImagePreprocess(
        shortest_edge=int(shortest),
        crop_height=int(crop["height"]),
        crop_width=int(crop["width"]),
        mean=tuple(d.get("image_mean", ImagePreprocess.__dataclass_fields__["mean"].default)),
        std=tuple(d.get("image_std", ImagePreprocess.__dataclass_fields__["std"].default)),
        resample=resample,
    )


def save_checkpoint(folder: Path, model, tokenizer, preprocess: ImagePreprocess, exit_heads: ExitHeads | None) -> None:
    """Write a checkpoint folder that ``load_checkpoint`` and HF ``from_pretrained`` both read."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    pre = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": preprocess.shortest_edge},
        "crop_size": {"height": preprocess.crop_height, "width": preprocess.crop_width},
        "image_mean": list(preprocess.mean),
        "image_std": list(preprocess.std),
        "resample": {"nearest": 0, "bilinear": 2, "bicubic": 3}[preprocess.resample],
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    if exit_heads is not None:
        exit_heads.save(folder)


def load_checkpoint(folder: Path, attn_implementation: str = "eager", image_size: tuple[int, int] | None = None) -> LlavaCheckpoint:
    """Load a local LLaVA, Qwen2-VL or Qwen2.5-VL checkpoint folder; nothing is downloaded.

    Args:
        image_size: (H, W) pixels of the declared image grid of a Qwen family (``qwen.declare_grid``);
            None = the processor's size for a 448x448 image. LLaVA's size is its processor's crop.

    Raises:
        ModelFolderError: the folder is missing, is not one of ``ARCHITECTURES``, lacks
            tokenizer.json / preprocessor_config.json / safetensors weights, or the image size
            does not fit a Qwen model's grid.
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir() or not cfg_path.exists():
        raise ModelFolderError(
            f"{folder}: not a model folder (no config.json); pass a local Hugging Face LLaVA checkpoint directory or a built-in name"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFolderError(f"{cfg_path}: not valid JSON ({exc})") from exc
    archs = cfg.get("architectures") or []
    family = cfg.get("model_type")
    if family not in ARCHITECTURES or (archs and ARCHITECTURES[family] not in archs):
        raise ModelFolderError(
            f"{folder}: model_type={family!r}, architectures={archs}; msao exports {', '.join(ARCHITECTURES.values())} checkpoints only"
        )
    if not list(folder.glob("*.safetensors")):
        raise ModelFolderError(f"{folder}: no .safetensors weights; msao never loads pickled .bin files, convert them first")
    tok_path = folder / "tokenizer.json"
    if not tok_path.exists():
        raise ModelFolderError(f"{folder}: no tokenizer.json (the fast-tokenizer file); save the tokenizer with a recent transformers")
    import transformers

    model_class = getattr(transformers, ARCHITECTURES[family])
    model = model_class.from_pretrained(folder, attn_implementation=attn_implementation, use_safetensors=True)
    model.eval()
    mrope = None
    if family == "llava":
        preprocess = _preprocess_from_folder(folder)
    else:
        from msao.export.qwen import declare_grid, pixel_budget_from_folder, preprocess_from_grid

        budget = pixel_budget_from_folder(folder)
        mrope = declare_grid(budget, model.config, image_size)
        preprocess = preprocess_from_grid(mrope, budget)
    return LlavaCheckpoint(
        name=folder.name,
        folder=folder,
        model=model,
        tokenizer_json=tok_path.read_text(),
        preprocess=preprocess,
        exit_heads=ExitHeads.load(folder),
        family=family,
        mrope=mrope,
    )
