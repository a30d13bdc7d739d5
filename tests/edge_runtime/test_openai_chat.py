"""OpenAI chat completions <-> msao, in process: real chat bodies with real easy-VQA PNGs, no socket.

``test_http_api.py`` checks the same mapping as a client sees it (status line, headers, metrics).
"""

from __future__ import annotations

import base64
import json
import time

import pytest

from msao.edge_runtime.openai_chat import (
    OPENAI_ERRORS,
    ChatCall,
    ChunkStream,
    call_from_chat,
    chunks_from_response,
    completion_from_response,
    error_body,
)
from msao.edge_runtime.requests import ERROR_CODES, EdgeRequest, EdgeResponse, RequestLimits
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
    """The error ``call_from_chat`` refuses ``body`` with (the default HTTP limits)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    with pytest.raises(RequestError) as info:
        call_from_chat(data, LIMITS, "r1")
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


def call(body: dict, limits: RequestLimits = LIMITS) -> ChatCall:
    return call_from_chat(json.dumps(body).encode(), limits, "r42")


# -- chat body -> ChatCall ----------------------------------------------------------------------------


def test_last_user_message_becomes_the_request_with_the_msao_extension(easyvqa_test):
    png = easyvqa_test.image_pngs[0]
    body = chat_body(" what color ", {"url": data_uri(png), "detail": "low"}, max_tokens=8, temperature=0)
    body["messages"][-1]["content"].append({"type": "text", "text": "is the shape? "})
    body["messages"].insert(0, {"role": "user", "content": "an earlier turn, ignored"})
    body["msao"] = {"request_id": "cam7-frame-42", "deadline_ms": 2500, "stream": "cam7", "policy": "edge_only", "keep_ratio": 0.5}
    c = call(body)
    r = c.request
    assert (r.request_id, r.question, r.image, r.max_new_tokens) == ("cam7-frame-42", "what color is the shape?", png, 8)
    assert (r.deadline_ms, r.stream_id, r.policy, r.keep_ratio, r.split_layer) == (2500.0, "cam7", "edge_only", 0.5, None)
    assert (c.stream, c.include_usage, c.stop, c.follow_up) == (False, False, (), False)


def test_without_an_msao_extension_the_given_id_and_the_default_deadline_apply(easyvqa_test):
    r = call(chat_body("what shape is it?", data_uri(easyvqa_test.image_pngs[1]))).request
    assert r.request_id == "r42" and r.deadline_ms == LIMITS.default_deadline_ms and r.policy is None and r.max_new_tokens is None


def test_a_conversation_without_an_image_is_a_text_only_turn():
    c = call({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a triangle?"}]})
    assert (c.request.question, c.request.image, c.follow_up) == ("what is a triangle?", b"", False)
    c = call({"messages": [{"role": "user", "content": [{"type": "text", "text": "and a circle?"}]}]})
    assert (c.request.question, c.request.image) == ("and a circle?", b"")


def test_a_follow_up_question_is_about_the_newest_earlier_image(easyvqa_test):
    first, second = easyvqa_test.image_pngs[0], easyvqa_test.image_pngs[1]
    turn = lambda png: {"role": "user", "content": [{"type": "text", "text": "what shape?"}, {"type": "image_url", "image_url": data_uri(png)}]}  # noqa: E731
    messages = [turn(first), {"role": "assistant", "content": "circle"}, turn(second), {"role": "assistant", "content": "square"},
                {"role": "user", "content": "and its colour?"}]  # fmt: skip
    c = call({"messages": messages})
    assert (c.request.question, c.request.image, c.follow_up) == ("and its colour?", second, True)


def test_stream_budget_and_stop_are_read_as_openai_defines_them(easyvqa_test):
    uri = data_uri(easyvqa_test.image_pngs[0])
    c = call(chat_body("what color?", uri, stream=True, stream_options={"include_usage": True}, max_completion_tokens=3, stop="\n"))
    assert (c.stream, c.include_usage, c.request.max_new_tokens, c.stop) == (True, True, 3, ("\n",))
    assert call(chat_body("what color?", uri, stream_options={"include_usage": True}, stop=["a", "b"], n=1)).include_usage is False
    assert call(chat_body("what color?", uri, max_tokens=5, max_completion_tokens=5)).request.max_new_tokens == 5


@pytest.mark.parametrize(
    ("extra", "match"),
    [({"n": 2}, "one (greedy) answer"), ({"max_tokens": 0}, "max_tokens must be a positive integer"),
     ({"max_tokens": 2.5}, "max_tokens must be"), ({"max_tokens": 4, "max_completion_tokens": 8}, "disagree"),
     ({"stop": ["a"] * 5}, "up to 4"), ({"stop": ""}, "'stop' must be"), ({"stream": "yes"}, "'stream' must be true or false"),
     ({"stream_options": []}, "'stream_options' must be")],
)  # fmt: skip
def test_bad_openai_fields_are_refused_with_what_to_send(easyvqa_test, extra, match):
    assert_refused(refusal(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]), **extra)), 400, "bad_request", match)


def test_http_image_url_is_refused_because_msao_never_fetches():
    exc = refusal(chat_body("what color is the shape?", {"url": "https://example.com/cat.png"}))
    assert_refused(exc, 400, "bad_image", "never fetches URLs")


def test_two_images_are_refused(easyvqa_test):
    uri = data_uri(easyvqa_test.image_pngs[0])
    body = chat_body("what color is the shape?", uri)
    body["messages"][-1]["content"].append({"type": "image_url", "image_url": uri})
    assert_refused(refusal(body), 400, "bad_image", "one image")
    body["messages"][-1]["content"].pop()
    body["messages"].insert(0, {"role": "user", "content": [{"type": "image_url", "image_url": uri}, {"type": "image_url", "image_url": uri}]})
    assert_refused(refusal(body), 400, "bad_image", "one image")  # in an earlier turn too


def test_body_that_is_not_json_is_refused():
    assert_refused(refusal(b"question=what+color"), 400, "bad_request", "not JSON")


def test_body_that_is_not_utf8_is_refused():
    assert_refused(refusal(b'{"messages": "\xff\xfe"}'), 400, "bad_request", "UTF-8")


def test_unknown_msao_keys_are_refused(easyvqa_test):
    exc = refusal(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]), msao={"deadline": 5}))
    assert_refused(exc, 400, "bad_request", "unknown 'msao' keys")


def test_deeply_nested_json_is_refused():
    assert_refused(refusal(b'{"messages": ' + b"[" * 50 + b"]" * 50 + b"}"), 400, "bad_request", "nested deeper")


def test_json_limits_are_the_callers(easyvqa_test):
    data = json.dumps(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]))).encode()
    call_from_chat(data, LIMITS, "r1")  # 6 levels (a plain-string image_url), 14 values: within the defaults
    with pytest.raises(RequestError, match="nested deeper than 5 levels"):
        call_from_chat(data, LIMITS, "r1", max_json_depth=5)
    with pytest.raises(RequestError, match="more than 5 values"):
        call_from_chat(data, LIMITS, "r1", max_json_items=5)


def test_image_over_the_payload_limit_is_too_large_with_413(easyvqa_test):
    png = easyvqa_test.image_pngs[0]
    data = json.dumps(chat_body("what color is the shape?", data_uri(png))).encode()
    with pytest.raises(RequestError) as info:
        call_from_chat(data, RequestLimits(max_payload_bytes=len(png) - 1), "r1")
    assert_refused(info.value, 413, "too_large", f"image is {len(png)} bytes")


def test_a_field_the_request_itself_refuses_keeps_its_code(easyvqa_test):
    exc = refusal(chat_body("what color is the shape?", data_uri(easyvqa_test.image_pngs[0]), msao={"policy": "fastest"}))
    assert_refused(exc, 400, "bad_request", "policy")


# -- EdgeResponse -> chat.completion / error ----------------------------------------------------------


def test_completion_has_the_openai_shape_usage_and_the_msao_extension():
    response = EdgeResponse(request_id="cam7-frame-42", status="ok", answer="red", confidence=0.93, answered_by="edge",
                            model="msao-tiny-edge", plan="edge keep=1", reason="fastest", timings_ms={"total": 12.5},
                            prompt_tokens=70, completion_tokens=1, finish_reason="stop")  # fmt: skip
    t0 = int(time.time())
    out = completion_from_response(response)
    assert out["id"] == "chatcmpl-cam7-frame-42" and out["object"] == "chat.completion"
    assert isinstance(out["created"], int) and abs(out["created"] - t0) <= 5
    assert out["model"] == "msao-tiny-edge"
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "red"}, "finish_reason": "stop"}]
    assert out["usage"] == {"prompt_tokens": 70, "completion_tokens": 1, "total_tokens": 71}
    assert out["msao"] == response.to_dict()
    json.dumps(out)


def test_a_length_finish_is_kept_and_a_stop_string_cuts_the_answer():
    response = EdgeResponse(request_id="r1", status="ok", answer="small red triangle", model="m", completion_tokens=3,
                            finish_reason="length")  # fmt: skip
    request = EdgeRequest("r1", "describe it", b"x")
    assert completion_from_response(response)["choices"][0]["finish_reason"] == "length"
    cut = completion_from_response(response, ChatCall(request, stop=(" tri", "zzz")))["choices"][0]
    assert cut["message"]["content"] == "small red" and cut["finish_reason"] == "stop"


def test_streamed_chunks_carry_role_text_finish_and_usage_in_order():
    response = EdgeResponse(request_id="r1", status="ok", answer="red", model="m", prompt_tokens=9, completion_tokens=1,
                            finish_reason="stop")  # fmt: skip
    chunks = chunks_from_response(response, ChatCall(EdgeRequest("r1", "q", b"x"), stream=True, include_usage=True))
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 4 and len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [{"role": "assistant", "content": ""}, {"content": "red"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:3]] == [None, None, "stop"] and chunks[2]["msao"]["answer"] == "red"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"] == {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
    assert len(chunks_from_response(response, ChatCall(EdgeRequest("r1", "q", b"x"), stream=True))) == 3


def _deltas(chunks: list[dict]) -> list[str]:
    return [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]


def test_a_growing_answer_streams_as_deltas_that_add_up_to_the_whole_answer():
    """Each final prefix adds one delta; a repeated or shorter text adds none; the end sends the rest and the finish."""
    call = ChatCall(EdgeRequest("r1", "describe it", b"x"), stream=True, include_usage=True)
    stream = ChunkStream(call, "large")
    assert stream.start()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    grown = [stream.grow(t) for t in ("small", "small", "small red", "small")]
    assert [_deltas(g) for g in grown] == [["small"], [], [" red"], []]
    response = EdgeResponse(request_id="r1", status="ok", answer="small red triangle", model="large", completion_tokens=3,
                            finish_reason="stop")  # fmt: skip
    end = stream.end(response)
    assert _deltas(end) == [" triangle"] and end[-2]["choices"][0]["finish_reason"] == "stop" and end[-2]["msao"]["answer"] == "small red triangle"
    assert end[-1]["usage"]["completion_tokens"] == 3
    assert "".join(_deltas([c for g in grown for c in g] + end)) == completion_from_response(response, call)["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "texts, answer, want",
    [
        (("small red t", "small red tr", "small red triangle"), "small red triangle", "small red"),  # " t", " tr" held back: they begin " tri"
        (("small red", "small red t"), "small red tx", "small red tx"),  # a held-back tail that was not a stop is sent after all
        (("small red tri",), "small red triangle", "small red"),  # a stop reached: nothing after it, ever
    ],
)
def test_a_tail_that_may_begin_a_stop_sequence_is_held_back_so_no_delta_is_ever_taken_back(texts, answer, want):
    call = ChatCall(EdgeRequest("r1", "describe it", b"x"), stream=True, stop=(" tri", "zzz"))
    stream = ChunkStream(call, "large")
    sent = []
    for t in texts:
        sent += _deltas(stream.grow(t))
        assert " tri" not in "".join(sent) and want.startswith("".join(sent))
    end = stream.end(EdgeResponse(request_id="r1", status="ok", answer=answer, model="large", finish_reason="length"))
    assert "".join(sent + _deltas(end)) == want
    assert end[-1]["choices"][0]["finish_reason"] == ("stop" if " tri" in answer else "length")


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
