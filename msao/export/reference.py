"""PyTorch reference runs that the exported segments are checked against.

``TorchPipeline`` runs the same segment modules the exporter exports, on real inputs, and
records the exact feeds and outputs of every segment; ``hf_greedy_answer`` asks Hugging Face's
own ``generate`` (its cache, its masks) for the end-to-end reference answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from msao.engines.manifest import ModelInfo
from msao.engines.positions import prefill_positions

__all__ = ["hf_greedy_answer", "SegmentCall", "TorchPipeline"]


@dataclass
class SegmentCall:
    """Feeds given to one segment and the outputs PyTorch produced for them."""

    segment: str
    feeds: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


class TorchPipeline:
    """Runs segment modules in order for one image + question, recording every call.

    ``info`` with an M-RoPE grid makes the decoder feeds 3-D position ids (3, B, T); without
    it (LLaVA) they are 1-D (B, T).
    """

    def __init__(self, modules: dict, specs: dict, num_layers: int, kv_shape: tuple[int, int], info: ModelInfo | None = None):
        self.modules, self.specs = modules, specs
        self.num_layers, self.kv_shape = num_layers, kv_shape
        self.mrope_info = info if info is not None and info.mrope is not None else None
        self.calls: list[SegmentCall] = []

    def _call(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[name]
        args = tuple(torch.from_numpy(feeds[t.name]) for t in spec.inputs)
        with torch.no_grad():
            out = self.modules[name](*args)
        out = out if isinstance(out, tuple) else (out,)
        result = {t.name: o.numpy() for t, o in zip(spec.outputs, out)}
        self.calls.append(SegmentCall(name, feeds, result))
        return result

    def run(self, pixels: np.ndarray, prefix: np.ndarray, suffix: np.ndarray, decode_steps: int = 2, left_pad: int = 0) -> None:
        """Prefill (batch 2 when ``left_pad`` > 0: a left-padded copy rides along) and decode."""
        img = self._call("vision_encoder", {"pixel_values": pixels[None]})["image_tokens"]
        ids = np.concatenate([prefix, suffix])[None]
        emb = self._call("text_embed", {"input_ids": ids})["embeddings"]
        lp = len(prefix)
        hidden = np.concatenate([emb[:, :lp], img, emb[:, lp:]], axis=1)
        t = hidden.shape[1]
        pos = np.arange(t, dtype=np.int64)[None]
        mask = np.ones((1, t), np.int64)
        if left_pad:  # batch 2: row 0 left-padded (mask 0), row 1 the same length all valid
            hidden = np.concatenate([np.zeros((1, left_pad, hidden.shape[2]), np.float32), hidden], axis=1).repeat(2, axis=0)
            mask = np.ones((2, t + left_pad), np.int64)
            mask[0, :left_pad] = 0
            pos = np.stack([np.r_[np.zeros(left_pad), np.arange(t)], np.arange(t + left_pad)]).astype(np.int64)
        if self.mrope_info is not None:
            pos = self._mrope_positions(len(prefix), img.shape[1], len(suffix), left_pad)
        bsz = hidden.shape[0]
        past: dict[str, np.ndarray] = {}
        for _ in range(decode_steps + 1):
            h = hidden
            for name, spec in self.specs.items():
                if spec.kind != "decoder":
                    continue
                feeds = {"hidden_states": h, "position_ids": pos, "attention_mask": mask}
                for ti in spec.inputs:
                    if ti.name.startswith("past_"):
                        feeds[ti.name] = past.get(ti.name, np.zeros((bsz, self.kv_shape[0], 0, self.kv_shape[1]), np.float32))
                out = self._call(name, feeds)
                for to in spec.outputs:
                    if to.name.startswith("new_"):  # the chunk returns the new tokens' KV; the reference concatenates
                        name = "past_" + to.name[len("new_") :]
                        past[name] = np.concatenate([feeds[name], out[to.name]], axis=2)
                tap = out["hidden_states_out"]
                exit_name = f"exit_head@{spec.layers[1]}"
                if exit_name in self.specs:
                    self._call(exit_name, {"hidden_states": tap[:, -1:]})
                h = tap
            logits = self._call("lm_head", {"hidden_states": h[:, -1:]})["logits"]
            tok = logits[:, -1].argmax(-1)  # (B,)
            hidden = self._call("text_embed", {"input_ids": tok[:, None].astype(np.int64)})["embeddings"]
            pos = pos[..., -1:] + 1
            mask = np.concatenate([mask, np.ones((bsz, 1), np.int64)], axis=1)

    def _mrope_positions(self, prefix_len: int, n: int, suffix_len: int, left_pad: int) -> np.ndarray:
        """(3, B, T) M-RoPE ids; with ``left_pad`` row 0 is left-padded (zeros) and row 1 a longer prefix."""
        info = self.mrope_info
        pos, _ = prefill_positions(info, prefix_len, n, np.arange(n), suffix_len)  # (3, 1, T)
        if not left_pad:
            return pos
        longer, _ = prefill_positions(info, prefix_len + left_pad, n, np.arange(n), suffix_len)
        padded = np.concatenate([np.zeros((3, 1, left_pad), np.int64), pos], axis=2)
        return np.concatenate([padded, longer], axis=1)


def hf_greedy_answer(
    model,
    pixels: np.ndarray,
    input_ids: np.ndarray,
    eos_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    vision_inputs: dict[str, torch.Tensor] | None = None,
) -> list[int]:
    """Greedy token ids from Hugging Face ``generate`` (prompt ids with the image token expanded).

    ``vision_inputs`` replaces LLaVA's ``pixel_values`` (B, 3, H, W) for models that take other
    image inputs (Qwen: flat patches, ``image_grid_thw``, ``mm_token_type_ids``).
    """
    images = {"pixel_values": torch.from_numpy(pixels[None])} if vision_inputs is None else vision_inputs
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(input_ids[None]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.int64),
            **images,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
        )
    return out[0, len(input_ids) :].tolist()
