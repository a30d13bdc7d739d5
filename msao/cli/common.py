"""Option groups shared by several subcommands, defined once."""

from __future__ import annotations

import argparse

__all__ = ["add_broker_options", "add_bundle_option", "add_threads_option", "report_progress"]


def add_bundle_option(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--bundle", required=required, metavar="DIR", help="bundle folder written by `msao export` (hashes are verified on load)"
    )


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2; more threads than cores slows it down)"
    )


def report_progress(message: str) -> None:
    """Progress lines for long steps (training, export): flushed at once, on stderr."""
    import sys

    print(message, file=sys.stderr, flush=True)


def add_broker_options(p, broker_default: str | None, default_note: str = "") -> None:
    """Where the MQTT broker is and how to authenticate; shared by ``msao cloud``, ``msao edge`` and ``msao ask``.

    Args:
        p: a parser or argument group.
        broker_default: default of ``--broker``; None leaves it unset.
        default_note: what happens without ``--broker`` (for the help text).
    """
    default_text = f"default {broker_default}" if broker_default else default_note or "no default"
    p.add_argument(
        "--broker", default=broker_default, metavar="URL", help=f"mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS ({default_text})"
    )
    p.add_argument(
        "--username", metavar="NAME", help="broker user name; the password is read from $MSAO_MQTT_PASSWORD, never from the command line"
    )
    p.add_argument("--ca-file", metavar="PATH", help="mqtts: CA bundle that signed the broker's certificate (default: system CAs)")
    p.add_argument("--cert-file", metavar="PATH", help="mqtts: client certificate, for brokers that require one")
    p.add_argument("--key-file", metavar="PATH", help="mqtts: private key of --cert-file")
    p.add_argument(
        "--tls-insecure", action="store_const", const=True,
        help="mqtts: do not check the broker's host name against its certificate (tests only: allows man-in-the-middle)",
    )  # fmt: skip
    p.add_argument("--keepalive-s", type=int, metavar="S", help="MQTT keepalive (default 30 s); a dead link is noticed after ~1.5x this")
