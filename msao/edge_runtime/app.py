"""The edge daemon assembled from its configuration: models, cloud link, runtime and intakes.

``msao edge`` is ``EdgeApp(config).run_forever()``; the Python API is the same object:

    from msao.edge_runtime.app import EdgeApp
    from msao.edge_runtime.config import load_edge_config

    with EdgeApp(load_edge_config(flags={"broker.url": "mqtt://127.0.0.1:1883"})) as app:
        response = app.ask(open("shape.png", "rb").read(), "what color is the shape?")
        print(response.answer, response.plan, response.answered_by)

Start order: the metrics listener (bound first, so a port in use fails before the models
load; it answers 503 until the runtime exists), the intakes' listeners (HTTP answers 503, the
MQTT intake connects with its Last Will and a retained status ``starting``, holding requests),
verified bundles, then the cloud link (a missing broker is not fatal: the edge serves
edge-only and reconnects in the background), then the runtime, then the intakes serve it (the
status says ``online``). Stop order is the reverse, so no intake accepts a request the runtime
can no longer serve. A start that fails part-way stops what it had started (the status says
``offline``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from msao.edge_runtime.calibration import Calibration, load_calibration
from msao.edge_runtime.config import EdgeConfig
from msao.edge_runtime.local_model import LocalModel
from msao.edge_runtime.requests import EdgeRequest, EdgeResponse, new_request_id
from msao.edge_runtime.runtime import EdgeRuntime
from msao.errors import ConfigError

__all__ = ["EdgeApp"]

log = logging.getLogger(__name__)


class EdgeApp:
    """One edge daemon. ``start``/``stop`` or use as a context manager."""

    def __init__(self, config: EdgeConfig, api_key: str | None = None):
        self.config = config
        self.api_key = api_key if api_key is not None else (os.environ.get("MSAO_API_KEY") or None)  # the HTTP API's Bearer key
        self.runtime: EdgeRuntime | None = None
        self.link = None
        self.mqtt = None
        self.http = None
        self.metrics_listener = None
        self._models: list[LocalModel] = []

    # -- assembly ---------------------------------------------------------------------------

    def _load_models(self) -> tuple[LocalModel, LocalModel | None]:
        from msao.engines.backend_select import AutoBackend
        from msao.engines.bundle import load_bundle
        from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions

        e = self.config.edge
        # TensorRT per segment where `msao build-engines` left a matching engine, else ONNX Runtime (reason logged once).
        backend = AutoBackend(OnnxRuntimeBackend(OrtOptions(threads=e.threads)))
        cache = int(e.image_cache_mb * (1 << 20))
        edge = LocalModel(load_bundle(Path(e.bundle)), backend, image_cache_bytes=cache)
        large = None
        if e.large_bundle:
            path = Path(e.large_bundle)
            if not (path / "manifest.json").exists() and e.large_bundle == type(e)().large_bundle:
                log.warning("no large-model bundle at %s (`make export` writes it): serving edge-only plans", path)
            else:
                large = LocalModel(load_bundle(path), backend, image_cache_bytes=cache, resident=e.large_on_edge)
        self._models = [m for m in (edge, large) if m is not None]
        return edge, large

    def _calibration(self) -> Calibration | None:
        path = self.config.edge.calibration
        if not path:
            return None
        if not Path(path).exists() and path == type(self.config.edge)().calibration:
            log.warning("no calibration at %s (`msao calibrate` or `make export` writes it): drafts are never committed", path)
            return None
        return load_calibration(Path(path))

    def _client_options(self, client_id: str, **kw):
        from msao.cloud_bridge.mqtt_options import ClientOptions, TlsOptions

        b = self.config.broker
        tls = (
            TlsOptions(b.ca_file or None, b.cert_file or None, b.key_file or None, b.tls_insecure)
            if (b.ca_file or b.cert_file or b.tls_insecure)
            else None
        )
        return ClientOptions(
            broker=b.url, client_id=client_id, keepalive_s=b.keepalive_s, tls=tls, username=b.username or None,
            password=os.environ.get("MSAO_MQTT_PASSWORD"), **kw,
        )  # fmt: skip

    def start(self) -> EdgeApp:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> EdgeApp:
        cfg = self.config
        if cfg.edge.metrics:
            from msao.prometheus import MetricsListener, parse_listen_address

            host, port = parse_listen_address(cfg.edge.metrics, "edge.metrics (--metrics)")
            self.metrics_listener = MetricsListener(host, port, "--metrics (edge.metrics)").start()
        if cfg.edge.http:  # bound before the models load: a port in use fails at once, probes see 503 "loading models"
            from msao.edge_runtime.http_api import HttpIntake, HttpOptions

            host, port = cfg.edge.http.rsplit(":", 1)
            options = HttpOptions(api_key=self.api_key, cors_origins=cfg.edge.cors_origins)
            self.http = HttpIntake(None, host, int(port), options).start()
        if cfg.broker.url and cfg.edge.mqtt_intake:  # connected before the models load: the retained status says "starting"
            from msao.edge_runtime.mqtt_intake import MqttIntake

            self.mqtt = MqttIntake(
                None, self._client_options(f"msao-edge-{cfg.edge.edge_id}-intake"), cfg.edge.edge_id, cfg.runtime.limits
            ).start()
        edge, large = self._load_models()
        calibration = self._calibration()
        if cfg.broker.url and large is not None:
            from msao.cloud_bridge.link import CloudLink, LinkOptions

            client = self._client_options(f"msao-edge-{cfg.edge.edge_id}-link")
            # with the intake on, the edge's status is the intake's (it knows readiness); the link's would contradict it
            options = LinkOptions(cfg.edge.edge_id, client, publish_status=self.mqtt is None)
            self.link = CloudLink(options).start(timeout_s=3.0)
        self.runtime = EdgeRuntime(edge, large, self.link, calibration, cfg.runtime).start()
        metrics = self.runtime.metrics
        metrics.add_models(edge.manifest, large.manifest if large is not None else None)
        if self.link is not None:
            link = self.link
            metrics.watch_client("link", lambda: link.client.counters)
        if self.metrics_listener is not None:
            self.metrics_listener.serve(metrics.registry)  # the intakes' counts join as they start
        if self.mqtt is not None:
            self.mqtt.serve(self.runtime)
            intake = self.mqtt
            metrics.watch_mqtt_intake(intake.counters)
            metrics.watch_client("intake", lambda: intake.client.counters)
        if self.http is not None:
            self.http.serve(self.runtime)
        return self

    def stop(self) -> None:
        for intake in (self.http, self.mqtt):
            if intake is not None:
                intake.stop()
        if self.runtime is not None:
            self.runtime.stop()
        if self.link is not None:
            self.link.close()
        for m in self._models:
            m.close()
        if self.metrics_listener is not None:
            self.metrics_listener.stop()

    def __enter__(self) -> EdgeApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_forever(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (by SIGTERM/SIGINT in ``msao edge``)."""
        self.start()
        try:
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()

    # -- the Python API ---------------------------------------------------------------------

    def ask(self, image: bytes, question: str, **fields) -> EdgeResponse:
        """Answer one question about one image (the file's bytes); ``fields`` as in ``EdgeRequest``."""
        if self.runtime is None:
            raise ConfigError("EdgeApp is not started; use `with EdgeApp(config) as app:`")
        request = EdgeRequest(fields.pop("request_id", None) or new_request_id(), question, image, **fields)
        return self.runtime.answer(request)
