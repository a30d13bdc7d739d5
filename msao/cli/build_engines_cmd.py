"""``msao build-engines``: a TensorRT engine per segment of a bundle, built on this device.

Checks for TensorRT before anything else, so a machine without it fails at once with what to
install. The build itself is ``engines.engine_builder.build_engines``; this module only turns
flags into ``BuildOptions`` and prints progress.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from msao.cli.common import add_bundle_option, report_progress
from msao.errors import ConfigError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_bundle_option(p)
    p.add_argument(
        "--fp16", action="store_true", help="allow FP16 kernels: faster on Jetson Orin, answers may differ slightly from ONNX Runtime"
    )
    p.add_argument(
        "--workspace", type=int, default=1024, metavar="MB",
        help="builder scratch memory (default 1024 MB); more allows more tactics, and on a Jetson it comes out of the shared RAM",
    )  # fmt: skip
    p.add_argument(
        "--timing-cache", type=Path, metavar="PATH",
        help="timing cache to read and extend (default engines/<target>/timing.cache in the bundle); rebuilds reuse its measurements",
    )  # fmt: skip
    p.add_argument(
        "--max-batch", type=int, default=1, metavar="N", help="largest batch per call (default 1); more batch, more engine memory"
    )
    p.add_argument(
        "--max-seq", type=int, metavar="N",
        help="longest prefill in tokens (default: the model's max positions); more means more activation memory per decoder engine",
    )  # fmt: skip
    p.add_argument(
        "--max-past", type=int, metavar="N", help="longest KV cache in tokens (default: the model's max positions); more KV memory"
    )
    p.add_argument("--opt-seq", type=int, metavar="N", help="prefill length kernels are tuned for (default: image tokens + 16)")
    p.add_argument("--opt-past", type=int, metavar="N", help="KV length decode kernels are tuned for (default: image tokens + 16)")
    p.add_argument(
        "--dim", action="append", default=[], metavar="NAME=MIN:OPT:MAX",
        help="limits of another symbolic dim of the manifest (bundles exported by other tools); repeatable",
    )  # fmt: skip
    p.add_argument("--segments", metavar="NAME,NAME", help="build only these segments (default: all); others keep their engines")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default 0)")
    p.add_argument("--no-op-check", action="store_true", help="skip the static check against TensorRT's published ONNX operator support")


def _dims(specs: list[str]) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    for s in specs:
        m = re.fullmatch(r"([a-z_][a-z0-9_]*)=(\d+):(\d+):(\d+)", s.strip())
        if not m:
            raise ConfigError(f"--dim {s!r}: expected NAME=MIN:OPT:MAX, e.g. --dim frames=1:4:8")
        out.append((m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))))
    return tuple(out)


def run(args: argparse.Namespace) -> int:
    from msao.engines.tensorrt_backend import import_tensorrt

    import_tensorrt()  # first: without TensorRT nothing else is worth doing (MissingDependency says what to install)
    from msao.engines.engine_builder import BuildOptions, build_engines
    from msao.engines.tensorrt_profiles import ProfileLimits

    limits = ProfileLimits(
        max_batch=args.max_batch, max_seq=args.max_seq, max_past=args.max_past, opt_seq=args.opt_seq, opt_past=args.opt_past,
        extra=_dims(args.dim),
    )  # fmt: skip
    options = BuildOptions(
        fp16=args.fp16, workspace_mb=args.workspace, timing_cache=args.timing_cache, limits=limits,
        segments=tuple(s.strip() for s in args.segments.split(",") if s.strip()) if args.segments else (),
        device=args.device, check_ops=not args.no_op_check, verbose=args.verbose > 0,
    )  # fmt: skip
    build_engines(Path(args.bundle), options, progress=report_progress)
    return 0
