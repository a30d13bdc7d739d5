"""Token-level speculative decoding: a sequence fed in blocks with rollback, and greedy block verification.

Why blocks: a decoder step over k new tokens costs about what a step over one token costs
(the weights are read once either way), so a large model that checks k drafted tokens in one
forward pass answers up to k + 1 tokens for the price of one step. Why greedy acceptance: the
committed answer is then token-identical to the large model's own greedy answer, so the
speculation changes when tokens arrive, never what they are.

    TokenSequence   prompt | fed tokens ─one DecoderStack─► next-token distribution after every fed token
    VerifySession   the large model's side: holds one request's sequence, checks a block of drafts,
                    answers the accepted prefix and its own next token (the cloud worker keeps one per request)

One block, drafts d1..dk, distributions q0 (after what is already fed) .. qk:

    accepted n = the longest prefix with d_i == argmax q_{i-1}
    committed  = d1..dn, then argmax q_n (the large model's own token: a correction, or a bonus when n = k)

The committed last token is *pending*: the session feeds it at the start of the next block,
together with that block's drafts, so every block is one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from msao.engines.generation import MAX_NEW_TOKENS, DecoderStack, Generator, ImageEncoding, _check_keep, softmax
from msao.engines.manifest import exit_segment_name
from msao.engines.positions import prefill_positions
from msao.errors import FeedError

__all__ = ["BlockVerdict", "TokenSequence", "VerifySession", "accept_greedy", "block_positions"]


def block_positions(info, start: int, length: int) -> np.ndarray:
    """Position ids of ``length`` tokens fed after the prompt from position ``start``: (1, T), or (3, 1, T) for M-RoPE."""
    pos = (start + np.arange(length, dtype=np.int64))[None]
    return pos if info.mrope is None else np.ascontiguousarray(np.broadcast_to(pos, (3, 1, length)))


def accept_greedy(drafts: np.ndarray, probs: np.ndarray) -> int:
    """How many leading drafts the large model would have generated itself.

    ``probs`` (k + 1, V): its distribution before each draft and after the last one.
    """
    if probs.shape[0] != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} distributions, got {probs.shape[0]}")
    picks = probs[:-1].argmax(axis=-1)
    wrong = np.flatnonzero(picks != drafts)
    return int(wrong[0]) if len(wrong) else len(drafts)


class TokenSequence:
    """One prompt and the answer tokens fed after it, in a KV cache of its own: feed blocks, roll back.

    Its ``DecoderStack`` is its own (not the generator's), so a sequence can outlive the call
    that made it (a cloud session across jobs and threads) and two sequences of one generator
    never share a cache. Not thread-safe: one caller at a time (a session's lock).

    Args:
        generator: the model's generator (tokenizer, runners; its own stacks are not used).
        exit_layer: read the exit head after this layer (a shallower draft); None = full depth.
    """

    def __init__(self, generator: Generator, exit_layer: int | None = None):
        self.gen = generator
        self.info = generator.info
        end = self.info.num_layers if exit_layer is None else exit_layer
        self.stack = DecoderStack(generator.stack(end).runners, self.info.num_kv_heads, self.info.head_dim)
        self.head = generator.runners["lm_head" if exit_layer is None else exit_segment_name(exit_layer)]
        self.embed = generator.runners["text_embed"]
        self.prompt_length = 0  # tokens in the cache before the first answer token
        self.answer_start = 0  # position of the first answer token
        self.fed = 0  # answer tokens in the cache

    @property
    def room(self) -> int:
        """Answer tokens that can still be fed before the model's context ends."""
        return max(0, self.info.max_positions - self.answer_start - self.fed)

    def _logits(self, hidden: np.ndarray, last: int) -> np.ndarray:
        return self.head.infer({"hidden_states": np.ascontiguousarray(hidden[:, -last:])})["logits"][0]  # (last, V)

    def start(
        self, image: ImageEncoding, question: str, *, keep: np.ndarray | None = None, tokens: np.ndarray | None = None, capacity: int = 0
    ) -> np.ndarray:
        """Prefill the prompt, then ``tokens`` (answer tokens, e.g. a first block of drafts), in one pass.

        Returns the next-token distributions (1 + T, V): after the prompt, then after each of the
        T tokens fed, where T = len(tokens) unless the model's context ends first (then the
        tokens that do not fit are not fed). ``capacity``: answer tokens to make room for up front.
        """
        tokens = np.zeros(0, np.int64) if tokens is None else np.asarray(tokens, np.int64)
        n = image.tokens.shape[0]
        keep_idx = np.arange(n) if keep is None else _check_keep(keep, n)
        prefix, suffix = self.gen.prompt_ids(question)
        lp = len(prefix)
        self.stack.reset(capacity=lp + len(keep_idx) + len(suffix) + max(capacity, len(tokens)))
        emb = self.embed.infer({"input_ids": np.concatenate([prefix, suffix, tokens])[None]})["embeddings"]
        ls = len(suffix)
        hidden = np.concatenate([emb[:, :lp], image.tokens[keep_idx][None], emb[:, lp:]], axis=1)
        positions, self.answer_start = prefill_positions(self.info, lp, n, keep_idx, ls)
        self.fed = 0
        if len(tokens) > self.room:
            tokens = tokens[: self.room]
            emb = emb[:, : lp + ls + len(tokens)]
        if len(tokens):
            positions = np.concatenate([positions, block_positions(self.info, self.answer_start, len(tokens))], axis=-1)
        self.prompt_length = lp + len(keep_idx) + ls
        h = self.stack.run(hidden, positions, np.ones((1, hidden.shape[1]), np.int64))
        self.fed = len(tokens)
        return softmax(self._logits(h, len(tokens) + 1))

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """Append answer tokens (T,) in one pass; their next-token distributions (T, V)."""
        tokens = np.asarray(tokens, np.int64)
        if tokens.ndim != 1 or not len(tokens):
            raise FeedError(f"feed takes a non-empty 1-D array of token ids, got shape {tokens.shape}")
        if len(tokens) > self.room:
            raise FeedError(f"{len(tokens)} more tokens do not fit the model's context of {self.info.max_positions} positions")
        emb = self.embed.infer({"input_ids": tokens[None]})["embeddings"]
        pos = block_positions(self.info, self.answer_start + self.fed, len(tokens))
        h = self.stack.run(emb, pos, np.ones((1, self.stack.past_length + len(tokens)), np.int64))
        self.fed += len(tokens)
        return softmax(self._logits(h, len(tokens)))

    def rollback(self, fed: int) -> None:
        """Keep only the first ``fed`` answer tokens in the cache (drop rejected drafts)."""
        if not 0 <= fed <= self.fed:
            raise ValueError(f"cannot roll back {self.fed} fed answer tokens to {fed}")
        self.stack.truncate(self.prompt_length + fed)
        self.fed = fed


@dataclass(frozen=True)
class BlockVerdict:
    """The large model's answer to one block of drafts.

    Attributes:
        token_ids: tokens committed by this block: the accepted drafts, then (unless the answer
            ended inside them) the large model's own next token.
        token_probs: the large model's probability of each committed token.
        accepted: how many of the block's drafts were accepted.
        committed: answer tokens committed so far, this block's included.
        decoded: of ``token_ids``, how many the large model decoded ahead after its own next
            token (``verify(decode_ahead=...)``): its greedy continuation, committed too.
        finish_reason: "" (the answer goes on), ``stop`` (the end token) or ``length`` (budget or context).
    """

    token_ids: tuple[int, ...]
    token_probs: tuple[float, ...]
    accepted: int
    committed: int
    finish_reason: str = ""
    decoded: int = 0


class VerifySession:
    """The large model's side of one request's speculation: greedy, so the answer is its own greedy answer.

    Args:
        generator: the large model's generator. image / question / keep: the request's prompt.
        max_new_tokens: the answer's budget, the end token included.
    """

    def __init__(self, generator: Generator, image: ImageEncoding, question: str, *, keep: np.ndarray | None, max_new_tokens: int):
        if isinstance(max_new_tokens, bool) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise FeedError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {max_new_tokens!r}")
        self.seq = TokenSequence(generator)
        self.image, self.question, self.keep = image, question, keep
        self.budget = max_new_tokens
        self.eos = generator.eos
        self.committed: list[int] = []
        self.pending: int | None = None  # committed, not yet in the cache
        self.finish_reason = ""
        self.forward_passes = 0

    def verify(self, drafts: np.ndarray, decode_ahead: int = 0) -> BlockVerdict:
        """Check a block of drafts (k,), k >= 0, continuing the committed answer; one forward pass.

        ``decode_ahead``: then decode up to that many more tokens of the large model's own greedy
        answer (one pass each), committed with the block's. Why: where a round trip costs more
        than several of the large model's decode steps (a cloud GPU behind lte), the edge's next
        block would buy fewer tokens per millisecond than the cloud decoding on does; the answer
        stays the large model's greedy answer either way.
        """
        if isinstance(decode_ahead, bool) or not isinstance(decode_ahead, int | np.integer) or not 0 <= decode_ahead <= MAX_NEW_TOKENS:
            raise FeedError(f"decode_ahead must be an int in 0..{MAX_NEW_TOKENS}, got {decode_ahead!r}")
        if self.finish_reason:
            raise FeedError(f"this answer already ended ({self.finish_reason}); a finished session takes no more blocks")
        drafts = np.asarray(drafts)
        if drafts.ndim != 1 or drafts.dtype.kind not in "iu":
            raise FeedError(f"drafts must be a 1-D integer array of token ids, got {drafts.dtype} {drafts.shape}")
        vocab = self.seq.info.vocab_size
        if len(drafts) and (drafts.min() < 0 or drafts.max() >= vocab):
            raise FeedError(f"draft token ids must lie in [0, {vocab})")
        left = self.budget - len(self.committed)  # the large model's own token needs a place in the budget too
        if self.pending is None:
            drafts = drafts[: max(0, left - 1)].astype(np.int64)
            probs = self.seq.start(self.image, self.question, keep=self.keep, tokens=drafts, capacity=self.budget)
            drafts = drafts[: probs.shape[0] - 1]  # those the context held
        else:
            drafts = drafts[: max(0, min(left - 1, self.seq.room - 1))].astype(np.int64)  # the pending token is fed first
            probs = self.seq.feed(np.concatenate([[self.pending], drafts]).astype(np.int64))
        self.forward_passes += 1
        n = accept_greedy(drafts, probs)
        ids = [int(t) for t in drafts[:n]]
        p = [float(probs[i, t]) for i, t in enumerate(ids)]
        for i, t in enumerate(ids):  # an accepted end token ends the answer there
            if t in self.eos:
                ids, p, n = ids[: i + 1], p[: i + 1], i + 1
                break
        self.seq.rollback(self.seq.fed - (len(drafts) - n))
        if not (ids and ids[-1] in self.eos):
            own = int(probs[n].argmax())
            ids.append(own)
            p.append(float(probs[n, own]))
        self.committed += ids
        self.pending = ids[-1]
        self._check_end()
        decoded = 0
        while decoded < decode_ahead and not self.finish_reason:
            probs = self.seq.feed(np.asarray([self.pending], np.int64))
            self.forward_passes += 1
            own = int(probs[-1].argmax())
            ids.append(own)
            p.append(float(probs[-1, own]))
            self.committed.append(own)
            self.pending = own
            decoded += 1
            self._check_end()
        return BlockVerdict(tuple(ids), tuple(p), n, len(self.committed), self.finish_reason, decoded)

    def _check_end(self) -> None:
        if self.committed[-1] in self.eos:
            self.finish_reason = "stop"
        elif len(self.committed) >= self.budget or self.seq.room == 0:  # where generate() stops too
            self.finish_reason = "length"
