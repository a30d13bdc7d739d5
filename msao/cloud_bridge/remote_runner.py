"""A decoder range (+ head) on a cloud worker that looks like a local segment: the same ``Runner``.

The edge runtime runs ``decoder[0:k]`` locally and hands layer-k hidden states to this runner
exactly as it would to a local ``decoder[k:L]`` + ``lm_head``; the KV cache of layers k..L stays
in the cloud under this runner's session, so each decode step ships one hidden vector.

    feeds: hidden_states (B, T, D) f32, position_ids (B, T), attention_mask (B, P+T)
      ─fp16 (optional)─► split job ─► worker: decoder[k:L] with session KV ─► head
    outputs: logits (B, 1, V) f32 ("last") or (B, T, V) ("all"); hidden_states_out with head "none"

P == 0 starts a new session (prefill); P > 0 must continue the current one (decode step),
and goes to the worker that holds it. Errors are the link's: ``CloudUnavailable``,
``CloudBusy``, ``CloudJobFailed`` — the caller falls back to local segments.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from msao.cloud_bridge.link import CloudLink, new_job_id
from msao.cloud_bridge.messages import JobHeader
from msao.cloud_bridge.stats import TransferStats
from msao.engines.backend import Runner
from msao.engines.manifest import Manifest, SegmentSpec, TensorSpec, decoder_segment_name, exit_segment_name
from msao.errors import CloudError, ConfigError, FeedError

__all__ = ["RemoteOptions", "RemoteRunner", "remote_spec"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemoteOptions:
    """How a remote range is called.

    Attributes:
        deadline_s: per job (prefill or one decode step), re-dispatch included.
        transport_dtype: ``float16`` halves the bytes of hidden states (the worker computes in
            float32; expect ~1e-3 relative error) or ``float32`` for bit-exact inputs.
        logits: ``last`` (what generation needs) or ``all`` positions.
        keep_session: keep the cloud KV for decode steps; False = stateless prefill only.
    """

    deadline_s: float = 5.0
    transport_dtype: str = "float16"
    logits: str = "last"
    keep_session: bool = True

    def __post_init__(self) -> None:
        if self.deadline_s <= 0 or self.transport_dtype not in ("float16", "float32") or self.logits not in ("last", "all"):
            raise ConfigError(f"remote options: deadline_s > 0, transport_dtype float16/float32, logits last/all; got {self}")


def remote_spec(manifest: Manifest, start: int, end: int | None = None, head: str = "lm_head") -> SegmentSpec:
    """The ``SegmentSpec`` of ``decoder[start:end]`` + ``head`` run remotely (no past inputs: KV stays remote)."""
    end = manifest.model.num_layers if end is None else end
    chunks = manifest.decoder_chunks()
    first = next((c for c in chunks if c.layers and c.layers[0] == start), None)
    if first is None or not any(c.layers and c.layers[1] == end for c in chunks) or start >= end:
        raise ConfigError(
            f"{manifest.name}: decoder[{start}:{end}] is not on chunk boundaries; split points are {list(manifest.split_points)}"
        )
    if head not in ("lm_head", "none", exit_segment_name(end)):
        raise ConfigError(f"head {head!r} cannot follow layer {end}: use lm_head, none or {exit_segment_name(end)}")
    inputs = tuple(t for t in first.inputs if not t.name.startswith("past_"))
    rng = decoder_segment_name(start, end)
    if head == "none":
        out = TensorSpec("hidden_states_out", "float32", ("batch", "out_seq", manifest.model.hidden_size))
        return SegmentSpec(name=rng, kind="decoder", file="remote", inputs=inputs, outputs=(out,), layers=(start, end))
    out = TensorSpec("logits", "float32", ("batch", "out_seq", manifest.model.vocab_size))
    return SegmentSpec(name=f"{rng}+{head}", kind="lm_head", file="remote", inputs=inputs, outputs=(out,))


class RemoteRunner(Runner):
    """``decoder[start:end]`` + ``head`` of ``manifest``'s model, run by a cloud worker through ``link``.

    Not thread-safe (one sequence at a time, like a local decoder stack). ``last_stats`` holds
    the transfer record of this runner's last call (found by its job id, never another
    runner's); ``job_ids`` every job it sent; ``link.transfers`` keeps the history.
    """

    def __init__(
        self,
        link: CloudLink,
        manifest: Manifest,
        start: int,
        end: int | None = None,
        head: str = "lm_head",
        options: RemoteOptions = RemoteOptions(),
    ):
        spec = remote_spec(manifest, start, end, head)
        super().__init__(spec)
        self.link = link
        self.options = options
        self.model_hash = manifest.model_hash
        self.segment = decoder_segment_name(start, manifest.model.num_layers if end is None else end)
        self.head = head
        self.session_id: str | None = None
        self.worker_id: str | None = None
        self.past_length = 0
        self.last_stats: TransferStats | None = None
        self.job_ids: list[str] = []

    def reset(self) -> None:
        """Forget the session (the worker drops its KV after its idle time)."""
        self.session_id, self.worker_id, self.past_length = None, None, 0

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seq = feeds["hidden_states"].shape[1]
        past = feeds["attention_mask"].shape[1] - seq
        if past == 0:
            self.reset()
            if self.options.keep_session:
                self.session_id = new_job_id()
        elif self.session_id is None or past != self.past_length:
            raise FeedError(
                f"remote {self.spec.name}: feeds continue a sequence of {past} tokens but the cloud session holds "
                f"{self.past_length if self.session_id else 'none'}; call reset() and run prefill again"
            )
        hidden = feeds["hidden_states"]
        if self.options.transport_dtype == "float16":
            hidden = hidden.astype(np.float16)  # (B, T, D) half the bytes on the wire
        header = JobHeader(
            job_id=new_job_id(), model_hash=self.model_hash, kind="split", deadline_unix_s=time.time() + self.options.deadline_s,
            segment=self.segment, head=self.head, logits=self.options.logits, session_id=self.session_id or "", past_length=past,
        )  # fmt: skip
        tensors = {"hidden_states": hidden, "position_ids": feeds["position_ids"], "attention_mask": feeds["attention_mask"]}
        self.job_ids.append(header.job_id)
        try:
            res = self.link.submit(header, tensors, worker_id=self.worker_id if past else None)
        except CloudError:
            self.reset()  # the KV on the far side is unusable now; the caller falls back or restarts
            self.last_stats = self.link.transfers.find(header.job_id)  # not ``.last``: another thread's job may have finished since
            raise
        self.last_stats = res.stats
        if self.session_id:
            self.worker_id, self.past_length = res.header.worker_id, res.header.past_length
        name = self.spec.outputs[0].name
        return {name: np.asarray(res.tensors[name], np.float32)}
