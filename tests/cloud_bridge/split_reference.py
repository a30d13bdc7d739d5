"""Edge half of a split plan, written out for the tests: local decoder[0:k] + a remote runner for the rest.

The loop mirrors ``Generator.generate`` step by step, so its tokens can be compared with a
fully local run of the same bundle.
"""

from __future__ import annotations

import numpy as np

from msao.engines.backend import Runner
from msao.engines.generation import Generator, softmax


def prompt_hidden(gen: Generator, png: bytes, question: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Prefill input: hidden (1, T, D) float32, position ids (1, T), and the next position."""
    enc = gen.encode_image(gen.pixels_from_bytes(png))
    prefix, suffix = gen.prompt_ids(question)
    emb = gen.runners["text_embed"].infer({"input_ids": np.concatenate([prefix, suffix])[None]})["embeddings"]
    lp, n = len(prefix), enc.tokens.shape[0]
    hidden = np.concatenate([emb[:, :lp], enc.tokens[None], emb[:, lp:]], axis=1)  # (1, T, D)
    positions = np.arange(hidden.shape[1], dtype=np.int64)[None]
    return hidden, positions, lp + n + len(suffix)


def split_generate(gen: Generator, remote: Runner, k: int, png: bytes, question: str, max_new_tokens: int = 16):
    """Greedy tokens and probabilities with layers [0:k) here and [k:L) + head in ``remote``."""
    local = gen.stack(k)
    local.reset()
    hidden, positions, next_pos = prompt_hidden(gen, png, question)
    mask = np.ones((1, hidden.shape[1]), np.int64)
    h = local.run(hidden, positions, mask)
    probs = softmax(remote.infer({"hidden_states": h, "position_ids": positions, "attention_mask": mask})["logits"][0, -1])
    ids, token_probs, stats = [], [], [remote.last_stats]
    while True:
        tok = int(probs.argmax())
        ids.append(tok)
        token_probs.append(float(probs[tok]))
        if tok in gen.eos or len(ids) >= max_new_tokens:
            return ids, token_probs, stats
        e = gen.runners["text_embed"].infer({"input_ids": np.asarray([[tok]], np.int64)})["embeddings"]
        mask = np.ones((1, local.past_length + 1), np.int64)
        pos = np.asarray([[next_pos]], np.int64)
        h = local.run(e, pos, mask)
        next_pos += 1
        probs = softmax(remote.infer({"hidden_states": h, "position_ids": pos, "attention_mask": mask})["logits"][0, -1])
        stats.append(remote.last_stats)
