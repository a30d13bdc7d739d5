"""A socketserver served on a background thread: bind early, report the real port, stop cleanly.

The HTTP intake and the metrics listener both bind before the models load (a port in use fails
at once, not after a minute of loading) and both must report the port they got when asked for 0;
this is that lifecycle, once.
"""

from __future__ import annotations

import errno
import logging
import socketserver
import threading
from collections.abc import Callable

from msao.errors import ConfigError

log = logging.getLogger(__name__)


class BackgroundListener:
    """Owns one server built by ``make_server()`` and the thread serving it.

    Args:
        host: the bound address as the user wrote it, without IPv6 brackets.
        port: TCP port; 0 picks a free one, readable from ``port`` once started.
        make_server: builds (and so binds) the server; raises OSError when it cannot.
        what: what is served, for messages ("HTTP", "metrics").
        flag: the option that set the address, named when it cannot be bound.
        thread_name: name of the serving thread.
    """

    def __init__(self, host: str, port: int, make_server: Callable[[], socketserver.BaseServer], what: str, flag: str, thread_name: str):
        self.host, self._port = host, port
        self._make_server, self._what, self._flag, self._thread_name = make_server, what, flag, thread_name
        self._server: socketserver.BaseServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port (the real one once started, even when 0 was asked)."""
        return self._server.server_address[1] if self._server is not None else self._port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve; a second call does nothing.

        Raises:
            ConfigError: the address cannot be bound (in use, not local, no permission); names ``flag``.
        """
        if self._server is not None:
            return
        try:
            self._server = self._make_server()
        except OSError as exc:
            why = "; another process listens there (a second daemon or worker on this host?)" if exc.errno == errno.EADDRINUSE else ""
            raise ConfigError(
                f"cannot serve {self._what} on {self.host}:{self._port}: {exc.strerror or exc}{why}; pick another {self._flag} HOST:PORT"
            ) from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name=self._thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Stop accepting; returns whether it was running. Handlers already running finish on their own."""
        if self._server is None:
            return False
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._port = self._server.server_address[1]
        self._server, self._thread = None, None
        return True
