"""Keep policies: who picks the image tokens that enter prefill, behind one small interface.

``mas`` is the product; the others exist so that its value can be measured fairly (same
budget rule, same floor, same interface): ``mas-blind`` is MAS without the question (its
ablation), ``saliency`` the classic question-blind top-k of the saliency term alone, and
``random`` a seeded uniform subset (what the decoder was trained on). Knows nothing of
bundles or scheduling; policies are deterministic for a given (seed, request_id).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from msao.engines.mas import KeepSet, MasOptions, MasResult, analyse_mas, keep_count, mas_scores_from_tensors, score_units
from msao.engines.mas_text import MasQuestion
from msao.errors import ConfigError, MasInputError

__all__ = ["KEEP_POLICIES", "KeepDecision", "KeepPolicy", "keep_policy_from_name"]


@dataclass(frozen=True)
class KeepDecision:
    """A policy's answer: the keep-set, and the MAS analysis where the policy ran one."""

    keep: KeepSet
    mas: MasResult | None = None


class KeepPolicy(ABC):
    """Picks a keep-set for one image and question.

    Attributes:
        name: the ``--keep-policy`` value.
        needs_question: False lets callers skip embedding the question (cheaper).
    """

    name: ClassVar[str]
    needs_question: ClassVar[bool] = False

    def __init__(self, options: MasOptions = MasOptions(), seed: int = 0):
        self.options = options
        self.seed = seed

    def decide(
        self, tokens: np.ndarray, mas_features: np.ndarray, question: MasQuestion | None = None, *, request_id: int = 0
    ) -> KeepDecision:
        """Keep-set for image tokens (N, D) with early features (N, Dv) and the question.

        Raises:
            MasInputError: the inputs are inconsistent, or the policy needs a question and got none.
        """
        if self.needs_question and question is None:
            raise MasInputError(f"keep policy {self.name!r} needs the question; pass mas_question_from_text(generator, text)")
        return self._decide(tokens, mas_features, question, request_id)

    @abstractmethod
    def _decide(self, tokens: np.ndarray, mas_features: np.ndarray, question: MasQuestion | None, request_id: int) -> KeepDecision: ...


class MasPolicy(KeepPolicy):
    """MAS as defined in ``msao.engines.mas`` (question-aware, stratified keep order)."""

    name = "mas"
    needs_question = True

    def _decide(self, tokens, mas_features, question, request_id):
        res = analyse_mas(
            mas_features,
            tokens,
            question.embeddings,
            options=self.options,
            content_words=question.content_words,
            question_tokens=question.question_tokens,
            visual_words=question.visual_words,
        )
        return KeepDecision(res.keep, res)


class MasBlindPolicy(MasPolicy):
    """MAS with relevance weight 0: the same strata and budget, no question (the ablation)."""

    name = "mas-blind"
    needs_question = False

    def __init__(self, options: MasOptions = MasOptions(), seed: int = 0):
        super().__init__(dataclasses.replace(options, relevance_weight=0.0), seed)

    def _decide(self, tokens, mas_features, question, request_id):
        if question is None:  # relevance is weighted 0: any embedding of the right width serves
            question = MasQuestion(np.ones((1, tokens.shape[1]), np.float32), 0, 1, ("?",))  # deictic: necessity 1
        return super()._decide(tokens, mas_features, question, request_id)


class SaliencyPolicy(KeepPolicy):
    """Top-k of MAS's saliency term alone (question-blind, no context stratum); ties by index."""

    name = "saliency"

    def _decide(self, tokens, mas_features, question, request_id):
        dummy = np.ones((1, tokens.shape[1]), np.float32)
        scores = mas_scores_from_tensors(mas_features, tokens, dummy)
        s = scores.saliency / scores.saliency_max if scores.saliency_max > 0 else np.zeros_like(scores.saliency)
        units = score_units(s)
        order = np.lexsort((np.arange(units.size), -units))
        k = keep_count(scores, dataclasses.replace(self.options, rule="topk"))
        return KeepDecision(KeepSet(np.sort(order[:k]).astype(np.int64), units.size, self.name))


class RandomPolicy(KeepPolicy):
    """A uniform random subset, seeded by (seed, request_id) so runs repeat exactly."""

    name = "random"

    def _decide(self, tokens, mas_features, question, request_id):
        n = tokens.shape[0]
        if n == 0:
            raise MasInputError("image_tokens: got 0 tokens, expected N >= 1")
        rng = np.random.default_rng([self.seed, request_id])
        k = min(n, max(self.options.min_keep, int(np.ceil(self.options.keep_ratio * n - 1e-9))))
        return KeepDecision(KeepSet(np.sort(rng.permutation(n)[:k]).astype(np.int64), n, self.name))


KEEP_POLICIES: dict[str, type[KeepPolicy]] = {p.name: p for p in (MasPolicy, MasBlindPolicy, SaliencyPolicy, RandomPolicy)}


def keep_policy_from_name(name: str, options: MasOptions = MasOptions(), seed: int = 0) -> KeepPolicy:
    """The policy registered under ``name``; ``options.keep_ratio`` is its budget."""
    if name not in KEEP_POLICIES:
        raise ConfigError(f"unknown keep policy {name!r}; choose one of {sorted(KEEP_POLICIES)}")
    return KEEP_POLICIES[name](options, seed)
