"""``msao explain``: the MAS heat-map of one image for one question, as a PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from msao.cli.common import add_bundle_option, add_threads_option


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_bundle_option(p)
    p.add_argument("--image", required=True, metavar="PATH", help="JPEG or PNG file")
    p.add_argument("--question", required=True, help="the question MAS judges the tokens against")
    p.add_argument("--out", required=True, metavar="PNG", help="where to write the heat-map (overwritten)")
    p.add_argument("--keep-ratio", type=float, default=0.25, metavar="R", help="share of image tokens kept, in (0, 1] (default 0.25)")
    p.add_argument("--json", action="store_true", help="also print the MAS values and keep-set as JSON")
    add_threads_option(p)


def run(args: argparse.Namespace) -> int:
    from msao.engines.bundle import load_bundle
    from msao.engines.generation import Generator
    from msao.engines.mas import MasOptions, analyse_mas, combined_score, patch_grid
    from msao.engines.mas_render import heatmap_png, model_view_from_pixels
    from msao.engines.mas_text import mas_question_from_text
    from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    from msao.errors import ImageError

    options = MasOptions(keep_ratio=args.keep_ratio)  # checks the ratio before any model is loaded
    try:
        data = Path(args.image).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {args.image}: {exc.strerror}") from exc
    bundle = load_bundle(args.bundle)
    gen = Generator(bundle, OnnxRuntimeBackend(OrtOptions(threads=args.threads)))
    try:
        pixels = gen.pixels_from_bytes(data)
        enc = gen.encode_image(pixels)
        q = mas_question_from_text(gen, args.question)
        res = analyse_mas(
            enc.mas_features,
            enc.tokens,
            q.embeddings,
            options=options,
            content_words=q.content_words,
            question_tokens=q.question_tokens,
            visual_words=q.visual_words,
        )
    finally:
        gen.close()
    grid = patch_grid(enc.tokens.shape[0], pixels.shape[1], pixels.shape[2])
    view = model_view_from_pixels(pixels, bundle.manifest.preprocess)
    png = heatmap_png(view, combined_score(res.scores, options), res.keep, res.values, grid, question=args.question)
    Path(args.out).write_bytes(png)
    v = res.values
    summary = {
        "out": args.out,
        "mas": {
            "image": round(v.image, 4),
            "text": round(v.text, 4),
            "image_necessity": round(v.image_necessity, 4),
            "drop_image": v.drop_image,
        },
        "kept": res.keep.indices.tolist(),
        "n_tokens": res.keep.n_tokens,
        "content_words": [p for p, c in zip(q.pieces, _content_flags(q.pieces)) if c],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {args.out}: kept {len(summary['kept'])}/{summary['n_tokens']} tokens; "
            f"MAS image {v.image:.2f}, text {v.text:.2f}, image necessity {v.image_necessity:.2f}"
        )
    return 0


def _content_flags(pieces):
    from msao.engines.mas_text import content_token_mask

    return content_token_mask(pieces).tolist()
