"""Option groups shared by several subcommands, defined once."""

from __future__ import annotations

import argparse

__all__ = ["add_bundle_option", "add_threads_option", "Progress"]


def add_bundle_option(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--bundle", required=required, metavar="DIR", help="bundle folder written by `msao export` (hashes are verified on load)"
    )


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2; more threads than cores slows it down)"
    )


def Progress(message: str) -> None:  # noqa: N802
    """Progress lines for long steps (training, export): flushed at once, on stderr."""
    import sys

    print(message, file=sys.stderr, flush=True)
