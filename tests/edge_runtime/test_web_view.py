"""The live web view (``GET /ui``, ``GET /ui/state``) on a real edge runtime: real bundles, real
easy-VQA images, real HTTP, and the page itself in a real headless Chromium.

The MAS heat-map a request shows is checked against a fresh MAS run of the same image and
question on the same model: the relevance must be that request's, not a stand-in.
"""

from __future__ import annotations

import io
import re
import struct

import numpy as np
import pytest

from msao.edge_runtime.http_api import HttpIntake, HttpOptions
from msao.edge_runtime.recent import RecentRequests
from msao.edge_runtime.requests import EdgeRequest, EdgeResponse
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions
from tests.chromium import Chromium, chromium_path
from tests.edge_runtime.test_http_api import CHAT, colour_questions, http_call
from tests.edge_runtime.test_openai_chat import chat_body, data_uri

API_KEY = "web-view-test-key-0123"


@pytest.fixture(scope="module")
def runtime(models):
    options = RuntimeOptions(workers=1, probe_interval_s=0, drain_s=1, mas_always=True, recent_requests=50)
    rt = EdgeRuntime(*models, link=None, calibration=None, options=options).start()
    yield rt
    rt.stop()


@pytest.fixture(scope="module")
def intake(runtime):
    with HttpIntake(runtime, "127.0.0.1", 0, HttpOptions(socket_timeout_s=10, api_key=API_KEY)) as h:
        yield h


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def ask(intake, body: dict) -> dict:
    status, _, out = http_call(intake, "POST", CHAT, body, AUTH)
    assert status == 200, out
    return out


def ui_state(intake, since: int = 0) -> dict:
    status, resp, body = http_call(intake, "GET", f"/ui/state?since={since}", None, AUTH)
    assert status == 200, body
    assert resp.getheader("Cache-Control") == "no-store"
    return body


def entry_for(intake, request_id: str, timeout_s: float = 60.0) -> dict:
    """The state's entry of ``request_id``, polled: the runtime keeps it just after answering."""
    import time

    end = time.monotonic() + timeout_s
    while True:
        found = [r for r in ui_state(intake)["requests"] if r["request_id"] == request_id]
        if found:
            return found[0]
        assert time.monotonic() < end, f"request {request_id} never appeared in /ui/state"
        time.sleep(0.05)


def png_size(data_url: str) -> tuple[int, int]:
    import base64

    png = base64.b64decode(data_url.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", png[16:24])


# -- the page --------------------------------------------------------------------------------------


def test_ui_page_is_one_self_contained_html_file_with_a_strict_csp(intake):
    status, resp, html = http_call(intake, "GET", "/ui")  # no key: the page holds no data
    assert status == 200
    assert resp.getheader("Content-Type") == "text/html; charset=utf-8"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must fetch nothing from elsewhere"
    assert "<script src" not in html and "<link" not in html
    csp = resp.getheader("Content-Security-Policy")
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "frame-ancestors 'none'" in csp
    assert "'unsafe-inline'" not in csp
    assert resp.getheader("X-Frame-Options") == "DENY"


def test_ui_state_needs_the_api_key_like_the_v1_routes(intake):
    status, resp, body = http_call(intake, "GET", "/ui/state")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    assert resp.getheader("WWW-Authenticate") == "Bearer"
    status, _, body = http_call(intake, "GET", "/ui/state", None, {"Authorization": "Bearer wrong-key-123"})
    assert status == 401
    status, _, body = http_call(intake, "GET", "/ui/state?key=" + API_KEY)  # keys never travel in the address
    assert status == 401
    assert http_call(intake, "GET", "/ui/state", None, AUTH)[0] == 200


def test_ui_state_refuses_a_since_that_is_not_a_count(intake):
    status, _, body = http_call(intake, "GET", "/ui/state?since=-1", None, AUTH)
    assert status == 400 and "since must be a non-negative integer" in body["error"]["message"]


def test_ui_state_shows_the_live_estimates_and_the_load(intake, runtime):
    s = ui_state(intake)
    assert s["health"]["link"].keys() >= {"rtt_ms", "bandwidth_mbps", "measured"}
    assert s["health"]["mode"] == "edge-only" and s["cloud_queue_depth"] == 0.0
    assert s["workers"] == 1 and s["queue_size"] == runtime.options.queue_size and s["capacity"] == 50
    assert len(s["colour_scale"]) >= 2 and all(len(c) == 3 for c in s["colour_scale"])


# -- what a request leaves there -------------------------------------------------------------------


def test_a_request_appears_with_its_answer_plan_and_the_mas_relevance_it_computed(intake, runtime, easyvqa_test):
    ds = easyvqa_test
    i = colour_questions(ds, 1)[0]
    png, question = ds.image_pngs[ds.image_ids[i]], ds.questions[i]
    out = ask(intake, chat_body(question, {"url": data_uri(png)}, msao={"request_id": "webview-mas-1", "policy": "edge_only"}))
    e = entry_for(intake, "webview-mas-1")
    assert e["answer"] == out["choices"][0]["message"]["content"] and e["question"] == question
    assert e["plan"] == out["msao"]["plan"] and e["reason"] == out["msao"]["reason"] and e["answered_by"] == "edge"
    assert e["timings_ms"]["total"] == out["msao"]["timings_ms"]["total"]
    assert (e["bytes_up"], e["bytes_down"]) == (out["msao"]["bytes_up"], out["msao"]["bytes_down"])

    # the heat-map is this request's MAS relevance: a fresh MAS run of the same image and question agrees
    rgb, _ = runtime.edge.decode(png, 1 << 30)
    reference = runtime.edge.prepare(rgb, question, 1.0, analyse=True).mas.scores.relevance
    heat = e["heat"]
    assert heat["rows"] * heat["cols"] == runtime.edge.n_tokens == len(heat["values"])
    np.testing.assert_allclose(heat["values"], reference, atol=1e-4, err_msg="heat-map relevance differs from MAS on the same request")
    assert heat["max"] == pytest.approx(float(reference.max()), abs=1e-4)
    w, h = png_size(e["thumbnail"])
    pre = runtime.edge.manifest.preprocess
    assert max(w, h) <= runtime.recent.thumb_px and w * pre.crop_height == h * pre.crop_width  # the encoder's crop, scaled


def test_a_text_only_turn_appears_without_an_image_or_heat_map(intake):
    body = {"model": "msao", "messages": [{"role": "user", "content": "what is a triangle?"}], "msao": {"request_id": "webview-text-1"}}
    out = ask(intake, body)
    e = entry_for(intake, "webview-text-1")
    assert e["text_only"] is True and e["thumbnail"] == "" and e["heat"] is None
    assert e["answer"] == out["choices"][0]["message"]["content"]


def test_ui_state_since_returns_only_newer_requests(intake, easyvqa_test):
    ds = easyvqa_test
    last = ui_state(intake)["last_seq"]
    ask(intake, chat_body(ds.questions[3], {"url": data_uri(ds.image_pngs[ds.image_ids[3]])}, msao={"request_id": "webview-since-1"}))
    entry_for(intake, "webview-since-1")
    newer = ui_state(intake, last)
    assert [r["request_id"] for r in newer["requests"]] == ["webview-since-1"]
    assert ui_state(intake, newer["last_seq"])["requests"] == []


def test_recent_requests_keep_only_the_last_capacity_entries(easyvqa_test):
    from PIL import Image

    from msao.engines.images import ImagePreprocess

    ring = RecentRequests(capacity=3, thumb_px=32)
    rgb = np.asarray(Image.open(io.BytesIO(easyvqa_test.image_pngs[0])).convert("RGB"))
    pre = ImagePreprocess(shortest_edge=64, crop_height=64, crop_width=64)
    for k in range(5):
        ring.record(EdgeRequest(f"ring{k}", "what shape is it?", easyvqa_test.image_pngs[0]), EdgeResponse(f"ring{k}", "ok", answer=str(k)),
                    rgb, tuple(float(v) for v in np.linspace(0, 1, 64)), pre)  # fmt: skip
    kept = ring.since(0)
    assert [e.request_id for e in kept] == ["ring2", "ring3", "ring4"]
    assert [e.seq for e in kept] == [3, 4, 5] and ring.last_seq == 5
    assert kept[-1].heat is not None and (kept[-1].heat.rows, kept[-1].heat.cols) == (8, 8)
    assert max(png_size(kept[-1].to_dict()["thumbnail"])) == 32


# -- the page in a real browser --------------------------------------------------------------------

CHROMIUM = chromium_path()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium, or `make chromium`)")
def test_the_page_in_chromium_shows_a_request_as_it_is_answered(intake, easyvqa_test, tmp_path):
    ds = easyvqa_test
    with Chromium(CHROMIUM) as browser:
        browser.open(f"{intake.url}/ui#key={API_KEY}")
        browser.wait_for("document.getElementById('conn').textContent.startsWith('live')", what="the page connected (live)")
        assert browser.evaluate("location.hash") == "", "the page must drop the key from its address"
        seen = browser.evaluate("document.querySelectorAll('article.req').length")

        i = colour_questions(ds, 2)[1]
        out = ask(intake, chat_body(ds.questions[i], {"url": data_uri(ds.image_pngs[ds.image_ids[i]])},
                                    msao={"request_id": "webview-browser-1", "policy": "edge_only"}))  # fmt: skip
        answer = out["choices"][0]["message"]["content"]
        card = "document.querySelector('article[data-request-id=\"webview-browser-1\"]')"
        shown = browser.wait_for(f"{card} && {card}.querySelector('.answer').textContent", what="the request's answer")
        assert shown == answer
        assert browser.evaluate(f"{card}.querySelector('.q').textContent") == "Q: " + ds.questions[i]
        assert browser.evaluate(f"{card}.querySelector('canvas.image').dataset.tokens") == str(len(entry_for(intake, "webview-browser-1")["heat"]["values"]))
        assert browser.evaluate(f"{card}.querySelector('.legend .bar').style.background").startswith("linear-gradient")
        assert browser.evaluate("document.querySelectorAll('article.req').length") == seen + 1
        assert browser.evaluate("getComputedStyle(document.getElementById('empty')).display") == "none"

        ask(intake, {"model": "msao", "messages": [{"role": "user", "content": "what is a circle?"}], "msao": {"request_id": "webview-browser-2"}})
        text_card = "document.querySelector('article[data-request-id=\"webview-browser-2\"]')"
        browser.wait_for(f"!!({text_card} && {text_card}.querySelector('.noimage'))", what="the text-only turn")
        assert browser.evaluate(f"{text_card}.querySelector('.noimage').textContent") == "text only: no image"
        png = browser.screenshot()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "web-view.png").write_bytes(png)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium, or `make chromium`)")
def test_the_page_in_chromium_says_when_no_request_came_yet_and_asks_for_the_key(models):
    rt = EdgeRuntime(*models, options=RuntimeOptions(workers=1, probe_interval_s=0, drain_s=1, profile_at_start=False)).start()
    try:
        with HttpIntake(rt, "127.0.0.1", 0, HttpOptions(api_key=API_KEY)) as h, Chromium(CHROMIUM) as browser:
            browser.open(f"{h.url}/ui")  # no key given: the page asks for it
            browser.wait_for("document.getElementById('keyform').className === 'show'", what="the API key form")
            browser.evaluate(f"document.getElementById('key').value = '{API_KEY}'; document.getElementById('keyform').requestSubmit(); true")
            browser.wait_for("document.getElementById('conn').textContent.startsWith('live')", what="the page connected (live)")
            assert browser.evaluate("document.querySelectorAll('article.req').length") == 0
            assert browser.evaluate("getComputedStyle(document.getElementById('empty')).display") != "none"
            assert "No requests yet" in browser.evaluate("document.getElementById('empty').textContent")
            assert "edge-only" in browser.evaluate("document.getElementById('live').textContent")
    finally:
        rt.stop()
