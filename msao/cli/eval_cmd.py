"""``msao eval``: accuracy and latency of a bundle on easy-VQA or scenes, on ONNX Runtime."""

from __future__ import annotations

import argparse
import json

from msao.cli.common import add_bundle_option, add_threads_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_bundle_option(p)
    p.add_argument("--dataset", choices=("easy-vqa", "scenes"), default="easy-vqa", help="which questions (default easy-vqa; docs/scenes.md)")
    p.add_argument("--limit", type=int, help="only the first N questions (default: the whole split, e.g. 9,673 easy-VQA test questions)")
    p.add_argument(
        "--split", choices=("test", "validation", "train"), default="test", help="split (default test; validation: scenes only)"
    )
    p.add_argument("--exit-layer", type=int, help="answer from the early-exit head after this decoder layer (cheaper, less accurate)")
    p.add_argument("--json", action="store_true", help="print one JSON object (accuracy, n, latency_ms_p50, ...) instead of a table")
    from msao.engines.keep_policy import KEEP_POLICIES

    p.add_argument(
        "--keep-policy",
        choices=sorted(KEEP_POLICIES),
        help="who picks the image tokens that enter prefill (default: all tokens; 'mas' when --keep-ratio < 1); its time is reported",
    )
    p.add_argument(
        "--keep-ratio",
        type=float,
        default=1.0,
        metavar="R",
        help="share of image tokens kept, in (0, 1] (default 1): lower is faster prefill, possibly less accurate",
    )
    add_threads_option(p)


def run(args: argparse.Namespace) -> int:
    from msao.engines.bundle import load_bundle
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    from msao.evaluation import evaluate_bundle

    bundle = load_bundle(args.bundle)
    if args.exit_layer is not None and args.exit_layer not in bundle.manifest.exit_layers:
        from msao.errors import ConfigError

        raise ConfigError(
            f"bundle {bundle.manifest.name} has exit heads after layers {list(bundle.manifest.exit_layers)}, not {args.exit_layer}"
        )
    report = evaluate_bundle(
        bundle,
        OnnxRuntimeBackend(OrtOptions(threads=args.threads)),
        dataset=args.dataset,
        split=args.split,
        limit=args.limit,
        exit_layer=args.exit_layer,
        keep_policy=args.keep_policy or ("mas" if args.keep_ratio != 1.0 else None),
        keep_ratio=args.keep_ratio,
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        head = f"{report.bundle}" + (f" exit@{report.exit_layer}" if report.exit_layer else "")
        print(f"{head}: accuracy {report.accuracy:.4f} on {report.n} {report.dataset} {report.split} questions")
        for kind, acc in report.accuracy_by_kind.items():
            print(f"  {kind:<8} {acc:.4f}")
        print(f"  FLOPs per request: {report.flops_per_request_mean / 1e6:.1f} M (mean over the questions)")
        if report.keep_policy:
            print(
                f"  keep policy {report.keep_policy} at ratio {report.keep_ratio:g}: {report.kept_tokens_mean:.1f} tokens kept, "
                f"{report.mas_ms_mean:.3f} ms per request = {100 * report.mas_share_of_vision:.1f} % of the vision encoder, "
                f"{100 * report.mas_share_of_end_to_end:.2f} % of end-to-end"
            )
        print(
            f"  latency per request: p50 {report.latency_ms_p50:.2f} ms, p90 {report.latency_ms_p90:.2f} ms, p99 {report.latency_ms_p99:.2f} ms ({report.backend})"
        )
    return 0
