"""The live web view's two answers: the page (``GET /ui``) and the state it polls (``GET /ui/state``).

The page (``web_view.html``, next to this module) is one self-contained file, inline CSS and JS,
nothing fetched from elsewhere; it polls ``ui/state?since=<seq>`` once a second and draws the
requests it has not seen. Its Content-Security-Policy allows exactly its own inline script and
style (by SHA-256), ``data:`` images and requests to this origin, and no framing: a question or
an answer that holds markup stays text.

Access: the page holds no data and is served to anyone who reaches the listener (like
``/healthz``); the state is data and needs the API key like ``/v1/`` when one is set. The page
asks for the key, or takes it from the address's fragment (``/ui#key=...``: a fragment is never
sent to a server, so it is in no request line or log); it sends it as ``Authorization: Bearer``.

Knows nothing of sockets or routing (``http_api`` maps the routes); what the requests hold is
``recent``'s.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources
from typing import Any

from msao.edge_runtime.runtime import EdgeRuntime
from msao.engines.mas_render import HEAT_STOPS
from msao.errors import RequestError

__all__ = ["page", "since_from_query", "state"]

@cache
def page() -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """The page's bytes and the headers that go with them (its CSP, no caching, no framing)."""
    html = resources.files("msao.edge_runtime").joinpath("web_view.html").read_text(encoding="utf-8")
    hashes = {}
    for tag in ("script", "style"):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        assert len(blocks) == 1, f"web_view.html must hold exactly one inline <{tag}>"
        hashes[tag] = "'sha256-" + base64.b64encode(hashlib.sha256(blocks[0].encode("utf-8")).digest()).decode() + "'"
    csp = (
        f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; img-src data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    headers = (("Content-Security-Policy", csp), ("X-Frame-Options", "DENY"), ("Cache-Control", "no-store"),
               ("Referrer-Policy", "no-referrer"), ("X-Content-Type-Options", "nosniff"))  # fmt: skip
    return html.encode("utf-8"), headers


def since_from_query(target: str) -> int:
    """The ``since`` of ``/ui/state?since=N`` (0 when absent).

    Raises:
        RequestError: ``bad_request`` when it is not a non-negative integer.
    """
    query = target.partition("?")[2]
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "since":
            if not value.isdigit() or len(value) > 18:
                raise RequestError(f"since must be a non-negative integer (the last seq the page has), got {value[:20]!r}", "bad_request")
            return int(value)
    return 0


def state(runtime: EdgeRuntime, since: int = 0) -> dict[str, Any]:
    """What the page shows: the live estimates and load, and the kept requests newer than ``since``."""
    entries = runtime.recent.since(since)
    return {
        "boot": runtime.recent.boot,
        "health": runtime.health(),
        "cloud_queue_depth": round(runtime.cloud_queue_depth(), 3),
        "workers": runtime.options.workers,
        "queue_size": runtime.options.queue_size,
        "capacity": runtime.recent.capacity,
        "last_seq": entries[-1].seq if entries else since,
        "colour_scale": HEAT_STOPS.astype(int).tolist(),
        "requests": [e.to_dict() for e in entries],
    }
