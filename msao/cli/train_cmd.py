"""``msao train``: re-create the built-in models' checkpoints on this CPU (each from its own dataset: easy-VQA or scenes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from msao.cli.common import report_progress
from msao.errors import MissingDependency


def add_arguments(p: argparse.ArgumentParser) -> None:
    from msao.export.builtin import BUILTIN_MODELS

    p.add_argument("--model", choices=[*BUILTIN_MODELS, "all"], default="all", help="which built-in model to train (default all)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write checkpoints under DIR/<name> (default: the package's checkpoints folder, replacing the committed ones)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's, see docs/models.md); fewer steps give a weaker model")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, batches and dropout (default 0)")
    p.add_argument(
        "--stop-at-step", type=int, metavar="N",
        help="end this sitting after step N, keeping the full state in <out>/<name>/resume.pt; the same command without it continues",
    )  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="also save that state every N steps (a killed run resumes from the last one)")


def run(args: argparse.Namespace) -> int:
    try:
        from msao.export.builtin import BUILTIN_MODELS, CHECKPOINT_ROOT
        from msao.export.train import RECIPES, train_builtin
    except ImportError as exc:
        raise MissingDependency(f"training needs the export extra ({exc.name} is missing): pip install 'msao[export]'") from exc
    from dataclasses import replace

    names = list(BUILTIN_MODELS) if args.model == "all" else [args.model]
    root = Path(args.out) if args.out else CHECKPOINT_ROOT
    for name in names:
        options = replace(RECIPES[name], seed=args.seed)
        if args.steps:
            options = replace(options, steps=args.steps)
        if args.checkpoint_every:
            options = replace(options, checkpoint_every=args.checkpoint_every)
        options = replace(options, stop_at_step=args.stop_at_step)
        report_progress(f"training {name}: {options.steps} steps, batch {options.batch_size} (see docs/models.md for the time this takes)")
        report = train_builtin(BUILTIN_MODELS[name], root / name, options, progress=report_progress)
        if not report.complete:
            report_progress(f"{name}: stopped at step {report.steps} after {report.seconds:.0f}s; run the same command to continue")
            continue
        report_progress(f"{name}: {report.params:,} parameters trained in {report.seconds:.0f}s -> {root / name}")
    return 0
