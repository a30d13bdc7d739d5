"""Hypothesis fuzzing of the request parsers, the codec, chunk reassembly, the image decoder and id checks.

Each property: on arbitrary bytes, structured-but-wrong documents and mutations of valid inputs
and of the corpus, a parser either accepts (and what it returns keeps its invariants) or raises
its typed error; never anything else (``tests/fuzz/targets.py``). The round trip
decode(encode(x)) == x lives in ``tests/cloud_bridge/test_codec.py``; ``run_fuzz.py`` runs the
same targets for a fixed time under atheris.
"""

from __future__ import annotations

import base64
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msao.cloud_bridge.chunking import ChunkHeader
from msao.cloud_bridge.codec import payload_from_tensors
from msao.cloud_bridge.messages import JobHeader
from msao.errors import CodecError
from tests.corpus.corpus import load_cases
from tests.corpus.make_corpus import GOOD_B64, GOOD_PNG, Q
from tests.fuzz.targets import fuzz_chat_body, fuzz_chunks, fuzz_codec, fuzz_edge_request, fuzz_ids, fuzz_image
from tests.strategies import json_values, mutated, request_docs, wire_metadata, wire_tensor_dicts

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VALID = {"request_id": "fuzz-1", "question": Q, "image": GOOD_B64, "stream": "cam-1", "deadline_ms": 2000, "policy": "edge_only",
         "split_layer": 1, "keep_ratio": 0.5, "context": {"flow": "f-1", "seq": [1, 2]}}  # fmt: skip
GOOD_JOB = payload_from_tensors(
    {"hidden_states": np.ones((1, 2, 8), np.float32), "position_ids": np.arange(2)[None]},
    JobHeader("fuzz-job", "ab" * 32, "split", 4e9, segment="decoder[1:2]").to_metadata(),
)
EDGE_SEEDS = [c.data for c in load_cases("edge_request")] + [json.dumps(VALID).encode(), b"question=" + Q.encode() + b"\n\n" + GOOD_PNG]
CHAT_SEEDS = [c.data for c in load_cases("http_chat")]
JOB_SEEDS = [c.data for c in load_cases("job")] + [GOOD_JOB, payload_from_tensors({}, {"job_id": "x"}, compress=True)]
IMAGE_SEEDS = [c.data for c in load_cases("image")] + [GOOD_PNG]


def _chat(content, msao=None, **extra) -> dict:
    doc = {"model": "msao", "messages": [{"role": "user", "content": content}], **extra}
    return doc if msao is None else {**doc, "msao": msao}


# -- edge requests -----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2048))
def test_edge_request_parser_refuses_arbitrary_bytes_with_a_request_error(data):
    fuzz_edge_request(data)


@FUZZ
@given(request_docs(VALID))
def test_edge_request_parser_on_json_with_known_keys_and_any_values(doc):
    fuzz_edge_request(json.dumps(doc, allow_nan=True).encode())


@FUZZ
@given(st.dictionaries(st.sampled_from(("question", "stream", "deadline_ms", "request_id", "policy", "traceparent", "x", "_msgid", "context")), st.text(max_size=30)),
       st.sampled_from((GOOD_PNG, b"", b"\0" * 64, b"GIF89a")))  # fmt: skip
def test_edge_request_parser_on_raw_images_with_any_properties(props, payload):
    head = "\n".join(f"{k}={v}" for k, v in props.items() if "\n" not in v and "=" not in k).encode("utf-8", "replace")
    fuzz_edge_request(head + b"\n\n" + payload)


@FUZZ
@given(st.sampled_from(EDGE_SEEDS).flatmap(mutated))
def test_edge_request_parser_on_mutated_corpus_and_valid_requests(data):
    fuzz_edge_request(data)


# -- HTTP chat bodies ----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2048) | st.sampled_from(CHAT_SEEDS).flatmap(mutated))
def test_chat_body_parser_refuses_bytes_and_mutations_with_a_refusal(data):
    fuzz_chat_body(data)


@FUZZ
@given(
    content=st.lists(
        st.one_of(
            st.fixed_dictionaries({"type": st.just("text"), "text": json_values | st.text(max_size=30)}),
            st.fixed_dictionaries({"type": st.just("image_url"), "image_url": json_values | st.just({"url": "data:image/png;base64," + GOOD_B64})}),
            json_values,
        ),
        max_size=4,
    )
    | json_values,
    msao=st.none() | json_values | request_docs(VALID).map(lambda d: {k: v for k, v in d.items() if k not in ("question", "image")}),
    stream=st.none() | json_values,
)  # fmt: skip
def test_chat_body_parser_on_openai_shapes_with_wrong_parts(content, msao, stream):
    fuzz_chat_body(json.dumps(_chat(content, msao, stream=stream), allow_nan=True).encode())


# -- codec and job headers ---------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2048) | st.binary(max_size=256).map(lambda b: b"\x28\xb5\x2f\xfd" + b))
def test_codec_refuses_arbitrary_bytes_with_a_codec_error(data):
    fuzz_codec(data)


@FUZZ
@given(wire_tensor_dicts, wire_metadata, st.booleans(), st.data())
def test_codec_on_mutated_valid_payloads(tensors, metadata, compress, data):
    fuzz_codec(data.draw(mutated(payload_from_tensors(tensors, metadata, compress=compress))))


@FUZZ
@given(st.sampled_from(JOB_SEEDS).flatmap(mutated))
def test_codec_on_mutated_corpus_jobs(data):
    fuzz_codec(data)


@FUZZ
@given(st.dictionaries(st.sampled_from([*JobHeader.__dataclass_fields__, "priority"]), st.text(max_size=70) | st.sampled_from(
    ("1", "-1", "0", "nan", "inf", "1e999", "9" * 5000, "split", "answer", "probe", "decoder[1:2]", "lm_head", "ab" * 32))))  # fmt: skip
def test_job_header_parser_refuses_any_metadata_with_a_codec_error(md):
    try:
        JobHeader.from_metadata(md)
    except CodecError as exc:
        assert str(exc).strip()
    fuzz_codec(payload_from_tensors({}, md))


# -- chunks, images, ids -----------------------------------------------------------------------------


@FUZZ
@given(st.text(max_size=80) | st.from_regex(r"[A-Za-z0-9_-]{1,70}:\d{1,6}:\d{1,6}:\d{1,13}:\d{1,11}", fullmatch=True))
def test_chunk_header_parser_refuses_any_property_with_a_codec_error(prop):
    try:
        ChunkHeader.from_property(prop)
    except CodecError as exc:
        assert str(exc).strip()


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(("a", "b", "c", "d", "e")), st.integers(0, 4), st.integers(0, 4), st.integers(0, 9000),
                          st.integers(1, 5000), st.integers(0, 5000)), max_size=20))  # fmt: skip
def test_reassembly_stays_within_its_bounds_for_any_chunk_sequence(chunks):
    fuzz_chunks(b"\n".join(f"{m}:{i}:{c}:{t}:{b}|{n}".encode() for m, i, c, t, b, n in chunks))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(IMAGE_SEEDS).flatmap(mutated))
def test_image_decoder_refuses_mutated_images_with_an_image_error(data):
    fuzz_image(data)


@FUZZ
@given(st.text(max_size=80) | st.binary(max_size=80).map(lambda b: base64.b16encode(b).decode().lower()))
def test_ids_hashes_and_response_topics_are_checked(text):
    fuzz_ids(text.encode("utf-8", "surrogatepass"))
