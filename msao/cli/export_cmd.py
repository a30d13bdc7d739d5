"""``msao export``: a LLaVA, Qwen2-VL or Qwen2.5-VL checkpoint (local folder or built-in name) → a verified bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from msao.cli.common import add_threads_option, report_progress
from msao.errors import MissingDependency


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="built-in name (msao-tiny-edge, msao-tiny-cloud) or a local Hugging Face LLaVA, Qwen2-VL or Qwen2.5-VL folder; "
        "nothing is downloaded",
    )
    p.add_argument("--out", metavar="DIR", help="bundle folder (default bundles/<model-name>); replaced only after every check passes")
    p.add_argument(
        "--split-points",
        metavar="K,K",
        help="decoder layers to cut chunks at, e.g. 8,16 (each is an edge/cloud split candidate; more cuts, more files)",
    )
    p.add_argument(
        "--mas-layer", type=int, help="vision layer whose features the MAS probe reads (default: built-in's, else 1/4 of the depth)"
    )
    p.add_argument(
        "--prompt-template",
        help="prompt with {question} and the image placeholder (default LLaVA-1.5's 'USER: <image>\\n{question} ASSISTANT:')",
    )
    p.add_argument(
        "--check-questions",
        type=int,
        default=200,
        help="questions answered by ONNX and by PyTorch generate, which must agree (default 200)",
    )
    p.add_argument(
        "--check-dataset", choices=("easy-vqa", "scenes"),
        help="where the check questions come from (default: a built-in model's own workload, else easy-vqa); "
        "pick the one whose words the model's tokenizer knows",
    )  # fmt: skip
    p.add_argument(
        "--image-size", metavar="H[xW]", type=_image_size,
        help="Qwen models: the bundle's fixed image grid in pixels, multiples of patch x merge (28) inside the processor's "
        "min/max pixels (default: the processor's size for 448x448, 256 tokens); more pixels, more image tokens to prefill",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=8, help="generation bound in the end-to-end check (default 8)")
    p.add_argument("--profile-repeats", type=int, default=20, help="timed runs per latency-profile point; 0 skips profiling")
    add_threads_option(p)


def _image_size(text: str) -> tuple[int, int]:
    """``448`` or ``336x448`` (height x width) → (H, W)."""
    try:
        parts = [int(x) for x in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts, default=0) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give the image size as H or HxW in pixels, e.g. 448 or 336x448")
    return (parts[0], parts[-1])


def run(args: argparse.Namespace) -> int:
    try:
        from msao.export.exporter import ExportOptions, export_bundle
    except ImportError as exc:
        raise MissingDependency(f"export needs the export extra ({exc.name} is missing): pip install 'msao[export]'") from exc
    split = tuple(int(k) for k in args.split_points.split(",")) if args.split_points else None
    out = Path(args.out) if args.out else Path("bundles") / Path(args.model).name
    options = ExportOptions(
        split_points=split,
        mas_feature_layer=args.mas_layer,
        prompt_template=args.prompt_template,
        check_questions=args.check_questions,
        check_dataset=args.check_dataset,
        max_new_tokens=args.max_new_tokens,
        profile_repeats=args.profile_repeats,
        threads=args.threads,
        image_size=args.image_size,
    )
    export_bundle(args.model, out, options, progress=report_progress)
    return 0
