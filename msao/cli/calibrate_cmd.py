"""``msao calibrate``: accuracy and confidence tables of an edge/large model pair on *train* data (easy-VQA or scenes).

The edge daemon's scheduler plans with them (which keep ratio, which plan, when to commit the
edge's draft). Train data only: thresholds tuned on the test set would flatter every number
the benchmark reports. easy-VQA needs the eval extra (its data); scenes are generated here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from msao.cli.common import add_threads_option, report_progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--edge", default="bundles/msao-tiny-edge", metavar="DIR", help="the edge (draft) model's bundle (default bundles/msao-tiny-edge)"
    )
    p.add_argument(
        "--large",
        default="bundles/msao-tiny-cloud",
        metavar="DIR",
        help="the large (cloud) model's bundle (default bundles/msao-tiny-cloud)",
    )
    p.add_argument(
        "--out", default="bundles/calibration.json", metavar="PATH", help="where to write the tables (default bundles/calibration.json)"
    )
    p.add_argument(
        "--questions", type=int, default=2000, metavar="N",
        help="train questions answered by both models at every keep ratio (default 2000, about 8 minutes on 2 cores with the upload forms); fewer = noisier thresholds",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="which train questions (default 0)")
    p.add_argument("--dataset", choices=("easy-vqa", "scenes"), default="easy-vqa", help="whose train questions (default easy-vqa)")
    p.add_argument(
        "--plot", metavar="PNG",
        help="also draw the commit verifier's reliability diagram and commit share per accuracy floor here (needs matplotlib)",
    )  # fmt: skip
    add_threads_option(p)


def run(args: argparse.Namespace) -> int:
    from msao.edge_runtime.calibration import calibrate_models, save_calibration
    from msao.edge_runtime.local_model import LocalModel
    from msao.engines.bundle import load_bundle
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    from msao.errors import ConfigError

    if args.questions < 1:
        raise ConfigError(f"--questions must be >= 1, got {args.questions}")
    backend = OnnxRuntimeBackend(OrtOptions(threads=args.threads))
    edge = LocalModel(load_bundle(Path(args.edge)), backend)
    large = LocalModel(load_bundle(Path(args.large)), backend)
    report_progress(f"calibrating {edge.name} (draft) with {large.name} (verifier) on {args.questions} {args.dataset} train questions")
    cal = calibrate_models(edge, large, dataset=args.dataset, questions=args.questions, seed=args.seed, progress=report_progress)
    save_calibration(cal, Path(args.out))
    for m in cal.models:
        accs = ", ".join(f"{r:g}: {a:.4f}" for r, a in zip(m.keep_ratios, m.accuracy))
        report_progress(f"  {m.name}: train accuracy by keep ratio {accs}")
    pair = cal.pairs[0]
    for line in commit_report(pair) + upload_report(pair):
        report_progress("  " + line)
    if args.plot:
        from msao.edge_runtime.verifier_plot import plot_verifier

        plot_verifier(pair, Path(args.plot))
        report_progress(f"wrote {args.plot}")
    report_progress(f"wrote {args.out}")
    return 0


FLOORS = (0.0, 0.005, 0.01, 0.02)  # accuracy points below the large model's


def commit_report(pair) -> list[str]:
    """Per keep ratio: the share of drafts committed at each accuracy floor, against the oracle's and the old rule's."""
    rule = "verifier" if pair.verifier is not None else "lowest token probability"
    out = []
    if pair.verifier is not None:
        v = pair.verifier
        out.append(
            f"commit verifier (fit on {v.fit_questions} drafts, measured on {v.held_out_questions} held-out questions): "
            f"AUROC {v.auroc:.3f} vs {v.confidence_auroc:.3f} for the lowest token probability; calibration error {v.ece:.3f}"
        )
    for r in pair.keep_ratios:
        a = pair.row(r)
        large = pair.large_accuracy[a]
        oracle = pair.oracle_commit_share[a] if pair.oracle_commit_share else float("nan")
        parts = []
        for f in FLOORS:
            mine = pair.commit_at_floor(r, large - f)
            old = f" (old rule {pair.commit_at_floor(r, large - f, confidence_rule=True):.1%})" if pair.confidence_commit_share else ""
            parts.append(f"-{f * 100:g} pt: {mine:.1%}{old}")
        out.append(f"keep {r:g}: large {large:.4f}, oracle commits {oracle:.1%}; {rule} commits at " + ", ".join(parts))
    return out


def upload_report(pair) -> list[str]:
    """Per upload form and keep ratio: the accuracy change against the file (± its standard error), what the tables charge, the bytes."""
    out = []
    for u in pair.uploads:
        cells = ", ".join(
            f"{r:g}: {100 * d:+.1f} ± {100 * se:.1f} pt (charged {100 * (acc - pair.large_accuracy[pair.row(r)]):+.1f}) {b / 1024:.1f} KiB"
            for r, d, se, acc, b in zip(u.keep_ratios, u.accuracy_delta, u.accuracy_se, u.large_accuracy, u.image_bytes)
        )
        out.append(f"upload {u.form} vs the file, by keep ratio: {cells}; built in {max(u.build_ms):.2f} ms")
    return out
