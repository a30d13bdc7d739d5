"""Accuracy and per-request latency of a bundle on easy-VQA, through a real backend.

Each request is served the way the edge serves it: PNG bytes → decode → preprocess →
vision encoder → prefill → decode, timed end to end. No caching across questions that share
an image, so latencies are per request, not amortised.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from msao.datasets.easyvqa import LoadEasyVqa
from msao.engines.backend import Backend
from msao.engines.bundle import Bundle
from msao.engines.flops import RequestFlops
from msao.engines.generation import Generator

__all__ = ["EvalReport", "EvaluateBundle", "ANSWER_KINDS"]

ANSWER_KINDS = {
    "shape": ("circle", "rectangle", "triangle"),
    "colour": ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow"),
    "yes/no": ("yes", "no"),
}


@dataclass(frozen=True)
class EvalReport:
    """Machine-readable result of ``msao eval --json``."""

    bundle: str
    model_hash: str
    split: str
    n: int
    accuracy: float
    accuracy_by_kind: dict[str, float]
    exit_layer: int | None
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_mean: float
    mean_confidence: float
    flops_per_request_mean: float
    backend: str

    def to_dict(self) -> dict:
        return asdict(self)


def EvaluateBundle(  # noqa: N802
    bundle: Bundle,
    backend: Backend,
    *,
    split: str = "test",
    limit: int | None = None,
    exit_layer: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Answer easy-VQA questions (all of ``split``, or the first ``limit``) with greedy decoding."""
    data = LoadEasyVqa(split)
    n = len(data) if limit is None else min(limit, len(data))
    gen = Generator(bundle, backend)
    try:
        gen.answer(data.image_pngs[data.image_ids[0]], data.questions[0], exit_layer=exit_layer)  # warm-up
        correct = np.zeros(n, bool)
        latency = np.zeros(n)
        confidence = np.zeros(n)
        flops = np.zeros(n)
        t_start = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            ans = gen.answer(data.image_pngs[data.image_ids[i]], data.questions[i], exit_layer=exit_layer)
            latency[i] = (time.perf_counter() - t0) * 1e3
            correct[i] = ans.text == data.answers[i]
            confidence[i] = ans.confidence
            flops[i] = RequestFlops(
                bundle.manifest,
                image_tokens=ans.kept_tokens,
                text_tokens=ans.text_tokens,
                new_tokens=len(ans.token_ids),
                exit_layer=exit_layer,
            )
            if progress and (i + 1) % 1000 == 0:
                progress(f"  {i + 1}/{n} accuracy so far {correct[: i + 1].mean():.4f} ({time.perf_counter() - t_start:.0f}s)")
    finally:
        gen.close()
    answers = np.asarray(data.answers[:n])
    by_kind = {k: round(float(correct[np.isin(answers, v)].mean()), 4) for k, v in ANSWER_KINDS.items() if np.isin(answers, v).any()}
    return EvalReport(
        bundle=bundle.manifest.name,
        model_hash=bundle.manifest.model_hash,
        split=split,
        n=n,
        accuracy=round(float(correct.mean()), 4),
        accuracy_by_kind=by_kind,
        exit_layer=exit_layer,
        latency_ms_p50=round(float(np.percentile(latency, 50)), 3),
        latency_ms_p90=round(float(np.percentile(latency, 90)), 3),
        latency_ms_p99=round(float(np.percentile(latency, 99)), 3),
        latency_ms_mean=round(float(latency.mean()), 3),
        mean_confidence=round(float(confidence.mean()), 4),
        flops_per_request_mean=float(flops.mean()),
        backend=backend.describe(),
    )
