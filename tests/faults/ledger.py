"""The fault suite's bookkeeping: every request sent, every response received, by request id.

A ``Ledger`` publishes JSON requests to an edge daemon at QoS 1 (as any MQTT 5 client would) and
keeps *every* response it receives, so a test can prove the suite's promise for each fault:
each accepted request gets exactly one answer (redeliveries may repeat it, never change it),
within its deadline or as an explicit error. ``computed_counts`` reads the daemons' logs to show
that a request was computed once, not merely answered once.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from msao.cloud_bridge.client import BridgeClient
from msao.cloud_bridge.mqtt_options import ClientOptions, InboundMessage

__all__ = ["computed_counts", "Ledger", "Sent"]

EXPLICIT_ERRORS = ("deadline", "busy", "unavailable")  # what a fault may cause; "internal" is a bug


@dataclass
class Sent:
    request_id: str
    sent_at: float
    deadline_ms: float
    responses: list[tuple[float, dict]] = field(default_factory=list)


class Ledger:
    """Requests to ``edge_id`` through ``broker_url``, and everything that came back."""

    def __init__(self, broker_url: str, edge_id: str):
        self.request_topic = f"msao/v1/edge/{edge_id}/request"
        self.response_topic = f"msao/v1/edge/{edge_id}/response/ledger-{uuid.uuid4().hex[:6]}"
        self.sent: dict[str, Sent] = {}
        self._docs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.client = BridgeClient(ClientOptions(broker_url, "ledger-" + uuid.uuid4().hex[:8], session_expiry_s=300), self._on)
        self.client.subscribe(self.response_topic, qos=1)
        self.client.start()
        assert self.client.wait_connected(10), f"ledger could not connect to {broker_url}"

    def close(self) -> None:
        self.client.stop()

    def _on(self, msg: InboundMessage) -> None:
        rid = (msg.correlation_data or b"").decode("ascii", "replace")
        with self._lock:
            entry = self.sent.get(rid)
            if entry is not None:
                entry.responses.append((time.monotonic(), json.loads(msg.payload)))

    def send(self, image: bytes, question: str, *, deadline_ms: float = 20_000, tag: str = "r", **fields: object) -> str:
        rid = f"{tag}-{uuid.uuid4().hex[:10]}"
        doc = {"request_id": rid, "question": question, "image": base64.b64encode(image).decode(), "deadline_ms": deadline_ms, **fields}
        with self._lock:
            self.sent[rid] = Sent(rid, time.monotonic(), deadline_ms)
            self._docs[rid] = json.dumps(doc).encode()
        self._publish(rid)
        return rid

    def resend(self, rid: str) -> None:
        """Ask again under the same id (what a client does when the broker itself lost the request)."""
        self._publish(rid)

    def _publish(self, rid: str) -> None:
        self.client.publish(
            self.request_topic, self._docs[rid], response_topic=self.response_topic, correlation_data=rid.encode(), timeout_s=60
        )

    def unanswered(self, ids: list[str]) -> list[str]:
        with self._lock:
            return [i for i in ids if not self.sent[i].responses]

    def wait(self, ids: list[str], timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._lock:
                if all(self.sent[i].responses for i in ids):
                    return
            time.sleep(0.05)

    def problems(self, ids: list[str], slack_s: float = 0.0) -> list[str]:
        """Everything that breaks the promise for ``ids`` (empty = kept).

        ``slack_s``: time allowed past a deadline for an answer that was computed in time but
        could only be delivered once the fault healed (a partition holds the answer's bytes).
        """
        out = []
        with self._lock:
            for rid in ids:
                e = self.sent[rid]
                if not e.responses:
                    out.append(f"{rid}: never answered")
                    continue
                docs = [d for _, d in e.responses]
                if any(d.get("request_id") != rid for d in docs):
                    out.append(f"{rid}: a response names another request: {docs}")
                kinds = {(d["status"], d.get("answer"), d.get("error_code")) for d in docs}
                if len(kinds) > 1:
                    out.append(f"{rid}: {len(docs)} responses that disagree: {sorted(map(str, kinds))}")
                first_at, first = e.responses[0]
                if first["status"] == "ok":
                    if not first.get("answer"):
                        out.append(f"{rid}: ok without an answer: {first}")
                    late_s = (first_at - e.sent_at) - e.deadline_ms / 1e3
                    if late_s > slack_s:
                        out.append(f"{rid}: answered {late_s:.1f} s after its deadline")
                elif first.get("error_code") not in EXPLICIT_ERRORS or not first.get("error"):
                    out.append(f"{rid}: not an explicit error: {first}")
        return out

    def statuses(self, ids: list[str]) -> dict[str, int]:
        with self._lock:
            firsts = [self.sent[i].responses[0][1] for i in ids if self.sent[i].responses]
        out: dict[str, int] = {}
        for d in firsts:
            key = d["status"] if d["status"] == "ok" else f"error:{d.get('error_code')}"
            out[key] = out.get(key, 0) + 1
        return out


def computed_counts(logs: list[Path], ids: list[str]) -> dict[str, int]:
    """How many times each request was computed, from the daemons' one INFO line per served request."""
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
    return {rid: len(re.findall(rf"msao\.edge_runtime\.runtime: request {re.escape(rid)}: ", text)) for rid in ids}
