"""The ``msao`` command: one entry point, one module per subcommand.

Importing this package must stay cheap and torch-free: subcommands import their heavy
dependencies only when they run, so ``msao --help`` works on an edge install. The benchmark and
its simulation are not subcommands: they run from a checkout (``make bench``, ``make bench-sim``)
because they need ``bench/``, which is not installed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from msao import __version__
from msao.errors import MsaoError

__all__ = ["main"]

# name -> module under msao.cli that defines add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "train": ("train_cmd", "train the built-in easy-VQA models (workstation; needs msao[export])"),
    "export": ("export_cmd", "export a LLaVA checkpoint to a verified ONNX bundle (needs msao[export])"),
    "build-engines": ("build_engines_cmd", "build a TensorRT engine per segment of a bundle, on this device (needs TensorRT)"),
    "eval": ("eval_cmd", "easy-VQA test accuracy and latency of a bundle on ONNX Runtime"),
    "ask": ("ask_cmd", "answer one question about one image, through a running edge daemon (--broker) or a local bundle (--bundle)"),
    "explain": ("explain_cmd", "MAS heat-map of an image for a question, as a PNG (which image tokens a question needs)"),
    "cloud": ("cloud_cmd", "serve bundles to edges over MQTT 5: a cloud worker (ONNX Runtime; needs msao[cloud])"),
    "calibrate": ("calibrate_cmd", "accuracy/confidence tables of the edge and large models on easy-VQA train data, for the scheduler"),
    "edge": ("edge_cmd", "the edge daemon: MQTT/HTTP intake, MAS, adaptive placement, cloud offload (needs msao[edge])"),
}
# subcommands that left the CLI -> where they went, so an old habit gets the fix instead of argparse's list
MOVED = {
    "bench": "the benchmark and its simulation run from a source checkout: `make bench` (python -m bench.run) and "
    "`make bench-sim` (python -m bench.simulate); see docs/benchmarks.md and docs/simulation.md",
}


def _parser() -> argparse.ArgumentParser:
    import importlib

    p = argparse.ArgumentParser(prog="msao", description="Modality Sparsity-Aware Offloading of multimodal LLMs (edge + cloud).")
    p.add_argument("--version", action="version", version=f"msao {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument(
        "--log-format", choices=("text", "json"), default="text",
        help="json: one JSON object per line (time, level, logger, message, request_id, plan, ...) for log shippers",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f"msao.cli.{module}").add_arguments(sp)
        sp.set_defaults(_module=module)
    return p


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record; fields passed as ``extra`` (request_id, plan, ...) become keys."""

    FIELDS = ("request_id", "plan", "answered_by", "latency_ms")

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def main(argv: Sequence[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    moved = next((a for a in argv if a in MOVED), None)
    if moved is not None and moved == next((a for a in argv if not a.startswith("-")), None):
        print(f"msao: `msao {moved}` is no longer a subcommand; {MOVED[moved]}", file=sys.stderr)
        return 2
    parser = _parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    if args.log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLogFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(f"msao.cli.{args._module}").run(args) or 0)
    except MsaoError as exc:
        print(f"msao {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
