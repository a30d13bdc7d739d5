"""Accuracy and per-request latency of a bundle on a VQA dataset (easy-VQA or scenes), through a real backend.

Each request runs through ``RequestPipeline``, the steps the edge daemon serves (and the cloud
worker's answer jobs run): PNG bytes → decode → preprocess → vision encoder → (keep policy,
e.g. MAS) → prefill → decode, timed end to end. No caching across questions that share an
image, so latencies are per request, not amortised.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from msao.datasets.vqa import load_vqa, question_kinds
from msao.engines.backend import Backend
from msao.engines.bundle import Bundle
from msao.engines.flops import request_flops
from msao.engines.generation import Answer
from msao.engines.mas import MasOptions
from msao.engines.pipeline import RequestPipeline
from msao.progress import progress_bar

__all__ = ["EvalReport", "evaluate_bundle"]


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
    keep_policy: str | None = None  # None: every image token enters prefill
    keep_ratio: float = 1.0
    kept_tokens_mean: float = 0.0
    mas_ms_mean: float = 0.0  # keep policy time per request (question embedding + scores + keep-set)
    mas_share_of_vision: float = 0.0  # mas_ms_mean / mean vision encoder time
    mas_share_of_end_to_end: float = 0.0  # mas_ms_mean / mean request latency
    dataset: str = "easy-vqa"

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_bundle(
    bundle: Bundle,
    backend: Backend,
    *,
    dataset: str = "easy-vqa",
    split: str = "test",
    limit: int | None = None,
    exit_layer: int | None = None,
    keep_policy: str | None = None,
    keep_ratio: float = 1.0,
) -> EvalReport:
    """Answer ``dataset`` questions (all of ``split``, or the first ``limit``) with greedy decoding.

    Args:
        dataset: ``msao.datasets.vqa.DATASETS`` (easy-vqa, scenes); accuracy is also reported
            per kind (easy-VQA: shape, colour, yes/no; scenes: per question family).
        keep_policy: a name from ``KEEP_POLICIES`` (mas, mas-blind, saliency, random); None
            feeds every image token. Its time is measured per request and reported.
        keep_ratio: share of image tokens the policy keeps, in (0, 1].

    Raises:
        ConfigError: unknown policy or a keep ratio outside (0, 1].
    """
    options = MasOptions(keep_ratio=keep_ratio)  # a ratio outside (0, 1] fails before anything loads, with or without a policy
    data = load_vqa(dataset, split)
    n = len(data) if limit is None else min(limit, len(data))
    pipeline = RequestPipeline(bundle, backend, options, keep_policy or "mas")  # an unknown policy fails before a session opens
    prune_ratio = keep_ratio if keep_policy else 1.0  # no policy: every image token enters prefill

    def ask(i: int, png: bytes) -> tuple[Answer, float]:
        """Answer question ``i`` about image ``png`` as the daemon would: the answer and the keep policy's time (ms)."""
        question = data.questions[i]
        rgb, decode_ms = pipeline.decode(png)
        prepared = pipeline.prepare(rgb, question, prune_ratio, analyse=bool(keep_policy), request_id=i, decode_ms=decode_ms)
        return pipeline.answer(prepared, question, exit_layer=exit_layer), prepared.mas_ms

    try:
        pngs = data.image_pngs  # scenes encode on demand: fetched before each request's clock starts
        ask(0, pngs[int(data.image_ids[0])])  # warm-up
        correct = np.zeros(n, bool)
        latency = np.zeros(n)
        confidence = np.zeros(n)
        kept = np.zeros(n)
        flops = np.zeros(n)
        mas_ms = np.zeros(n)
        vision_ms = np.zeros(n)
        bar = progress_bar(n, f"eval {bundle.manifest.name}", "q")
        for i in range(n):
            png = pngs[int(data.image_ids[i])]
            t0 = time.perf_counter()
            ans, mas_ms[i] = ask(i, png)
            latency[i] = (time.perf_counter() - t0) * 1e3
            vision_ms[i] = ans.timings.vision_ms
            kept[i] = ans.kept_tokens
            correct[i] = ans.text == data.answers[i]
            confidence[i] = ans.confidence
            flops[i] = request_flops(
                bundle.manifest,
                image_tokens=ans.kept_tokens,
                text_tokens=ans.text_tokens,
                new_tokens=len(ans.token_ids),
                exit_layer=exit_layer,
            )
            bar.update()
            if (i + 1) % 100 == 0:
                bar.set_postfix_str(f"accuracy {correct[: i + 1].mean():.4f}", refresh=False)
        bar.close()
    finally:
        pipeline.close()
    kinds = np.asarray(question_kinds(data)[:n])
    by_kind = {k: round(float(correct[kinds == k].mean()), 4) for k in sorted(set(kinds.tolist()))}
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
        backend=pipeline.backend_description,
        keep_policy=keep_policy,
        keep_ratio=keep_ratio,
        kept_tokens_mean=round(float(kept.mean()), 3),
        mas_ms_mean=round(float(mas_ms.mean()), 4),
        mas_share_of_vision=round(float(mas_ms.mean() / max(vision_ms.mean(), 1e-9)), 4),
        mas_share_of_end_to_end=round(float(mas_ms.mean() / max(latency.mean(), 1e-9)), 4),
        dataset=dataset,
    )
