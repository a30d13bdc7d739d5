"""Every corpus case through its parser, in process: the project's typed error with a message that says what, never anything else.

The same parsers the daemon and the worker run on their network threads (``tests/corpus/corpus.py``
names them per target); ``test_corpus_live.py`` sends the same bytes to real processes.
"""

from __future__ import annotations

import json
import re

import pytest

import msao.errors as errors
from msao.cloud_bridge.chunking import ChunkHeader, Reassembler
from msao.cloud_bridge.codec import CodecLimits, tensors_from_payload
from msao.cloud_bridge.messages import JobHeader
from msao.cloud_bridge.topics import check_id, job_topic
from msao.cloud_bridge.worker import _job_id
from msao.edge_runtime.mqtt_intake import _JSON_START, response_topic_problem
from msao.edge_runtime.openai_chat import OPENAI_ERRORS, call_from_chat
from msao.edge_runtime.requests import ERROR_CODES, EdgeRequest, RequestLimits, request_from_json, request_from_raw_image
from msao.engines.images import decode_image
from tests.corpus.corpus import CORPUS_DIR, JOB_MAX_PAYLOAD_BYTES, REQUEST_MAX_PAYLOAD_BYTES, TARGETS, Case, load_cases, load_manifest

LIMITS = RequestLimits(max_payload_bytes=REQUEST_MAX_PAYLOAD_BYTES)
CODEC_LIMITS = CodecLimits(max_payload_bytes=JOB_MAX_PAYLOAD_BYTES)
CASES = {t: load_cases(t) for t in TARGETS}


def _params(target: str) -> list:
    skip = pytest.mark.skip(reason="needs int() digit limits (Python >= 3.10.7)")
    return [pytest.param(c, id=c.name, marks=() if c.runs_here else skip) for c in CASES[target]]


def _matches(case: Case, message: str) -> None:
    assert message.strip(), f"{case.id}: empty error message"
    assert re.search(case["match"], message, re.IGNORECASE), f"{case.id}: {message[:300]!r} does not match {case['match']!r}"


def parse_edge_request(payload: bytes, properties: dict[str, str]) -> EdgeRequest:
    """What ``MqttIntake._parse`` does with a message: JSON when it starts with '{', else a raw image."""
    if _JSON_START.match(payload):
        return request_from_json(payload, LIMITS)
    return request_from_raw_image(payload, properties, LIMITS)


# -- the corpus itself -------------------------------------------------------------------------


def test_corpus_has_at_least_200_cases_each_saying_what_it_is():
    counts = {t: len(c) for t, c in CASES.items()}
    assert sum(counts.values()) >= 200, counts
    for cases in CASES.values():
        for c in cases:
            assert c.what and c["match"] is not None, c.id


def test_corpus_stays_small():
    total = sum(f.stat().st_size for t in TARGETS for f in (CORPUS_DIR / t).iterdir())
    assert total < 4 << 20, f"corpus is {total} bytes; bombs must be small files"


def test_generator_is_deterministic_and_matches_the_committed_manifests(tmp_path):
    from tests.corpus.make_corpus import write_corpus

    write_corpus(tmp_path / "a")
    write_corpus(tmp_path / "b")
    for t in TARGETS:
        files = sorted(p.name for p in (tmp_path / "a" / t).iterdir())
        assert files == sorted(p.name for p in (tmp_path / "b" / t).iterdir())
        assert all((tmp_path / "a" / t / f).read_bytes() == (tmp_path / "b" / t / f).read_bytes() for f in files), t
        # the committed manifests are what the generator writes (file bytes may differ with the Pillow/zlib build)
        assert load_manifest(t, tmp_path / "a") == load_manifest(t), f"{t}: run `python -m tests.corpus.make_corpus`"
        assert files == sorted(p.name for p in (CORPUS_DIR / t).iterdir()), f"{t}: run `python -m tests.corpus.make_corpus`"


# -- edge requests (MQTT) ----------------------------------------------------------------------


@pytest.mark.parametrize("case", _params("edge_request"))
def test_edge_request_is_refused_with_a_typed_error(case: Case):
    props = dict(case["properties"])
    assert case["code"] in ERROR_CODES
    if case["stage"] == "parse":
        with pytest.raises(errors.RequestError) as info:
            parse_edge_request(case.data, props)
        assert info.value.code == case["code"], f"{case.id}: code {info.value.code}: {info.value}"
        _matches(case, str(info.value))
        return
    request = parse_edge_request(case.data, props)  # found later: by the worker's decoder, or the prompt check (live test)
    if case["stage"] == "decode":
        with pytest.raises(errors.ImageError) as img:
            decode_image(request.image)
        _matches(case, str(img.value))


# -- HTTP chat-completion bodies ---------------------------------------------------------------


@pytest.mark.parametrize("case", _params("http_chat"))
def test_http_chat_body_is_refused_with_a_typed_error(case: Case):
    if case["stage"] == "parse":
        with pytest.raises(errors.RequestError) as info:  # the chat mapping's refusal: code -> HTTP status + OpenAI error
            call_from_chat(case.data, LIMITS, "corpus")
        assert info.value.code == case["code"] and OPENAI_ERRORS[info.value.code].http_status == case["status"], (
            f"{case.id}: {info.value.code}"
        )
        _matches(case, str(info.value))
        return
    request = call_from_chat(case.data, LIMITS, "corpus").request
    if case["stage"] == "decode":
        with pytest.raises(errors.ImageError) as img:
            decode_image(request.image)
        _matches(case, str(img.value))


# -- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params("image"))
def test_image_is_refused_with_an_image_error(case: Case):
    with pytest.raises(errors.ImageError) as info:
        decode_image(case.data)
    _matches(case, str(info.value))


# -- cloud jobs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params("job"))
def test_job_is_refused_with_a_typed_error(case: Case):
    stage = case["stage"]
    if stage == "codec":
        cls = getattr(errors, case["error"])
        with pytest.raises(cls) as info:
            tensors_from_payload(case.data, CODEC_LIMITS)
        assert case["code"] == ("too_large" if isinstance(info.value, errors.PayloadTooLarge) else "bad_payload"), case.id
        _matches(case, str(info.value))
        return
    payload = tensors_from_payload(case.data, CODEC_LIMITS)
    if stage == "header":
        with pytest.raises(errors.CodecError) as info:
            JobHeader.from_metadata(payload.metadata)
        assert case["code"] == "bad_job", case.id  # the worker wraps header errors as bad_job
        _matches(case, str(info.value))
        return
    header = JobHeader.from_metadata(payload.metadata)  # server / properties: a well-formed job, refused by the worker
    assert header.job_id == case["job_id"] or stage == "server"
    if stage == "properties":
        corr = case["correlation_hex"]
        topic = case["response_topic"]
        assert corr is None or _job_id(bytes.fromhex(corr)) is None or topic is None or response_topic_problem(topic), case.id


# -- chunks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params("chunk"))
def test_chunk_is_refused_with_a_typed_error(case: Case):
    r = Reassembler(JOB_MAX_PAYLOAD_BYTES)
    allowed = tuple(getattr(errors, name) for name in case["error"].split("|"))

    def add(chunk: dict) -> None:
        r.add("corpus/topic", ChunkHeader.from_property(chunk["property"]), bytes(chunk["bytes"]), now=0.0)

    for chunk in case["chunks"][: case["fail_at"]]:
        add(chunk)  # the chunks before the bad one are fine
    with pytest.raises(allowed) as info:
        add(case["chunks"][case["fail_at"]])
    _matches(case, str(info.value))


# -- ids and topics -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params("topic"))
def test_id_hash_or_response_topic_is_refused(case: Case):
    value = case["value"]
    if case["kind"] == "id":
        with pytest.raises(errors.ConfigError) as info:
            check_id(value, "id")
        _matches(case, str(info.value))
        assert _job_id(value.encode("utf-8")) is None  # as a job's CorrelationData: dropped
        if value:  # "" means "no id given" to the intake, which then takes the transport's id or makes one
            with pytest.raises(errors.RequestError, match="request id"):
                request_from_json(json.dumps({"question": "q?", "image": "iVBORw0K", "request_id": value}).encode(), LIMITS)
    elif case["kind"] == "hash":
        with pytest.raises(errors.ConfigError) as info:
            job_topic(value)
        _matches(case, str(info.value))
    else:
        problem = response_topic_problem(value)
        assert problem, f"{case.id}: ResponseTopic {value!r} accepted"
        _matches(case, problem)
