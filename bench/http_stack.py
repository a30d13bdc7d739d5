"""Per-request overhead of msao's h11 server vs uvicorn + starlette, side by side (issue: which HTTP stack).

    python bench/http_stack.py [--requests N]     # needs h11; uvicorn + starlette if installed

Serves the same trivial JSON answer from both stacks on loopback and times N keep-alive
requests of one client each (http.client), then one 2 MiB upload with curl -T; prints the
medians, p90s and installed sizes as JSON. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msao.http_server import HttpLimits, HttpServer, Response  # noqa: E402

BODY = json.dumps({"live": True}).encode()


class _App:
    def head(self, request):
        return None if request.method == "POST" else Response(200, BODY)

    def handle(self, request):
        return Response(200, json.dumps({"bytes": len(request.body)}).encode())

    def error(self, request, status, code, message):
        return Response(status, json.dumps({"error": message}).encode())

    def busy(self, request):
        return Response(503, b"{}")

    def served(self, request, response, seconds):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time(port: int, n: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        times.append((time.perf_counter() - t0) * 1e3)
    conn.close()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(b" " * (2 * 1024 * 1024))
        f.flush()
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-T", f.name, "-X", "POST", "-w", "%{time_total}",
                              f"http://127.0.0.1:{port}/upload"], capture_output=True, text=True, check=True)  # fmt: skip
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * len(times))], 3),
            "upload_2mib_ms": round(float(out.stdout) * 1e3, 1)}  # fmt: skip


def _size_mb(*packages: str) -> float:
    total = 0
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        if origin.name != "__init__.py":  # a single-module package
            total += origin.stat().st_size
            continue
        total += sum(p.stat().st_size for p in origin.parent.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return round(total / 1e6, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    n = ap.parse_args().requests
    result = {}
    server = HttpServer("127.0.0.1", 0, _App(), HttpLimits(24 << 20, 64, 30.0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    result["msao-h11"] = {**_time(server.server_address[1], n), "install_mb": _size_mb("h11")}
    server.shutdown()
    if importlib.util.find_spec("uvicorn") and importlib.util.find_spec("starlette"):
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def healthz(request):
            return JSONResponse({"live": True})

        async def upload(request):
            return JSONResponse({"bytes": len(await request.body())})

        app = Starlette(routes=[Route("/healthz", healthz), Route("/upload", upload, methods=["POST"])])
        port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        uv = uvicorn.Server(config)
        threading.Thread(target=uv.run, daemon=True).start()
        while not uv.started:
            time.sleep(0.05)
        sizes = ("uvicorn", "starlette", "h11", "anyio", "click", "idna", "sniffio", "typing_extensions")
        result["uvicorn+starlette"] = {**_time(port, n), "install_mb": _size_mb(*sizes)}
        uv.should_exit = True
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
