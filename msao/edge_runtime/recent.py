"""The last requests the daemon served, kept small for the live web view (``GET /ui``).

The runtime hands every answered request to ``RecentRequests.record`` after the answer went
out (so recording never delays a client). Each entry keeps what the page shows: the plan and
why, the answer and who gave it, timings and bytes, the MAS values, a small thumbnail of the
image *as the encoder saw it* (resized and centre-cropped, so the token grid lies over it) and
the MAS relevance of every image token. The ring is bounded (``capacity`` entries, each
thumbnail at most ``thumb_px`` on its longer side), so a busy daemon holds a few hundred KB.

Knows nothing of HTTP or of how the page draws; ``web_view`` serves what this holds.
"""

from __future__ import annotations

import base64
import io
import itertools
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from msao.edge_runtime.requests import EdgeRequest, EdgeResponse
from msao.engines.images import ImagePreprocess, pixels_from_image
from msao.engines.mas import patch_grid
from msao.engines.mas_render import model_view_from_pixels
from msao.errors import MsaoError

__all__ = ["RecentEntry", "RecentRequests", "TokenHeat"]

_MAX_TEXT = 400  # characters of a question or answer kept (the page is an overview, not a transcript)


@dataclass(frozen=True)
class TokenHeat:
    """MAS relevance per image token on its patch grid (row-major), for drawing over the thumbnail.

    Attributes:
        rows / cols: the encoder's patch grid; ``len(values) == rows * cols``.
        values: MAS relevance of each token (best cosine to the question's content words,
            ``MasScores.relevance``, a cosine in [-1, 1]), rounded to 4 digits.
    """

    rows: int
    cols: int
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1 or len(self.values) != self.rows * self.cols:
            raise ValueError(f"heat grid {self.rows}x{self.cols} does not hold {len(self.values)} values")

    def to_dict(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "values": list(self.values), "max": max(self.values), "min": min(self.values)}


@dataclass(frozen=True)
class RecentEntry:
    """One served request as the web view shows it (``to_dict`` is its JSON)."""

    seq: int  # increasing per daemon; the page asks for entries after the last it has
    at_unix_s: float
    request_id: str
    question: str
    text_only: bool
    response: EdgeResponse
    thumbnail_png: bytes = b""  # b"": no image (a text-only turn) or it could not be drawn
    heat: TokenHeat | None = None  # None: MAS did not run for this request

    def to_dict(self) -> dict:
        r = self.response
        return {
            "seq": self.seq, "at_unix_s": round(self.at_unix_s, 3), "request_id": self.request_id,
            "question": self.question, "text_only": self.text_only, "status": r.status, "error_code": r.error_code,
            "error": r.error[:_MAX_TEXT], "answer": r.answer[:_MAX_TEXT], "confidence": r.confidence,
            "answered_by": r.answered_by, "model": r.model, "plan": r.plan, "reason": r.reason, "fallback": r.fallback,
            "mas": dict(r.mas), "timings_ms": dict(r.timings_ms), "bytes_up": r.bytes_up, "bytes_down": r.bytes_down,
            "image_cached": r.image_cached,
            "thumbnail": "data:image/png;base64," + base64.b64encode(self.thumbnail_png).decode() if self.thumbnail_png else "",
            "heat": self.heat.to_dict() if self.heat is not None else None,
        }  # fmt: skip


@dataclass
class RecentRequests:
    """A thread-safe ring of the last ``capacity`` requests (oldest dropped first).

    Args:
        capacity: entries kept (0 keeps none: recording is then free).
        thumb_px: longer side of a thumbnail in pixels (the model's view is scaled down to it,
            never up).
    """

    capacity: int = 50
    thumb_px: int = 160
    _entries: deque = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _seq: itertools.count = field(default_factory=lambda: itertools.count(1), init=False, repr=False)
    boot: str = field(default_factory=lambda: uuid.uuid4().hex[:12], init=False)  # tells a page that the counter began again

    def __post_init__(self) -> None:
        if self.capacity < 0 or self.thumb_px < 8:
            raise ValueError(f"capacity must be >= 0 and thumb_px >= 8, got {self.capacity}, {self.thumb_px}")
        self._entries = deque(maxlen=self.capacity)

    def record(
        self,
        request: EdgeRequest,
        response: EdgeResponse,
        rgb: np.ndarray | None = None,
        relevance: tuple[float, ...] | None = None,
        preprocess: ImagePreprocess | None = None,
    ) -> None:
        """Keep one served request.

        Args:
            rgb: the decoded image, uint8 (H, W, 3); None for a text-only turn or an image that
                did not decode.
            relevance: MAS relevance per image token (``Outcome.relevance``), None where MAS did not run.
            preprocess: how the model that ran MAS resized and cropped the image (for the
                thumbnail and the token grid); None draws no heat-map.
        """
        if self.capacity == 0:
            return
        thumb, heat = b"", None
        if rgb is not None and preprocess is not None:
            thumb = _thumbnail(rgb, preprocess, self.thumb_px)
            if relevance:
                heat = _heat(relevance, preprocess)
        with self._lock:
            entry = RecentEntry(
                next(self._seq), time.time(), request.request_id, request.question[:_MAX_TEXT], request.text_only, response, thumb, heat
            )
            self._entries.append(entry)

    def since(self, seq: int = 0) -> list[RecentEntry]:
        """Entries newer than ``seq``, oldest first (``since(0)``: all that are kept)."""
        with self._lock:
            return [e for e in self._entries if e.seq > seq]

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._entries[-1].seq if self._entries else 0


def _thumbnail(rgb: np.ndarray, pre: ImagePreprocess, px: int) -> bytes:
    """PNG of the encoder's view of ``rgb`` (resize + centre crop), scaled down to at most ``px``."""
    from PIL import Image

    view = model_view_from_pixels(pixels_from_image(rgb, pre), pre)  # (crop_h, crop_w, 3)
    img = Image.fromarray(view)
    img.thumbnail((px, px))  # only ever shrinks
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _heat(relevance: tuple[float, ...], pre: ImagePreprocess) -> TokenHeat | None:
    try:
        rows, cols, _ = patch_grid(len(relevance), pre.crop_height, pre.crop_width)
    except MsaoError:  # tokens that do not tile the crop (a CLS token kept): no map rather than a wrong one
        return None
    return TokenHeat(rows, cols, tuple(round(float(v), 4) for v in relevance))
