"""The request parsers' tolerance: what integration tools add is ignored, known keys keep their types, context is bounded.

The cases that the bad-input corpus (``tests/corpus``) used to refuse as "unknown keys" live here
as accepted cases: Node-RED, Home Assistant and hand-written flows carry keys of their own
(``_msgid``, ``topic``, ``payload``) and must not be refused for them.
"""

from __future__ import annotations

import json
import logging

import pytest

from msao.edge_runtime.requests import (
    MAX_CONTEXT_BYTES,
    EdgeResponse,
    RequestLimits,
    context_from_value,
    request_from_json,
    request_from_raw_image,
)
from msao.errors import RequestError
from tests.corpus.make_corpus import GOOD_B64, GOOD_PNG, Q


def _doc(**extra) -> dict:
    return {"question": Q, "image": GOOD_B64, **extra}


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"colour": "red"}, id="unknown_key"),
        pytest.param({"Question": "what shape?"}, id="known_key_in_the_wrong_case"),
        pytest.param({"__proto__": {}}, id="proto_key"),
        pytest.param({"image_url": "http://x/y.png"}, id="openai_style_image_url"),
        pytest.param({"_msgid": "a1b2c3d4.e5f6a7", "topic": "camera/front", "payload": {"x": [1]}}, id="node_red_message_keys"),
        pytest.param({f"k{i}": 0 for i in range(3000)}, id="3000_unknown_keys"),
        pytest.param({"k" * 50000: 1}, id="50000_character_key"),
    ],
)
def test_unknown_json_keys_are_ignored_and_logged_at_debug(extra, caplog):
    with caplog.at_level(logging.DEBUG, logger="msao.edge_runtime.requests"):
        r = request_from_json(json.dumps(_doc(request_id="tol-1", **extra)).encode())
    assert (r.request_id, r.question, r.context) == ("tol-1", Q, None) and r.image == GOOD_PNG
    (line,) = [rec.getMessage() for rec in caplog.records if "ignored unknown keys" in rec.getMessage()]
    assert "tol-1" in line and sorted(extra)[0][:40] in line and len(line) < 1000, line


def test_unknown_user_properties_are_ignored_but_json_only_keys_as_properties_are_refused():
    props = {"question": Q, "request_id": "raw-1", "_msgid": "a1b2", "x-trace": "1", "qos": "1"}
    r = request_from_raw_image(GOOD_PNG, props)
    assert (r.request_id, r.question, r.image) == ("raw-1", Q, GOOD_PNG)
    for key in ("split_layer", "keep_ratio", "max_new_tokens", "context", "image"):
        with pytest.raises(RequestError, match=rf"\['{key}'\] exist only in the JSON form") as info:
            request_from_raw_image(GOOD_PNG, {"question": Q, key: "1"})
        assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("deadline_ms", "5000", "deadline_ms must be a number"),
        ("stream", 5, "stream must be a string"),
        ("question", ["q?"], "question is missing"),
        ("split_layer", "1", "split_layer must be an integer"),
        ("keep_ratio", True, "keep_ratio must be in"),
        ("max_new_tokens", 2.5, "max_new_tokens must be an integer"),
        ("policy", 7, "policy"),
    ],
)
def test_a_known_key_of_the_wrong_type_is_still_refused(key, value, match):
    with pytest.raises(RequestError, match=match) as info:
        request_from_json(json.dumps(_doc(**{key: value})).encode())
    assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    "context",
    ["cam-1", 0, -2.5, True, [1, "two", None], {"flow": "front-door", "seq": 41, "tags": ["a", "b"]}, {"n": 12345678901234567890}],
)
def test_any_bounded_json_context_survives_the_request_and_the_response_unchanged(context):
    r = request_from_json(json.dumps(_doc(context=context)).encode())
    assert r.context == context
    wire = json.loads(EdgeResponse(request_id="c1", status="ok", context=r.context).to_json_bytes())
    assert wire["context"] == context and type(wire["context"]) is type(context)
    assert json.loads(EdgeResponse.failure("c1", "busy", "retry later", r.context).to_json_bytes())["context"] == context


def test_a_context_over_the_size_limit_or_not_plain_json_is_refused_saying_how_large():
    at_limit = "x" * (MAX_CONTEXT_BYTES - 2)  # a JSON string: its two quotes make it exactly the limit
    assert context_from_value(at_limit) == at_limit
    with pytest.raises(RequestError, match=rf"context is {MAX_CONTEXT_BYTES + 1} bytes as JSON, over the limit of {MAX_CONTEXT_BYTES}"):
        context_from_value(at_limit + "x")
    with pytest.raises(RequestError, match="context is 8 bytes as JSON, over the limit of 4; keep a key there"):
        context_from_value("\u00fc\u00fc\u00fc", RequestLimits(max_context_bytes=4))  # 6 bytes of UTF-8 and 2 quotes, not 5 characters
    with pytest.raises(RequestError, match="NaN or Infinity"):
        request_from_json(json.dumps(_doc(context={"x": float("nan")})).encode())
    with pytest.raises(RequestError, match="nested deeper than 4 levels"):
        request_from_json(json.dumps(_doc(context={"a": {"b": {"c": 1}}})).encode())
