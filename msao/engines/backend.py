"""The backend interface every segment runner implements, and the feed check they share.

A *backend* opens a *runner* for one segment of a verified bundle; the runner owns its
resources (``with backend.open(bundle, spec) as runner: runner.infer(feeds)``). ``infer``
checks names, dtypes and shapes against the ``SegmentSpec`` before the subclass hook runs,
so every backend — ONNX Runtime, TensorRT, the cloud stub — fails the same clear way.
"""

from __future__ import annotations

import abc
import time
from typing import TYPE_CHECKING

import numpy as np

from msao.engines.manifest import SegmentSpec, TensorSpec
from msao.errors import FeedError

if TYPE_CHECKING:
    from msao.engines.bundle import Bundle
    from msao.engines.kv_cache import KvCache

__all__ = ["Backend", "check_feeds", "chunk_feeds", "Runner"]


def check_feeds(spec: SegmentSpec, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Check feeds against a segment's inputs; return the value bound to each symbolic dim.

    Every mismatch is collected and reported at once: unknown or missing names, wrong dtype,
    wrong rank, a fixed dim that differs, and a symbolic dim (e.g. ``batch``) bound to two
    different sizes.

    Raises:
        FeedError: listing every problem, with got vs expected.
    """
    problems: list[str] = []
    expected = {t.name: t for t in spec.inputs}
    for name in sorted(set(feeds) - set(expected)):
        problems.append(f"unexpected input {name!r}")
    for name in sorted(set(expected) - set(feeds)):
        problems.append(f"missing input {name!r}")
    dims: dict[str, int] = {}
    sums: list[tuple[str, tuple[int, ...], TensorSpec, str, int]] = []
    first_seen: dict[str, str] = {}
    for name, t in expected.items():
        if name not in feeds:
            continue
        x = feeds[name]
        if not isinstance(x, np.ndarray):
            problems.append(f"input {name}: expected a numpy array, got {type(x).__name__}")
            continue
        if str(x.dtype) != t.dtype:
            problems.append(f"input {name}: got dtype {x.dtype}, expected {t.dtype}")
        if x.ndim != len(t.shape):
            problems.append(f"input {name}: got shape {x.shape}, expected {_fmt(t)}")
            continue
        for size, dim in zip(x.shape, t.shape):
            if isinstance(dim, int):
                if size != dim:
                    problems.append(f"input {name}: got shape {x.shape}, expected {_fmt(t)}")
                    break
            elif "+" in dim:
                sums.append((name, x.shape, t, dim, size))
            elif dim in dims and dims[dim] != size:
                problems.append(
                    f"input {name}: dim {dim!r} is {size} here but {dims[dim]} in {first_seen[dim]}; got shape {x.shape}, expected {_fmt(t)}"
                )
                break
            else:
                dims.setdefault(dim, size)
                first_seen.setdefault(dim, name)
    for name, shape, t, dim, size in sums:  # e.g. attention_mask's "past+seq"
        parts = dim.split("+")
        if all(p in dims for p in parts) and size != sum(dims[p] for p in parts):
            bound = " + ".join(f"{p}={dims[p]}" for p in parts)
            problems.append(f"input {name}: dim {dim!r} is {size}, expected {bound}; got shape {shape}, expected {_fmt(t)}")
        dims.setdefault(dim, size)
    if problems:
        raise FeedError(
            f"segment {spec.name}: {len(problems)} feed problem(s):\n  - "
            + "\n  - ".join(problems)
            + "\ncheck the caller against the bundle's manifest (docs/bundle.md), or re-export the bundle if it is stale"
        )
    return dims


def chunk_feeds(spec: SegmentSpec, feeds: dict[str, np.ndarray], cache: KvCache) -> tuple[int, dict[str, np.ndarray]]:
    """(new tokens T, the chunk's full feeds): ``feeds`` plus the cache's past and its key mask over the buffer.

    Raises:
        FeedError: hidden states not (B, T, D), or a mask that does not cover the cache and the new tokens.
    """
    hidden, mask = feeds.get("hidden_states"), feeds.get("attention_mask")
    if not isinstance(hidden, np.ndarray) or hidden.ndim != 3:
        got = getattr(hidden, "shape", type(hidden).__name__)
        raise FeedError(f"segment {spec.name}: input hidden_states must be (batch, seq, hidden), got {got}")
    t = hidden.shape[1]
    try:
        if not isinstance(mask, np.ndarray):
            raise ValueError("not an array")
        key_mask = cache.key_mask(mask, t)  # checks the mask covers the cache and the new tokens
    except ValueError as exc:
        got = getattr(mask, "shape", type(mask).__name__)
        want = (cache.batch, cache.length + t)
        raise FeedError(
            f"segment {spec.name}: input attention_mask must be {want} (the {cache.length} cached tokens and the {t} new ones), got {got}"
        ) from exc
    return t, {**feeds, "attention_mask": key_mask, **cache.past_feeds()}


def _fmt(t: TensorSpec) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


class Runner(abc.ABC):
    """Runs one segment; owns its session/engine. Use as a context manager or call ``close``."""

    def __init__(self, spec: SegmentSpec):
        self.spec = spec
        self.last_latency_ms = 0.0

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check ``feeds`` against the spec, run, and return outputs by name (timed)."""
        check_feeds(self.spec, feeds)
        t0 = time.perf_counter()
        out = self._infer(feeds)
        self.last_latency_ms = (time.perf_counter() - t0) * 1e3
        return out

    def run_chunk(self, feeds: dict[str, np.ndarray], cache: KvCache) -> dict[str, np.ndarray]:
        """Run a decoder chunk on ``cache``: feeds without ``past_*``, the mask over past + new tokens.

        The cache's buffers are the past (the mask hides unused slots) and its new slots are
        written from the outputs. A backend whose memory is elsewhere (TensorRT) overrides this
        to keep its own copy of the cache there and move only the new slots.
        """
        t, full = chunk_feeds(self.spec, feeds, cache)
        out = self.infer(full)
        if any(name.startswith("present_") for name in out):  # a format 1/2 bundle: the chunk returned its whole cache
            cache.replace(out)
        else:
            cache.append(out, t)
        return out

    @abc.abstractmethod
    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the checked feeds; must return every output of the spec, synchronised."""

    def close(self) -> None:  # noqa: B027 - optional hook, most runners free on GC
        """Release the runner's resources (idempotent)."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(abc.ABC):
    """Opens runners for segments; one backend instance may open many runners."""

    name: str = "abstract"

    @abc.abstractmethod
    def open(self, bundle: Bundle, spec: SegmentSpec) -> Runner:
        """A runner for ``spec`` from ``bundle`` (already verified)."""

    def describe(self) -> str:
        """Device/provider summary for logs and latency profiles."""
        return self.name
