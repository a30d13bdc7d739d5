"""The numbers of docs/models.md: full easy-VQA test accuracy, FLOPs and latency of every model and exit head.

    python -m bench.models --out bench/results/models.json [--extra NAME=BUNDLE ...]

Runs ``msao eval``'s code path (``evaluate_bundle``) on all 9,673 test questions for each
bundle's full depth and each of its exit heads, one ONNX Runtime thread, and writes one JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from msao.engines.bundle import load_bundle
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    from msao.evaluation import evaluate_bundle

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "models.json"))
    p.add_argument("--bundles", default="bundles/msao-tiny-edge,bundles/msao-tiny-cloud", help="comma-separated bundle folders")
    p.add_argument("--limit", type=int, help="first N test questions only")
    args = p.parse_args(argv)
    backend = OnnxRuntimeBackend(OrtOptions(threads=1))
    rows = []
    for folder in args.bundles.split(","):
        bundle = load_bundle(Path(folder))
        m = bundle.manifest
        for exit_layer in (None, *m.exit_layers):
            t0 = time.perf_counter()
            r = evaluate_bundle(bundle, backend, limit=args.limit, exit_layer=exit_layer)
            row = {"bundle": folder, "model": m.name, "parameters": m.model.parameters, **r.to_dict()}
            rows.append(row)
            head = "full depth" if exit_layer is None else f"exit@{exit_layer}"
            print(f"{m.name:<16} {head:<10} accuracy {r.accuracy:.4f} on {r.n}, p50 {r.latency_ms_p50:.2f} ms, "
                  f"{r.flops_per_request_mean / 1e6:.1f} MFLOPs ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"command": "python -m bench.models " + " ".join(argv or sys.argv[1:]), "rows": rows}, indent=1) + "\n"
    )
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
