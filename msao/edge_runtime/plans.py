"""The vocabulary of decisions: the placement policies, the kinds of plan, and ``Plan`` itself.

Defined once here and imported everywhere else (the scheduler that makes plans, the executor
that runs them, the request parser that accepts a per-request policy, the CLI's choices, the
benchmark's cells and the metrics' labels), so no module recovers a kind by parsing a string.
Knows no cost model: the numbers in a ``Plan`` are the scheduler's estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from msao.errors import ConfigError

__all__ = ["ALWAYS_VERIFY", "MAX_DECODE_AHEAD", "PLAN_KINDS", "POLICIES", "UPLOAD_FORMS", "Plan", "PlanKind", "sends_tokens"]

# ``msao`` is the adaptive policy; the others are the fixed baselines the benchmark compares it with.
POLICIES = ("msao", "edge_only", "cloud_only", "static_split", "prune_only", "draft_verify_static", "speculative")
ALWAYS_VERIFY = 1.01  # a commit threshold no confidence reaches
MAX_DECODE_AHEAD = 64  # tokens the cloud decodes after one verdict, at most (a speculative plan's decode_ahead)
# What a cloud job carries for the image (``uploads.py`` builds each): the request's file as it came;
# the image fitted to the cloud model's input and re-encoded as JPEG at a quality; only the kept
# patches (the rest flattened) as JPEG, with the keep-set; the edge encoder's kept image tokens in
# fp16 or in int8 with a scale per row (only where the two models share their vision encoder).
UPLOAD_FORMS = ("file", "jpeg@90", "jpeg@70", "jpeg@50", "region@70", "tokens@fp16", "tokens@int8")


def sends_tokens(upload: str) -> bool:
    """Whether ``upload`` carries the edge encoder's image tokens, so the edge encodes (and runs MAS) before the job goes up."""
    return upload.startswith("tokens@")


class PlanKind(str, Enum):
    """What a plan runs where; a ``str`` so that JSON, metric labels and ``kind == "edge"`` read the value."""

    EDGE = "edge"  # the edge model answers alone
    LOCAL_LARGE = "local_large"  # the large model answers alone, on the edge
    CLOUD = "cloud"  # the large model answers in the cloud
    SPLIT = "split"  # the large model's first layers here, the rest in the cloud
    DRAFT_VERIFY = "draft_verify"  # the edge model drafts; committed, or the cloud's answer wins
    SPECULATIVE = "speculative"  # the edge model drafts tokens, the cloud verifies them in blocks: the large model's answer

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:  # Python 3.10's str-mixin enums format as the member name otherwise
        return format(self.value, spec)

    @property
    def uses_cloud(self) -> bool:
        return self in (PlanKind.CLOUD, PlanKind.SPLIT, PlanKind.DRAFT_VERIFY, PlanKind.SPECULATIVE)

    @property
    def is_local(self) -> bool:
        return self in (PlanKind.EDGE, PlanKind.LOCAL_LARGE)


PLAN_KINDS = tuple(k.value for k in PlanKind)


@dataclass(frozen=True)
class Plan:
    """What one request will do. ``describe()`` is what responses and logs show; ``kind`` what metrics count.

    Attributes:
        kind: a ``PlanKind`` (a plain string value is converted; anything else is refused).
        block: speculative: the block size its estimate assumed (``block_size`` at the prior
            acceptance). The run sends the prompt alone first and then sizes every block live,
            from the link, the edge's measured step and the acceptance so far.
        decode_ahead: speculative: how many of its own tokens the large model decodes after each
            verdict (``speculate(decode_ahead=)``): a round trip's worth or the whole budget
            (``SchedulerOptions.decode_ahead``), so a cheap cloud behind a slow link answers in
            fewer round trips; 0 = verdicts only. Not
            in ``describe()`` (it moves with each request's upload; the benchmarks group plans by
            their description): the answer's reason counts the tokens decoded ahead.
        fallback_reserve_ms: time kept back from the cloud path for an edge-only answer if the
            cloud fails: the cloud's deadline is the request's minus this (0 for local plans,
            and for draft/verify, whose fallback, the draft, is already there).
    """

    kind: PlanKind
    keep_ratio: float = 1.0
    split_layer: int = 0
    commit_threshold: float = ALWAYS_VERIFY
    speculate: bool = False
    send_keep: bool = True  # cloud/draft_verify/speculative: prune the cloud's prefill with the edge's keep-set
    upload: str = "file"  # cloud/draft_verify/speculative: what the cloud job carries for the image (``UPLOAD_FORMS``)
    block: int = 0
    decode_ahead: int = 0
    est_latency_ms: float = 0.0
    est_accuracy: float = 0.0
    est_uplink_bytes: float = 0.0
    fallback_reserve_ms: float = 0.0
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, PlanKind):
            if self.kind not in PLAN_KINDS:
                raise ConfigError(f"plan kind {self.kind!r} not in {PLAN_KINDS}")
            object.__setattr__(self, "kind", PlanKind(self.kind))
        if not 0 < self.keep_ratio <= 1:
            raise ConfigError(f"keep ratio {self.keep_ratio} not in (0, 1]")
        if self.upload not in UPLOAD_FORMS:
            raise ConfigError(f"upload form {self.upload!r} not in {UPLOAD_FORMS}")
        if not 0 <= self.block <= 64:
            raise ConfigError(f"block {self.block} not in 0..64 drafts")
        if not 0 <= self.decode_ahead <= MAX_DECODE_AHEAD:
            raise ConfigError(f"decode_ahead {self.decode_ahead} not in 0..{MAX_DECODE_AHEAD} tokens")
        if self.fallback_reserve_ms < 0:
            raise ConfigError(f"fallback reserve {self.fallback_reserve_ms} ms must be >= 0")

    @property
    def uses_cloud(self) -> bool:
        return self.kind.uses_cloud

    def describe(self) -> str:
        base = f"split@{self.split_layer}" if self.kind is PlanKind.SPLIT else self.kind.value
        parts = [base, f"keep={self.keep_ratio:g}"]
        if self.kind is PlanKind.DRAFT_VERIFY:
            parts.append("verify=always" if self.commit_threshold > 1 else f"commit>={self.commit_threshold:g}")
            parts.append("speculative" if self.speculate else "sequential")
        if self.kind is PlanKind.SPECULATIVE and self.block:
            parts.append(f"k={self.block}")
        if self.upload != "file" and self.kind in (PlanKind.CLOUD, PlanKind.DRAFT_VERIFY, PlanKind.SPECULATIVE):
            parts.append(f"upload={self.upload}")
        return " ".join(parts)
