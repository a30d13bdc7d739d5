"""Job, result and status records: strict parsing; the worker's bounded session and result tables."""

from __future__ import annotations

import json
import time

import pytest

from msao.cloud_bridge.messages import EdgeStatus, JobHeader, ResultHeader, ServedModel, WorkerStatus
from msao.cloud_bridge.sessions import RecentResults, SessionTable, StoredResult
from msao.cloud_bridge.stats import TransferStats
from msao.cloud_bridge.topics import check_id, shared_job_filter, worker_job_topic
from msao.errors import CodecError, ConfigError

H = "ab" * 32


def test_job_header_round_trips_through_string_metadata():
    h = JobHeader(
        "j-1", H, "split", 1234.5, segment="decoder[1:4]", head="exit_head@4", session_id="s", past_length=7, result_dtype="float16"
    )
    md = h.to_metadata()
    assert all(isinstance(v, str) for v in md.values())
    assert JobHeader.from_metadata(md) == h


@pytest.mark.parametrize(
    "change, match",
    [
        ({"extra": "1"}, "unknown metadata keys"),
        ({"layout": "0"}, "layout '0'"),
        ({"past_length": "x"}, "not a valid int"),
        ({"deadline_unix_s": "nan"}, "not finite"),
        ({"job_id": "a/b"}, "not a valid id"),
        ({"segment": "decoder[3:1]"}, "start < end"),
        ({"head": "softmax"}, "head 'softmax'"),
        ({"past_length": "3", "session_id": ""}, "needs a session_id"),
        ({"kind": "train"}, "kind 'train'"),
    ],
)
def test_job_header_parsing_is_strict(change, match):
    md = JobHeader("j", H, "split", 1.0, segment="decoder[1:4]", session_id="s").to_metadata()
    md.update(change)
    with pytest.raises(CodecError, match=match):
        JobHeader.from_metadata(md)


def test_missing_keys_and_bad_results_are_refused():
    with pytest.raises(CodecError, match="model_hash"):
        JobHeader.from_metadata({"layout": "1", "job_id": "j", "kind": "split", "deadline_unix_s": "1"})
    with pytest.raises(CodecError, match="does not fit status"):
        ResultHeader("j", "ok", "w", error_code="internal")
    with pytest.raises(CodecError, match="codes: "):
        ResultHeader("j", "error", "w", error_code="oops")


def test_worker_status_json_is_strict():
    s = WorkerStatus("w1", "online", (ServedModel("m", H, 4, (1, 2), ("CPUExecutionProvider",)),), queue_depth=2)
    assert WorkerStatus.from_dict(s.to_dict()) == s and s.serves(H) and not s.serves("cd" * 32)
    with pytest.raises(ValueError, match="unknown keys"):
        WorkerStatus.from_dict({**s.to_dict(), "gpu": "A100"})


def test_edge_status_json_says_readiness_and_still_reads_the_older_four_key_form():
    s = EdgeStatus("jetson-1", "online", 12.5, ready=True, mode="edge-only")
    assert EdgeStatus.from_dict(s.to_dict()) == s and json.loads(s.to_json_bytes()) == s.to_dict()
    old = EdgeStatus.from_dict({"edge_id": "jetson-1", "state": "offline", "updated_unix_s": 0.0, "layout": "1"})  # a Last Will of before
    assert (old.ready, old.mode) == (False, "")
    with pytest.raises(ValueError, match="unknown keys"):
        EdgeStatus.from_dict({**s.to_dict(), "gpu": "Orin"})
    with pytest.raises(ValueError, match="not in"):
        EdgeStatus("jetson-1", "busy")
    with pytest.raises(ValueError, match="do not fit state 'starting'"):
        EdgeStatus("jetson-1", "starting", ready=True)  # only an online edge is ready
    with pytest.raises(ValueError, match="do not fit"):
        EdgeStatus("jetson-1", "online", ready=True, mode="fast")


def test_topics_refuse_ids_with_separators_or_wildcards():
    assert shared_job_filter(H) == f"$share/msao-cloud/msao/v1/cloud/jobs/{H}"
    for bad in ("a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ConfigError):
            check_id(bad)
    with pytest.raises(ConfigError, match="64 lower-case hex"):
        worker_job_topic("w", "ABC")


def test_session_table_evicts_least_recently_used_and_expires_idle_sessions():
    t: SessionTable = SessionTable(max_sessions=2, idle_s=0.2)
    t.put("a", 1)
    t.put("b", 2)
    assert t.get("a")[0] == 1  # a is now the most recent
    t.put("c", 3)
    assert t.get("b") is None and t.get("a") is not None and t.evicted_total == 1
    time.sleep(0.3)
    assert t.get("a") is None and len(t) == 0 and t.expired_total == 2


def test_recent_results_are_bounded_by_entries_and_bytes():
    r = RecentResults(max_entries=3, max_bytes=100)
    for i in range(5):
        r.put(str(i), StoredResult("t", b"x" * 30, 0.0))
    assert r.get("0") is None and r.get("1") is None and r.get("4") is not None
    r.put("big", StoredResult("t", b"x" * 101, 0.0))
    assert r.get("big") is None


def test_transfer_stats_network_share_excludes_worker_time():
    s = TransferStats("j", "split", "w", "ok", 1, 100, 50, 1, 120, rtt_ms=10.0, queue_wait_ms=2.0, compute_ms=5.0, worker_codec_ms=0.5)
    assert s.network_ms == pytest.approx(2.5)
    with pytest.raises(ValueError):
        TransferStats("j", "split", "w", "lost", 1, 0, 0, 0, 0, 0.0)


def test_only_probe_jobs_may_ask_for_reply_bytes():
    assert JobHeader("j", H, "probe", 1.0, reply_bytes=10).reply_bytes == 10
    with pytest.raises(CodecError, match="reply_bytes"):
        JobHeader("j", H, "split", 1.0, segment="decoder[0:1]", reply_bytes=10)


def test_decode_ahead_travels_only_on_verify_jobs_that_ask_for_it():
    """A job without it keeps layout 1's keys (a worker older than the key reads it); one with it round-trips."""
    plain = JobHeader("j", H, "verify", 1.0, session_id="s", past_length=3)
    assert "decode_ahead" not in plain.to_metadata() and JobHeader.from_metadata(plain.to_metadata()) == plain
    ahead = JobHeader("j", H, "verify", 1.0, session_id="s", past_length=3, decode_ahead=12)
    assert ahead.to_metadata()["decode_ahead"] == "12" and JobHeader.from_metadata(ahead.to_metadata()) == ahead
    with pytest.raises(CodecError, match="decode_ahead"):
        JobHeader("j", H, "answer", 1.0, question="q", decode_ahead=1)
    md = plain.to_metadata() | {"decode_ahead": "-1"}
    with pytest.raises(CodecError, match="decode_ahead -1"):
        JobHeader.from_metadata(md)


def test_session_table_is_bounded_by_declared_bytes_least_recently_used_first():
    t: SessionTable = SessionTable(max_sessions=10, idle_s=60, max_bytes=100)
    t.put("a", 1, nbytes=40)
    t.put("b", 2, nbytes=40)
    assert t.get("a") is not None  # b is now the least recently used
    t.put("c", 3, nbytes=40)  # 120 > 100: b goes
    assert t.get("b") is None and t.get("a") is not None and t.get("c") is not None
    assert t.nbytes == 80 and t.evicted_total == 1
    with pytest.raises(ValueError, match="over the table's bound"):
        t.put("d", 4, nbytes=101)
    assert len(t) == 2  # a refused session evicts nothing
    t.drop("a")
    assert t.nbytes == 40
