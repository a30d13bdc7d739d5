"""A TCP proxy that shapes a link: one-way delay, jitter, a bandwidth cap, partitions and cuts.

This kernel has no ``netem``, so delay is added here (``tc tbf`` in a network namespace can cap
bandwidth too; this proxy does both, without root). Used by the benchmark and the tests to put
a real, repeatable network between an edge and the broker:

    edge ──► 127.0.0.1:<proxy port> ──(delay, jitter, rate)──► broker
         ◄──────────────────────────(delay, jitter, rate)──◄

Per direction, bytes are released at the configured rate (a byte-serialising token bucket,
so a 1 MB payload at 8 Mbit/s takes a second) and delivered ``delay ± jitter`` later, never out
of order. ``partition()`` holds all bytes (like a cable pulled: TCP stalls, keepalives fail)
until ``heal()``; ``cut()`` closes every open connection at once (a NAT or broker restart).
Half-close is forwarded after the queued bytes. Runs its own asyncio loop on a thread.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass

__all__ = ["LinkShape", "ShapingProxy", "PROFILES"]


@dataclass(frozen=True)
class LinkShape:
    """What the proxy does to each direction.

    Attributes:
        delay_ms: one-way delay (RTT adds both directions: 10 ms here = 20 ms RTT).
        jitter_ms: uniform ± jitter on each chunk's delay (order is kept).
        bandwidth_bps: rate cap per direction (None = unlimited).
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_bps: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0 or self.jitter_ms > self.delay_ms + 1e-9:
            raise ValueError(f"need 0 <= jitter <= delay, got delay {self.delay_ms}, jitter {self.jitter_ms}")
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ValueError(f"bandwidth must be > 0, got {self.bandwidth_bps}")


# The benchmark's link profiles (RTT = 2 x delay); the paper's setting is paper-200/paper-400.
PROFILES: dict[str, LinkShape] = {
    "paper-200": LinkShape(10.0, 0.0, 200e6),
    "paper-400": LinkShape(10.0, 0.0, 400e6),
    "wifi": LinkShape(5.0, 0.0, 100e6),
    "lte": LinkShape(25.0, 5.0, 20e6),
    "congested": LinkShape(50.0, 15.0, 5e6),
}


class _Direction:
    """One direction of one connection: timed delivery in order."""

    def __init__(self, proxy: ShapingProxy, writer: asyncio.StreamWriter):
        self.proxy = proxy
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        self.free_at = 0.0  # when the serialiser is free
        self.last_delivery = 0.0

    def push(self, data: bytes | None) -> None:
        now = time.monotonic()
        shape = self.proxy.shape
        if data is not None and shape.bandwidth_bps:
            self.free_at = max(now, self.free_at) + 8 * len(data) / shape.bandwidth_bps
            sent = self.free_at
        else:
            sent = now
        delay = shape.delay_ms + (random.uniform(-shape.jitter_ms, shape.jitter_ms) if shape.jitter_ms else 0.0)
        at = max(sent + delay / 1e3, self.last_delivery)
        self.last_delivery = at
        self.queue.put_nowait((at, data))

    async def deliver(self) -> None:
        try:
            while True:
                at, data = await self.queue.get()
                while True:
                    await self.proxy._healed.wait()
                    wait = at - time.monotonic()
                    if wait <= 0:
                        break
                    await asyncio.sleep(wait)
                if data is None:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                self.writer.write(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            return


class ShapingProxy:
    """Forward ``listen`` -> ``target`` with a ``LinkShape``; change it live with ``set_shape``.

    Args:
        target_host / target_port: where connections go (e.g. the broker).
        shape: initial shape. listen_port: 0 = a free port (read ``port`` after ``start``).
    """

    def __init__(
        self, target_host: str, target_port: int, shape: LinkShape = LinkShape(), listen_host: str = "127.0.0.1", listen_port: int = 0
    ):
        self.target = (target_host, target_port)
        self.listen = (listen_host, listen_port)
        self.shape = shape
        self.port = 0
        self.connections_total = 0
        self.bytes_forwarded = {"up": 0, "down": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._healed: asyncio.Event

    # -- control (any thread) ---------------------------------------------------------------

    def start(self) -> ShapingProxy:
        self._thread = threading.Thread(target=self._run, name="shaping-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(5.0):
            raise RuntimeError("shaping proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5.0)

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_shape(self, shape: LinkShape) -> None:
        self.shape = shape

    def partition(self) -> None:
        """Hold every byte in both directions until ``heal`` (connections stay open, as behind a pulled cable)."""
        self._call(lambda: self._healed.clear())

    def heal(self) -> None:
        self._call(lambda: self._healed.set())

    def cut(self) -> None:
        """Close every open connection now (new ones are still accepted)."""
        self._call(self._cut)

    # -- the loop ---------------------------------------------------------------------------

    def _call(self, fn) -> None:
        assert self._loop is not None
        done = threading.Event()

        def run() -> None:
            fn()
            done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5.0)

    def _cut(self) -> None:
        for w in list(self._writers):
            transport = w.transport
            if transport is not None:
                transport.abort()
        self._writers.clear()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._healed = asyncio.Event()
        self._healed.set()
        self._server = loop.run_until_complete(asyncio.start_server(self._accept, *self.listen))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._cut()
            self._server.close()
            pending = asyncio.all_tasks(loop)  # each connection's pumps and deliveries: end them, not leave them pending
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.transport.abort()
            return
        self.connections_total += 1
        for w in (c_writer, s_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._writers.add(w)
        up, down = _Direction(self, s_writer), _Direction(self, c_writer)
        tasks = [
            asyncio.ensure_future(self._pump(c_reader, up, "up")),
            asyncio.ensure_future(self._pump(s_reader, down, "down")),
            asyncio.ensure_future(up.deliver()),
            asyncio.ensure_future(down.deliver()),
        ]
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (c_writer, s_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, direction: _Direction, name: str) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.bytes_forwarded[name] += len(data)
                direction.push(data)
        except (ConnectionError, OSError):
            pass
        direction.push(None)
