"""The daemon's HTTP API driven by the official ``openai`` Python client, as Open WebUI or LangChain would.

A real ``EdgeApp`` (built-in bundles exported for real, HTTP on a free port, an API key), no
broker: every answer is the edge's. The client is the one users install; nothing is faked.
"""

from __future__ import annotations

import base64
import socket

import pytest

from msao.edge_runtime.app import EdgeApp
from msao.edge_runtime.config import load_edge_config

openai = pytest.importorskip("openai")  # in the dev extra; `make test` installs it

KEY = "test-key-0123456789"
COLOUR = "what color is the shape?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(edge_bundle_dir, cloud_bundle_dir):
    port = _free_port()
    flags = {"edge.bundle": str(edge_bundle_dir), "edge.large_bundle": str(cloud_bundle_dir), "edge.calibration": "",
             "edge.http": f"127.0.0.1:{port}", "runtime.workers": 1}  # fmt: skip
    with EdgeApp(load_edge_config(None, env={}, flags=flags), api_key=KEY) as app:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30), app


def _image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}


def _colour_case(ds) -> tuple[bytes, str]:
    i = next(i for i in range(200) if ds.questions[i] == COLOUR)
    return ds.image_pngs[ds.image_ids[i]], ds.answers[i]


def test_models_list_names_the_edge_and_large_models(client):
    c, app = client
    ids = [m.id for m in c.models.list()]
    assert ids == [app.runtime.edge.name, app.runtime.large.name]


def test_a_plain_completion_answers_with_usage(client, easyvqa_test):
    c, app = client
    png, answer = _colour_case(easyvqa_test)
    out = c.chat.completions.create(model=ids_first(c), messages=[{"role": "user", "content": [{"type": "text", "text": COLOUR}, _image_part(png)]}])
    assert out.choices[0].message.content == answer and out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens > out.usage.completion_tokens >= 1
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_stream_true_yields_the_answer_in_chunks(client, easyvqa_test):
    c, _ = client
    png, answer = _colour_case(easyvqa_test)
    stream = c.chat.completions.create(
        model=ids_first(c), stream=True, messages=[{"role": "user", "content": [{"type": "text", "text": COLOUR}, _image_part(png)]}]
    )
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == answer
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"


def test_max_tokens_1_finishes_with_length(client, easyvqa_test):
    c, _ = client
    png = easyvqa_test.image_pngs[0]
    out = c.chat.completions.create(
        model=ids_first(c), max_tokens=1, messages=[{"role": "user", "content": [{"type": "text", "text": "what shape is this?"}, _image_part(png)]}]
    )
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 1


def test_a_text_only_turn_is_answered_without_vision_work(client):
    c, _ = client
    out = c.chat.completions.create(model=ids_first(c), messages=[{"role": "user", "content": "what color is the sky?"}])
    ext = out.model_extra["msao"]
    assert ext["status"] == "ok" and out.choices[0].message.content
    assert ext["mas"].get("image_tokens", 0) == 0 and ext["timings_ms"].get("vision", 0) == 0


def test_a_follow_up_turn_reuses_the_earlier_image(client, easyvqa_test):
    c, _ = client
    png, answer = _colour_case(easyvqa_test)
    first = [{"role": "user", "content": [{"type": "text", "text": "what shape is this?"}, _image_part(png)]}]
    out = c.chat.completions.create(model=ids_first(c), messages=first)
    follow = [*first, {"role": "assistant", "content": out.choices[0].message.content}, {"role": "user", "content": COLOUR}]
    again = c.chat.completions.create(model=ids_first(c), messages=follow)
    assert again.choices[0].message.content == answer
    assert again.model_extra["msao"]["image_cached"] is True


def test_a_wrong_key_is_refused_as_openai_reports_it(client):
    _, app = client
    bad = openai.OpenAI(base_url=client[0].base_url, api_key="not-the-key", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def ids_first(c) -> str:
    return c.models.list().data[0].id
