"""The question side of MAS: which question tokens are content words, and their embeddings.

Owns the stop-word rule and the one ``text_embed`` call MAS needs; knows nothing of images.
Content words (colours, shapes, objects) are what image tokens can be relevant to; function
words ("what", "is", "the") match everything a little and would flatten the relevance signal.
A stop-word list is crude but costs nothing and works for any word-piece vocabulary after
the piece markers are stripped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from msao.errors import MasInputError

__all__ = ["STOP_WORDS", "VISUAL_WORDS", "MasQuestion", "QuestionEmbedder", "content_token_mask", "mas_question_from_text"]

# English function words and the interrogatives of VQA questions. Lower case, no punctuation.
STOP_WORDS = frozenset(
    """a an the this that these those there here it its is are was were be been being am do does did
    doing have has had having of in on at to from by with for about into onto over under up down out
    and or but if not no nor so than too very can could will would shall should may might must what
    which who whom whose when where why how any some all each every both either neither other such
    own same only just image picture photo photograph shown show see seen i you he she we they me
    him her us them my your our their please tell""".split()
)
# Content words only an image can answer: attributes, geometry, position, counting. A question
# with one of them needs the image whatever the embeddings say (see MAS necessity, docs/mas.md).
VISUAL_WORDS = frozenset(
    """color colour colors colours black blue brown gray grey green red teal yellow white orange purple pink
    shape shapes circle circles rectangle rectangles square squares triangle triangles round size big small
    large tiny left right top bottom middle center centre front behind above below next near far many count
    number visible wearing holding looks look""".split()
)
_PIECE_MARKS = ("\u2581", "\u0120", "##")  # sentencepiece, byte-level BPE, WordPiece


def _clean(piece: str) -> str:
    for mark in _PIECE_MARKS:
        piece = piece.replace(mark, "")
    return piece.strip().lower()


def content_token_mask(pieces: Sequence[str], stop_words: frozenset[str] = STOP_WORDS) -> np.ndarray:
    """bool (M,): True where a token piece is a content word (has a letter or digit, not a stop word)."""
    out = np.zeros(len(pieces), bool)
    for i, piece in enumerate(pieces):
        w = _clean(piece)
        out[i] = any(ch.isalnum() for ch in w) and w not in stop_words and not (w.startswith("<") and w.endswith(">"))
    return out


@dataclass(frozen=True)
class MasQuestion:
    """The question as MAS reads it.

    Attributes:
        embeddings: float32 (M, D) text embeddings of the content words, or of every question
            token when there is no content word (``content_words == 0``).
        content_words: number of content words (0 = none; the question is deictic).
        question_tokens: number of tokens of the question text (template excluded).
        pieces: the token strings, for explanations.
        visual_words: content words in ``VISUAL_WORDS``.
    """

    embeddings: np.ndarray
    content_words: int
    question_tokens: int
    pieces: tuple[str, ...]
    visual_words: int = 0

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] == 0:
            raise MasInputError(f"question embeddings must be (M >= 1, D), got {self.embeddings.shape}")
        if not 0 <= self.visual_words <= self.content_words <= self.question_tokens:
            raise MasInputError(
                f"need 0 <= visual_words <= content_words <= question_tokens, got {self.visual_words}, {self.content_words}, {self.question_tokens}"
            )


class QuestionEmbedder:
    """Turns question text into a ``MasQuestion``, caching embedding rows by token id.

    An embedding row is a pure function of its token id, so after warm-up a question costs a
    tokenizer call and a gather instead of a ``text_embed`` run (measured: docs/mas.md).
    Memory: one row of D floats per distinct token id seen.

    Args:
        generator: a ``Generator`` (its tokenizer and ``text_embed`` runner are used).
    """

    def __init__(self, generator):
        self._tokenizer = generator.tokenizer
        self._embed = generator.runners["text_embed"]
        self._rows: dict[int, np.ndarray] = {}
        self._content: dict[int, bool] = {}  # token id -> is a content word

    def __call__(self, question: str) -> MasQuestion:
        """Tokenize ``question`` alone (no template, no special tokens) and embed its content words.

        Raises:
            MasInputError: the question is empty or has no tokens the tokenizer knows.
        """
        if not question or not question.strip():
            raise MasInputError("empty question: MAS needs at least one word to judge what the image must show")
        enc = self._tokenizer.encode(question, add_special_tokens=False)
        ids = enc.ids
        if not ids:
            raise MasInputError(f"question {question!r} has no tokens for this bundle's tokenizer; rephrase it")
        pieces = tuple(enc.tokens)
        unseen = [k for k, i in enumerate(ids) if i not in self._content]
        if unseen:
            flags = content_token_mask([pieces[k] for k in unseen])
            self._content.update((ids[k], bool(f)) for k, f in zip(unseen, flags))
        mask = [self._content[i] for i in ids]
        use = [i for i, keep in zip(ids, mask) if keep] or list(ids)
        missing = sorted({i for i in use if i not in self._rows})
        if missing:
            rows = self._embed.infer({"input_ids": np.asarray([missing], np.int64)})["embeddings"][0]  # (1, K, D) -> (K, D)
            self._rows.update(zip(missing, rows))
        emb = np.stack([self._rows[i] for i in use])  # (M, D)
        visual = sum(1 for piece, keep in zip(pieces, mask) if keep and _clean(piece) in VISUAL_WORDS)
        return MasQuestion(embeddings=emb, content_words=sum(mask), question_tokens=len(ids), pieces=pieces, visual_words=visual)


def mas_question_from_text(generator, question: str) -> MasQuestion:
    """One-off ``QuestionEmbedder(generator)(question)``; keep a ``QuestionEmbedder`` to reuse rows."""
    return QuestionEmbedder(generator)(question)
