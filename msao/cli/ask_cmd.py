"""``msao ask``: one question about one image, answered by a local bundle."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from msao.cli.common import add_bundle_option, add_threads_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_bundle_option(p)
    p.add_argument("--image", required=True, metavar="PATH", help="JPEG or PNG file")
    p.add_argument("--question", required=True, help="the question, e.g. 'what color is the shape?'")
    p.add_argument("--exit-layer", type=int, help="answer from the early-exit head after this layer")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation bound (default 16)")
    p.add_argument("--json", action="store_true", help="print the whole answer (confidence, timings) as JSON")
    add_threads_option(p)


def run(args: argparse.Namespace) -> int:
    from msao.engines.bundle import LoadBundle
    from msao.engines.generation import Generator
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    from msao.errors import ImageError

    try:
        data = Path(args.image).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {args.image}: {exc.strerror}") from exc
    gen = Generator(LoadBundle(args.bundle), OnnxRuntimeBackend(OrtOptions(threads=args.threads)))
    try:
        ans = gen.answer(data, args.question, exit_layer=args.exit_layer, max_new_tokens=args.max_new_tokens)
    finally:
        gen.close()
    print(json.dumps(asdict(ans)) if args.json else f"{ans.text}  (confidence {ans.confidence:.3f}, {ans.timings.total_ms:.1f} ms)")
    return 0
