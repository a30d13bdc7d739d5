"""The edge daemon's configuration: one frozen dataclass tree, merged from TOML, then ``MSAO_*``, then flags.

    [edge]                      who this edge is, what it serves
    [broker]                    where the MQTT broker is and how to authenticate
    [runtime]                   admission and workers           (RuntimeOptions)
    [runtime.scheduler]         policy and accuracy/latency trade (SchedulerOptions)
    [runtime.limits]            request size and deadline bounds (RequestLimits)
    [runtime.ewma]              smoothing and link priors        (EwmaOptions)

Every key has exactly one environment variable: ``MSAO_`` + its path in upper case with ``_``
between the parts (``runtime.scheduler.policy`` -> ``MSAO_RUNTIME_SCHEDULER_POLICY``). Unknown
keys in a file are errors; values are checked by each dataclass's ``__post_init__``. The broker
password is never a config key: it is read from ``MSAO_MQTT_PASSWORD`` only, so it stays out of
files, flags, process listings and ``--print-config``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msao.edge_runtime.runtime import RuntimeOptions
from msao.errors import ConfigError

__all__ = ["BrokerSection", "EdgeConfig", "EdgeSection", "env_bool", "load_edge_config", "config_to_toml", "env_name", "toml_reader"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def toml_reader():
    """The TOML parser: ``tomllib`` from Python 3.11, the ``tomli`` backport on 3.10 (JetPack 6, a dependency of msao[edge] there)."""
    try:
        import tomllib  # novermin (guarded: tomli below on 3.10)
    except ImportError:
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib


def env_bool(value: str, name: str = "value") -> bool:
    """The one parser of boolean text: 1/true/yes/on and 0/false/no/off/empty, any case; anything else is an error.

    (A bare ``bool(os.environ[...])`` would read "false" and "0" as True.)
    """
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean; use true/false, 1/0, yes/no or on/off")


@dataclass(frozen=True)
class EdgeSection:
    """Attributes:
    edge_id: this edge's id in topics (``[A-Za-z0-9_-]``).
    bundle: the edge (draft) model's bundle folder.
    large_bundle: the large model's bundle folder on this edge ("" = none: edge-only plans).
    large_on_edge: also run the large model here (local-large and split plans). False is the
        paper's regime, an edge that holds only the small model: the large bundle's manifest and
        tokenizer are read (to name the cloud's model and count its prompt) and none of its
        segments is opened.
    calibration: accuracy tables from ``msao calibrate`` ("" = none: the scheduler never commits drafts).
    http: ``HOST:PORT`` of the OpenAI-compatible HTTP API ("" = off). Its API key is never
        configured here (it would show in ``--print-config``): ``--api-key`` or ``MSAO_API_KEY``.
    cors_origins: origins whose browser pages may call the HTTP API (``https://host:port``, ``*``).
    metrics: ``HOST:PORT`` of the Prometheus listener, ``GET /metrics`` ("" = off; port 0 = any free
        port, logged). Unauthenticated: keep it on loopback, ``127.0.0.1:9464`` (docs/metrics.md).
    mqtt_intake: answer requests on ``msao/v1/edge/<edge_id>/request``.
    threads: ONNX Runtime intra-op threads per request (0 = ONNX Runtime decides).
    image_cache_mb: MiB of image tokens kept per model for images asked about again (follow-up
        questions skip the vision encoder); 0 = off.
    """

    edge_id: str = "edge-1"
    bundle: str = "bundles/msao-tiny-edge"
    large_bundle: str = "bundles/msao-tiny-cloud"
    large_on_edge: bool = True
    calibration: str = "bundles/calibration.json"
    http: str = ""
    cors_origins: tuple[str, ...] = ()
    metrics: str = ""
    mqtt_intake: bool = True
    threads: int = 1
    image_cache_mb: float = 64.0

    def __post_init__(self) -> None:
        from msao.cloud_bridge.topics import check_id

        check_id(self.edge_id, "edge id")
        if self.threads < 0:
            raise ConfigError(f"edge.threads must be >= 0, got {self.threads}")
        if not 0 <= self.image_cache_mb < float("inf"):
            raise ConfigError(f"edge.image_cache_mb must be >= 0 MiB (0 = off), got {self.image_cache_mb}")
        if self.http and (":" not in self.http or not self.http.rsplit(":", 1)[1].isdigit()):
            raise ConfigError(f"edge.http must be HOST:PORT (e.g. 127.0.0.1:8080), got {self.http!r}")
        if self.metrics:
            from msao.prometheus import parse_listen_address

            parse_listen_address(self.metrics, "edge.metrics (--metrics)")


@dataclass(frozen=True)
class BrokerSection:
    """Attributes:
    url: ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT`` ("" = no broker: edge-only, no MQTT intake).
    username: broker user (the password comes from ``MSAO_MQTT_PASSWORD``).
    ca_file / cert_file / key_file: TLS files for ``mqtts://``.
    tls_insecure: skip the host name check (tests only).
    keepalive_s: MQTT keepalive; a dead link is noticed after about 1.5x this.
    """

    url: str = ""
    username: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_insecure: bool = False
    keepalive_s: int = 30

    def __post_init__(self) -> None:
        if self.url:
            from msao.cloud_bridge.mqtt_options import BrokerUrl

            BrokerUrl.parse(self.url)


@dataclass(frozen=True)
class EdgeConfig:
    edge: EdgeSection = field(default_factory=EdgeSection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)


def env_name(path: tuple[str, ...]) -> str:
    return "MSAO_" + "_".join(p.upper() for p in path)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def _leaves(cls, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every scalar key of the tree under ``cls``, with its type."""
    out: dict[tuple[str, ...], Any] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(_leaves(t, (*prefix, f.name)))
        else:
            out[(*prefix, f.name)] = t
    return out


def _coerce(value: Any, t: Any, where: str) -> Any:
    """A TOML value or environment text -> the field's type (bool, int, float, str, tuple[float, ...])."""
    origin = typing.get_origin(t)
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return env_bool(value, where)
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value, 10)
            except ValueError:
                pass
    elif t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif t is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        (item_t, *_rest) = typing.get_args(t)
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            return tuple(_coerce(v.strip() if isinstance(v, str) else v, item_t, where) for v in items if v != "")
    elif origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(t):
            if alt is type(None):
                continue
            try:
                return _coerce(value, alt, where)
            except ConfigError:
                continue
    raise ConfigError(f"{where}: {value!r} is not a valid {getattr(t, '__name__', t)}")


def _build(cls, values: Mapping[tuple[str, ...], Any], prefix: tuple[str, ...] = ()):
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = _build(t, values, path)
        elif path in values:
            kwargs[f.name] = values[path]
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"[{'.'.join(prefix) or 'config'}] {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{'.'.join(prefix) or 'config'}] {exc}") from None


def _flatten_toml(doc: Mapping[str, Any], leaves: dict[tuple[str, ...], Any], source: str) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    sections = {p[:i] for p in leaves for i in range(1, len(p))}

    def walk(d: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for k, v in d.items():
            path = (*prefix, k)
            if isinstance(v, dict) and path in sections:
                walk(v, path)
            elif path in leaves:
                out[path] = _coerce(v, leaves[path], f"{source}: {'.'.join(path)}")
            else:
                known = sorted(".".join(p) for p in leaves if p[: len(prefix)] == prefix)
                raise ConfigError(f"{source}: unknown key {'.'.join(path)!r}; known keys here: {known[:12]}")

    walk(doc, ())
    return out


def load_edge_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None
) -> EdgeConfig:
    """Defaults, then the TOML file at ``path``, then ``MSAO_*`` variables, then ``flags`` (dotted keys -> values).

    Raises:
        ConfigError: an unreadable file, an unknown key, a value of the wrong type or out of range.
    """
    leaves = _leaves(EdgeConfig)
    values: dict[tuple[str, ...], Any] = {}
    if path is not None:
        tomllib = toml_reader()
        try:
            doc = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        values.update(_flatten_toml(doc, leaves, str(path)))
    env = os.environ if env is None else env
    for key, t in leaves.items():
        name = env_name(key)
        if name in env:
            values[key] = _coerce(env[name], t, name)
    for dotted, v in (flags or {}).items():
        key = tuple(dotted.split("."))
        if key not in leaves:
            raise ConfigError(f"unknown config key {dotted!r}")
        if v is not None:
            values[key] = _coerce(v, leaves[key], f"--{key[-1].replace('_', '-')}")
    return _build(EdgeConfig, values)


def config_to_toml(config: EdgeConfig) -> str:
    """The merged configuration as TOML (what ``--print-config`` prints; loads back unchanged)."""
    lines: list[str] = []

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    def section(obj: Any, prefix: tuple[str, ...]) -> None:
        scalars = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj) if not dataclasses.is_dataclass(getattr(obj, f.name))]
        if scalars:
            lines.append(f"[{'.'.join(prefix)}]")
            lines.extend(f"{k} = {fmt(v)}" for k, v in scalars)
            lines.append("")
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                section(v, (*prefix, f.name))

    for f in dataclasses.fields(config):
        section(getattr(config, f.name), (f.name,))
    return "\n".join(lines)
