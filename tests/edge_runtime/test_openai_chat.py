"""OpenAI chat completions <-> msao, in process: real chat bodies with real easy-VQA PNGs, no socket.

``test_http_api.py`` checks the same mapping as a client sees it (status line, headers, metrics).
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from msao.edge_runtime.openai_chat import OPENAI_ERRORS, completion_from_response, error_body, request_from_chat
from msao.edge_runtime.requests import ERROR_CODES, EdgeResponse, RequestLimits
from msao.errors import RequestError

LIMITS = RequestLimits()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def chat_body(question: str, image_url, **extra) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": image_url}]
    return {
        "model": "msao",
        "messages": [{"role": "system", "content": "answer in one word"}, {"role": "user", "content": content}],
        **extra,
    }


def refusal(body: bytes | dict) -> RequestError:
    """The error ``request_from_chat`` refuses ``body`` with (the default HTTP limits)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    with pytest.raises(RequestError) as info:
        request_from_chat(data, LIMITS, "r1")
    return info.value


def assert_refused(exc: RequestError, want_status: int, want_code: str, match: str = "") -> None:
    """``exc`` as the HTTP intake answers it: ``want_status`` and an OpenAI error object, no runtime response."""
    body = error_body(str(exc), exc.code)
    assert OPENAI_ERRORS[exc.code].http_status == want_status, body
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param"}
    assert err["code"] == want_code and err["param"] is None
    assert match.lower() in err["message"].lower()
    assert "Traceback" not in err["message"]


# -- chat body -> EdgeRequest ------------------------------------------------------------------------


def test_last_user_message_becomes_the_request_with_the_msao_extension(easyvqa_test):
    png = easyvqa_test.image_pngs[0]
    body = chat_body(" what color ", {"url": data_uri(png), "detail": "low"}, max_tokens=8, temperature=0)
    body["messages"][-1]["content"].append({"type": "text", "text": "is the shape? "})
    body["messages"].insert(0, {"role": "user", "content": "an earlier turn, ignored"})
    body["msao"] = {"request_id": "cam7-frame-42", "deadline_ms": 2500, "stream": "cam7", "policy": "edge_only", "keep_ratio": 0.5}
    r = request_from_chat(json.dumps(body).encode(), LIMITS, "unused")
    assert (r.request_id, r.question, r.image) == ("cam7-frame-42", "what color is the shape?", png)
    assert (r.deadline_ms, r.stream_id, r.policy, r.keep_ratio, r.split_layer) == (2500.0, "cam7", "edge_only", 0.5, None)


def test_without_an_msao_extension_the_given_id_and_the_default_deadline_apply(easyvqa_test):
    r = request_from_chat(json.dumps(chat_body("what shape is it?", data_uri(easyvqa_test.image_pngs[1]))).encode(), LIMITS, "r42")
    assert r.request_id == "r42" and r.deadline_ms == LIMITS.default_deadline_ms and r.policy is None


def test_string_content_without_an_image_is_refused_with_400():
    assert_refused(
        refusal({"messages": [{"role": "user", "content": "what color is the shape?"}]}), 400, "bad_image", "image_url content part"
    )


def test_http_image_url_is_refused_because_msao_never_fetches():
    exc = refusal(chat_body("what color is the shape?", {"url": "https://example.com/cat.png"}))
    assert_refused(exc, 400, "bad_image", "never fetches URLs")


def test_two_images_are_refused(easyvqa_test):
    uri = data_uri(easyvqa_test.image_pngs[0])
    body = chat_body("what color is the shape?", uri)
    body["messages"][-1]["content"].append({"type": "image_url", "image_url": uri})
    assert_refused(refusal(body), 400, "bad_image", "one image")


def test_body_that_is_not_json_is_refused():
    assert_refused(refusal(b"question=what+color"), 400, "bad_request", "not JSON")


def test_body_that_is_not_utf8_is_refused():
    assert_refused(refusal(b'{"messages": "\xff\xfe"}'), 400, "bad_request", "UTF-8")


def test_stream_true_is_refused(easyvqa_test):
    exc = refusal(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]), stream=True))
    assert_refused(exc, 400, "bad_request", "streaming is not supported; send stream=false")


def test_unknown_msao_keys_are_refused(easyvqa_test):
    exc = refusal(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]), msao={"deadline": 5}))
    assert_refused(exc, 400, "bad_request", "unknown 'msao' keys")


def test_deeply_nested_json_is_refused():
    assert_refused(refusal(b'{"messages": ' + b"[" * 50 + b"]" * 50 + b"}"), 400, "bad_request", "nested deeper")


def test_json_limits_are_the_callers(easyvqa_test):
    data = json.dumps(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]))).encode()
    request_from_chat(data, LIMITS, "r1")  # 6 levels (a plain-string image_url), 14 values: within the defaults
    with pytest.raises(RequestError, match="nested deeper than 5 levels"):
        request_from_chat(data, LIMITS, "r1", max_json_depth=5)
    with pytest.raises(RequestError, match="more than 5 values"):
        request_from_chat(data, LIMITS, "r1", max_json_items=5)


def test_image_over_the_payload_limit_is_too_large_with_413(easyvqa_test):
    png = easyvqa_test.image_pngs[0]
    data = json.dumps(chat_body("what color is the shape?", data_uri(png))).encode()
    with pytest.raises(RequestError) as info:
        request_from_chat(data, RequestLimits(max_payload_bytes=len(png) - 1), "r1")
    assert_refused(info.value, 413, "too_large", f"image is {len(png)} bytes")


def test_a_field_the_request_itself_refuses_keeps_its_code(easyvqa_test):
    exc = refusal(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]), msao={"policy": "fastest"}))
    assert_refused(exc, 400, "bad_request", "policy")


# -- EdgeResponse -> chat.completion / error ----------------------------------------------------------


def test_completion_has_the_openai_shape_and_the_msao_extension():
    response = EdgeResponse(request_id="cam7-frame-42", status="ok", answer="red", confidence=0.93, answered_by="edge",
                            model="msao-tiny-edge", plan="edge keep=1", reason="fastest", timings_ms={"total": 12.5})  # fmt: skip
    t0 = int(time.time())
    out = completion_from_response(response)
    assert out["id"] == "chatcmpl-cam7-frame-42" and out["object"] == "chat.completion"
    assert isinstance(out["created"], int) and abs(out["created"] - t0) <= 5
    assert out["model"] == "msao-tiny-edge"
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "red"}, "finish_reason": "stop"}]
    assert out["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert out["msao"] == response.to_dict()
    json.dumps(out)


def test_error_body_carries_the_runtime_response_when_there_is_one():
    failed = EdgeResponse.failure("r9", "bad_image", "cannot decode image")
    body = error_body("cannot decode image", "bad_image", failed)
    assert body["error"] == {"message": "cannot decode image", "type": "invalid_request_error", "code": "bad_image", "param": None}
    assert body["msao"]["status"] == "error" and body["msao"]["error_code"] == "bad_image"


def test_every_runtime_error_code_has_a_status_and_an_unknown_code_reads_as_internal():
    assert set(ERROR_CODES) <= set(OPENAI_ERRORS)
    assert all(400 <= kind.http_status < 600 and kind.type.endswith("_error") for kind in OPENAI_ERRORS.values())
    assert (OPENAI_ERRORS["busy"].http_status, OPENAI_ERRORS["deadline"].http_status) == (429, 504)
    assert error_body("x", "no_such_code")["error"]["type"] == OPENAI_ERRORS["internal"].type
