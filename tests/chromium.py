"""Headless Chromium driven over the DevTools protocol on a pipe: no WebDriver, no websocket library.

``--remote-debugging-pipe`` makes Chromium read protocol commands from its fd 3 and write
answers and events to its fd 4, each a JSON message ended by a NUL byte. That is all a test
needs to open a page, evaluate JavaScript in it and take a screenshot.

The browser is the Debian package (``apt-get install chromium``; ``make chromium`` installs it);
``CHROMIUM`` names another binary.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

__all__ = ["Chromium", "chromium_path"]


def chromium_path() -> str | None:
    """The Chromium binary: ``$CHROMIUM``, else ``chromium`` or ``chromium-browser`` on PATH; None when there is none."""
    given = os.environ.get("CHROMIUM")
    if given:
        return shutil.which(given)
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless browser with a fresh profile; ``open`` a page, ``evaluate`` in it, ``screenshot`` it.

    Args:
        binary: from ``chromium_path``.
        width / height: the window, in CSS pixels.
    """

    def __init__(self, binary: str, width: int = 1100, height: int = 900):
        self._profile = tempfile.mkdtemp(prefix="msao-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the browser must find them as fds 3 and 4: moved above 10 first so the dup2 cannot clash (bash, not dash: dash redirects fds 0-9 only)
        high_r, high_w = _above(os.dup(to_browser_r), 10), _above(os.dup(from_browser_w), 10)
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={self._profile}", f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"]  # fmt: skip
        self._proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{high_r} 4>&{high_w} {high_r}<&- {high_w}>&-', "bash", *args],
            pass_fds=(high_r, high_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None if os.environ.get("MSAO_CHROMIUM_LOG") else subprocess.DEVNULL,
        )  # fmt: skip
        for fd in (to_browser_r, from_browser_w, high_r, high_w):
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None

    # -- protocol ----------------------------------------------------------------------------

    def call(self, method: str, params: dict | None = None, timeout_s: float = 60.0, session: bool = True) -> dict[str, Any]:
        """Send one command and wait for its answer (events in between are dropped)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self._session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        end = time.monotonic() + timeout_s
        while True:
            answer = self._read(end)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def _read(self, end: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (status {self._proc.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    # -- pages -------------------------------------------------------------------------------

    def open(self, url: str) -> None:
        """Open ``url`` in a new tab that later calls talk to; returns once it has loaded."""
        target = self.call("Target.createTarget", {"url": url}, session=False)["targetId"]
        self._session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.wait_for("location.href !== 'about:blank' && document.readyState === 'complete'", what=f"{url} loaded")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (a thrown exception raises here)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60.0, what: str = "") -> Any:
        """Poll ``expression`` until its JSON value is truthy (a DOM node comes back as {}: test it with !!); that value.

        Raises:
            TimeoutError: naming ``what``.
        """
        end = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > end:
                raise TimeoutError(f"the page did not show {what or expression} within {timeout_s:.0f} s (last value {value!r})")
            time.sleep(0.1)

    def screenshot(self) -> bytes:
        """PNG of the whole page, as tall as its content."""
        size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        clip = {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})["data"])

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout_s=10.0)
        except (RuntimeError, TimeoutError, OSError):
            pass  # already gone: the wait below reaps it
        try:
            self._proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _above(fd: int, floor: int) -> int:
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, floor)
    os.close(fd)
    return moved
