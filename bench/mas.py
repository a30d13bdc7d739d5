"""MAS evidence: accuracy per keep policy and ratio, MAS cost, and the stream workload.

    make bench-mas          # = python bench/mas.py --bundle bundles/msao-tiny-cloud --out bench/results/mas.json
    make bench-mas-scenes   # = python bench/mas.py --dataset scenes --bundle bundles/msao-scenes-cloud ...

1. Accuracy of the bundle on the dataset's test split (easy-VQA: 9,673 questions, scenes: 5,000,
   unless --limit) at each keep ratio (default 100 / 50 / 25 / 12.5 %) for each keep policy
   (mas, mas-blind, random, saliency), through ``evaluate_bundle``: the same per-request path
   as ``msao eval``; the curve accuracy vs keep ratio per policy as a PNG beside the JSON.
2. MAS cost per request, warm, split into question embedding, fused pass (NumPy reference)
   and host part (keep-set, MAS values), as medians next to the vision encoder and the whole
   request, on this CPU.
3. The stream workload (easy-VQA: ``msao.datasets.streams``; scenes: ``scenes.scene_stream``,
   objects moving a few pixels per frame): share of frames whose encoder run was
   skipped, share of tokens not re-sent, and accuracy against re-encoding every frame, with
   all tokens and with MAS at 25 %; the cloud-side mirror is checked against the edge cache.

Sections 4 and 5 (saliency AUC, token/word alignment) read easy-VQA's one-shape images and run
on easy-VQA only. Writes JSON and prints Markdown tables; the load average is recorded because
this machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from msao.datasets.easyvqa import load_easy_vqa
from msao.datasets.scenes import SceneStreamOptions, scene_stream
from msao.datasets.streams import StreamOptions, stream_from_easy_vqa
from msao.datasets.vqa import load_vqa
from msao.engines.bundle import load_bundle
from msao.engines.flops import request_flops
from msao.engines.generation import Generator
from msao.engines.images import pixels_from_image
from msao.engines.keep_policy import KEEP_POLICIES, keep_policy_from_name
from msao.engines.mas import MasOptions, chance_relevance, mas_flops, mas_from_scores, mas_scores_from_tensors
from msao.engines.mas_text import QuestionEmbedder
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from msao.engines.token_cache import StreamTokenCache, TokenCacheOptions, TokenMirror
from msao.evaluation import evaluate_bundle


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def accuracy(bundle, backend, ratios: list[float], policies: list[str], limit: int | None, dataset: str) -> list[dict]:
    rows = []
    for ratio in ratios:
        for policy in [None] if ratio == 1.0 else policies:
            t0 = time.perf_counter()
            rep = evaluate_bundle(bundle, backend, dataset=dataset, limit=limit, keep_policy=policy, keep_ratio=ratio)
            row = {k: v for k, v in asdict(rep).items() if k not in ("bundle", "model_hash", "split", "backend")}
            row["policy"] = policy or "all tokens"
            rows.append(row)
            _log(f"  ratio {ratio:<6g} {row['policy']:<10} accuracy {rep.accuracy:.4f}  ({time.perf_counter() - t0:.0f} s)")
    return rows


def cost(gen: Generator, requests: int, ratio: float, dataset: str) -> dict:
    """Warm per-request timings (medians, ms) of each MAS part next to the encoder and the request."""
    data = load_vqa(dataset, "test")
    embed = QuestionEmbedder(gen)
    options = MasOptions(keep_ratio=ratio)
    for q in data.questions[:50]:  # warm the row cache and the sessions
        embed(q)
    parts: dict[str, list[float]] = {k: [] for k in ("question_ms", "pass_ms", "host_ms", "mas_ms", "vision_ms", "request_ms")}
    for i in range(requests):
        png, question = data.image_pngs[data.image_ids[i]], data.questions[i]
        t0 = time.perf_counter()
        enc = gen.encode_image(gen.pixels_from_bytes(png))
        t1 = time.perf_counter()
        q = embed(question)
        t2 = time.perf_counter()
        scores = mas_scores_from_tensors(enc.mas_features, enc.tokens, q.embeddings, content_words=q.content_words)
        t3 = time.perf_counter()
        res = mas_from_scores(scores, options, question_tokens=q.question_tokens, visual_words=q.visual_words)
        t4 = time.perf_counter()
        gen.generate(enc, question, keep=res.keep.indices)
        t5 = time.perf_counter()
        parts["question_ms"].append((t2 - t1) * 1e3)
        parts["pass_ms"].append((t3 - t2) * 1e3)
        parts["host_ms"].append((t4 - t3) * 1e3)
        parts["mas_ms"].append((t4 - t1) * 1e3)
        parts["vision_ms"].append(enc.vision_ms)
        parts["request_ms"].append((t5 - t0) * 1e3)
    med = {k: round(float(np.median(v)), 4) for k, v in parts.items()}
    med["mas_share_of_vision"] = round(med["mas_ms"] / med["vision_ms"], 4)
    med["mas_share_of_request"] = round(med["mas_ms"] / med["request_ms"], 4)
    med["requests"] = requests
    med["keep_ratio"] = ratio
    info = gen.info
    n = info.image_tokens
    med["mas_flops"] = mas_flops(n, info.vision_hidden_size, info.hidden_size, 2)
    med["request_flops"] = request_flops(gen.bundle.manifest, image_tokens=round(ratio * n), text_tokens=16, new_tokens=2)
    med["mas_share_of_request_flops"] = round(med["mas_flops"] / med["request_flops"], 6)
    med["llava_scale"] = _llava_scale()
    return med


def _llava_scale() -> dict:
    """The NumPy reference at LLaVA-1.5-7B shapes (576 tokens, Dv 1024, D 4096, 5 content words), random inputs."""
    rng = np.random.default_rng(0)
    n, dv, d, m = 576, 1024, 4096, 5
    f = rng.normal(size=(n, dv)).astype(np.float32)
    t = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(m, d)).astype(np.float32)
    times = []
    for _ in range(12):
        t0 = time.perf_counter()
        mas_from_scores(mas_scores_from_tensors(f, t, q, t), MasOptions())
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "shape": [n, dv, d, m],
        "numpy_ms_p50": round(float(np.median(times[2:])), 3),
        "mas_flops": mas_flops(n, dv, d, m, previous=True),
    }


def measure_stream_cache(gen: Generator, options: StreamOptions | SceneStreamOptions, cache_options: TokenCacheOptions, ratio: float) -> dict:
    """Cache vs re-encoding every frame on the stream workload, with all tokens and with MAS keep-sets."""
    stream = scene_stream(options) if isinstance(options, SceneStreamOptions) else stream_from_easy_vqa(options)
    embed = QuestionEmbedder(gen)
    mas = keep_policy_from_name("mas", MasOptions(keep_ratio=ratio))
    cache = StreamTokenCache.for_generator(gen, "bench", cache_options)
    mirror = TokenMirror()
    n = gen.info.image_tokens
    skipped = sent = mirror_mismatch = 0
    # largest patch change per frame, within a scene (easy-VQA frames: noise only or shifted; scenes: objects moving)
    patch_change: dict[str, list[float]] = {"noise_only": [], "shifted": [], "moving": []}
    prev = None
    right = {k: 0 for k in ("reencode_all", "cache_all", "reencode_mas", "cache_mas")}
    same_answer = {"all": 0, "mas": 0}
    payload_bytes = 0
    for f in stream.frames:  # a cut needs no reset: every patch changes, so the cache re-encodes by itself
        step = cache.step(f.pixels)
        if prev is not None and prev.scene == f.scene:
            shift = getattr(f, "shift", None)
            kind = "moving" if shift is None else "noise_only" if shift == prev.shift else "shifted"
            patch_change[kind].append(step.max_patch_change)
        prev = f
        skipped += step.skipped_encoder
        if step.delta is not None:
            sent += step.sent_tokens
            payload_bytes += step.delta.payload_bytes
            table = mirror.apply(step.delta)
            mirror_mismatch += int(not np.array_equal(table, step.encoding.tokens))
        if f.question is None:
            continue
        fresh = gen.encode_image(pixels_from_image(f.pixels, gen.bundle.manifest.preprocess))  # the re-encode-every-frame baseline
        q = embed(f.question)
        answers = {}
        for name, enc in (("reencode", fresh), ("cache", step.encoding)):
            answers[name + "_all"] = gen.generate(enc, f.question).text
            keep = mas.decide(enc.tokens, enc.mas_features, q).keep.indices
            answers[name + "_mas"] = gen.generate(enc, f.question, keep=keep).text
        for k, a in answers.items():
            right[k] += a == f.answer
        same_answer["all"] += answers["reencode_all"] == answers["cache_all"]
        same_answer["mas"] += answers["reencode_mas"] == answers["cache_mas"]
    frames, questions = len(stream), stream.questions
    return {
        "stream": asdict(options),
        "cache": asdict(cache_options),
        "frames": frames,
        "scenes": options.scenes,
        "questions": questions,
        "encoder_skipped_share": round(skipped / frames, 4),
        "tokens_not_resent_share": round(1 - sent / (frames * n), 4),
        "tokens_sent": sent,
        "token_payload_bytes": payload_bytes,
        "token_payload_bytes_if_every_frame_sent": frames * n * gen.info.hidden_size * 4,
        "mirror_mismatches": mirror_mismatch,
        "max_patch_change_pct_0_50_100": {
            k: [round(float(np.percentile(v, q)), 4) for q in (0, 50, 100)] if v else None for k, v in patch_change.items()
        },
        "accuracy": {k: round(v / questions, 4) for k, v in right.items()},
        "identical_answers_share": {k: round(v / questions, 4) for k, v in same_answer.items()},
        "mas_keep_ratio": ratio,
    }


def alignment(gen: Generator, images: int = 300) -> dict:
    """Do image tokens point at the word embeddings of what they show? (What relevance can see.)

    For each easy-VQA colour, the mean cosine between centred foreground image tokens and the
    colour word's embedding, on images of that colour vs images of other colours; foreground
    patches are those with a pixel far from the border colour (the rule used for training labels).
    """
    from msao.export.builtin import ANSWERS

    data = load_easy_vqa("test")
    colours = list(ANSWERS[3:11])
    ids = np.asarray([[gen.tokenizer.token_to_id(w) for w in colours]], np.int64)
    raw = gen.runners["text_embed"].infer({"input_ids": ids})["embeddings"][0].astype(np.float64)  # (8, D)
    words = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    match: dict[str, list[float]] = {c: [] for c in colours}
    other: dict[str, list[float]] = {c: [] for c in colours}
    chance = []
    norms = []
    for im in range(images):
        rgb = data.images[im].astype(np.int32)
        fg_tok = _foreground_tokens(data.images[im])
        if not fg_tok.any():
            continue
        fg = np.abs(rgb - np.median(np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]), axis=0)).sum(-1) > 60
        shown = colours[int(np.argmin(((np.asarray(_COLOUR_RGB) - rgb[fg].mean(0)) ** 2).sum(-1)))]  # (8, 3) -> (8,)
        enc = gen.encode_image(gen.pixels_from_bytes(data.image_pngs[im]))
        norms.append(float(np.linalg.norm(enc.tokens, axis=1).mean()))
        tc = enc.tokens.astype(np.float64) - enc.tokens.mean(0)
        tc /= np.maximum(np.linalg.norm(tc, axis=1, keepdims=True), 1e-12)
        cos = tc[fg_tok] @ words.T  # (F, 8)
        for j, c in enumerate(colours):
            (match if c == shown else other)[c].append(float(cos[:, j].mean()))
        chance.append(chance_relevance(enc.tokens.shape[0], 2, enc.tokens.shape[1]))
    return {
        "images": images,
        "relevance_chance_r0": round(float(np.mean(chance)), 4),
        "image_token_norm_mean": round(float(np.mean(norms)), 3),
        "word_embedding_norm_mean": round(float(np.linalg.norm(raw, axis=1).mean()), 3),
        "per_colour": {
            c: {"same_colour": round(float(np.mean(match[c])), 4), "other_colours": round(float(np.mean(other[c])), 4)}
            for c in colours
            if match[c]
        },
    }


def _foreground_tokens(rgb: np.ndarray, grid: int = 8) -> np.ndarray:
    """bool (grid * grid,): patches holding a pixel far from the border colour (the training-label rule)."""
    a = rgb.astype(np.int32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    fg = np.abs(a - np.median(border, axis=0)).sum(-1) > 60  # (H, W)
    h, w = fg.shape
    return fg.reshape(grid, h // grid, grid, w // grid).any(axis=(1, 3)).reshape(-1)


def saliency_auc(gen: Generator, images: int = 300) -> dict:
    """How well saliency ranks the shape's tokens above the background's, per background estimate.

    Mean per-image ROC AUC (foreground tokens vs the rest) of ||F_i - b||² on the MAS features,
    with b the plain mean, MAS's trimmed mean, or the per-dimension median.
    """
    from msao.engines.mas import mas_scores_from_tensors

    data = load_easy_vqa("test")
    aucs: dict[str, list[float]] = {"plain_mean": [], "trimmed_mean (MAS)": [], "median": []}
    for im in range(images):
        y = _foreground_tokens(data.images[im])
        if y.all() or not y.any():
            continue
        enc = gen.encode_image(gen.pixels_from_bytes(data.image_pngs[im]))
        f = enc.mas_features.astype(np.float64)
        cands = {
            "plain_mean": ((f - f.mean(0)) ** 2).sum(1),
            "trimmed_mean (MAS)": mas_scores_from_tensors(enc.mas_features, enc.tokens, enc.tokens[:1]).saliency,
            "median": ((f - np.median(f, 0)) ** 2).sum(1),
        }
        for k, sal in cands.items():
            rank = sal.argsort().argsort()
            pos, neg = y.sum(), (~y).sum()
            aucs[k].append(float((rank[y].sum() - pos * (pos - 1) / 2) / (pos * neg)))
    return {"images": len(aucs["median"]), "mean_auc": {k: round(float(np.mean(v)), 4) for k, v in aucs.items()}}


# measured mean RGB of each easy-VQA colour, in ANSWERS order (black ... yellow); nearest wins
_COLOUR_RGB = [[36, 36, 36], [33, 33, 253], [174, 65, 65], [138, 138, 138], [33, 253, 33], [253, 33, 33], [26, 140, 141], [254, 254, 21]]


def _markdown(result: dict) -> str:
    lines = []
    rows = result.get("accuracy", [])
    kinds = list(rows[0]["accuracy_by_kind"]) if rows else []  # easy-VQA: shape, colour, yes/no; scenes: the families
    if rows:
        lines += ["| keep ratio | policy | accuracy | " + " | ".join(kinds) + " | kept tokens | MAS ms/request | MAS / encoder | MAS / end-to-end |",
                  "|---|---|---|" + "---|" * len(kinds) + "---|---|---|---|"]  # fmt: skip
    for r in rows:
        k = r["accuracy_by_kind"]
        lines.append(
            f"| {100 * r['keep_ratio']:g} % | {r['policy']} | {r['accuracy']:.4f} | " + "".join(f"{k.get(n, 0):.4f} | " for n in kinds)
            + f"{r['kept_tokens_mean']:.1f} | {r['mas_ms_mean']:.3f} | {100 * r['mas_share_of_vision']:.1f} % | "
            f"{100 * r['mas_share_of_end_to_end']:.2f} % |"
        )
    c = result.get("cost")
    if c:
        lines += ["", "| median per request (ms) | question embedding | fused pass | host part | MAS total | vision encoder | whole request | MAS / encoder | MAS / request |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines.append(
            f"| {c['requests']} requests | {c['question_ms']:.3f} | {c['pass_ms']:.3f} | {c['host_ms']:.3f} | {c['mas_ms']:.3f} | "
            f"{c['vision_ms']:.3f} | {c['request_ms']:.3f} | {100 * c['mas_share_of_vision']:.1f} % | {100 * c['mas_share_of_request']:.2f} % |"
        )
        big = c["llava_scale"]
        lines += [
            "",
            f"MAS FLOPs {c['mas_flops']:,} vs request FLOPs {c['request_flops']:,} ({100 * c['mas_share_of_request_flops']:.3f} %); "
            f"NumPy pass at LLaVA-1.5 shapes {big['shape']}: {big['numpy_ms_p50']} ms ({big['mas_flops']:,} FLOPs)",
        ]
    s = result.get("stream")
    if s:
        a = s["accuracy"]
        lines += ["", "| frames | scenes | questions | encoder skipped | tokens not re-sent | acc. re-encode (all) | acc. cache (all) | acc. re-encode (MAS) | acc. cache (MAS) | mirror mismatches |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines.append(
            f"| {s['frames']} | {s['scenes']} | {s['questions']} | {100 * s['encoder_skipped_share']:.1f} % | {100 * s['tokens_not_resent_share']:.1f} % | "
            f"{a['reencode_all']:.4f} | {a['cache_all']:.4f} | {a['reencode_mas']:.4f} | {a['cache_mas']:.4f} | {s['mirror_mismatches']} |"
        )
    sa = result.get("saliency_auc")
    if sa:
        lines += ["", f"| background estimate ({sa['images']} images) | mean per-image foreground AUC |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sa["mean_auc"].items()]
    al = result.get("alignment")
    if al:
        lines += ["", f"mean norm: image tokens {al['image_token_norm_mean']}, colour-word embeddings {al['word_embedding_norm_mean']}"]
        lines += [
            "",
            f"| colour word | cos with foreground tokens of that colour | of other colours | (r0 = {al['relevance_chance_r0']}) |",
            "|---|---|---|---|",
        ]
        for c, v in al["per_colour"].items():
            lines.append(f"| {c} | {v['same_colour']:+.3f} | {v['other_colours']:+.3f} | |")
    return "\n".join(lines)


def plot_curve(result: dict, path: Path) -> Path:
    """Accuracy vs keep ratio, one line per keep policy, the all-tokens accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["accuracy"]
    full = next((r["accuracy"] for r in rows if r["policy"] == "all tokens"), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for policy in sorted({r["policy"] for r in rows} - {"all tokens"}):
        pts = sorted((r["keep_ratio"], r["accuracy"]) for r in rows if r["policy"] == policy)
        if full is not None:
            pts.append((1.0, full))
        ax.plot([x for x, _ in pts], [100 * y for _, y in pts], marker="o", label=policy)
    if full is not None:
        ax.axhline(100 * full, color="grey", linestyle="--", linewidth=1, label="all tokens")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("share of image tokens kept")
    ax.set_ylabel(f"accuracy on {result.get('dataset', 'easy-vqa')} test (%)")
    ax.set_title(f"{result['bundle']}: accuracy vs keep ratio per keep policy")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="bundles/msao-tiny-cloud")
    p.add_argument("--dataset", default="easy-vqa", choices=("easy-vqa", "scenes"), help="the workload (the bundle's own)")
    p.add_argument("--out", default="bench/results/mas.json")
    p.add_argument("--limit", type=int, help="first N test questions only (default: all; easy-VQA 9,673, scenes 5,000)")
    p.add_argument("--ratios", default="1,0.5,0.25,0.125")
    p.add_argument("--policies", default=",".join(sorted(KEEP_POLICIES)))
    p.add_argument("--cost-requests", type=int, default=1000)
    p.add_argument("--scenes", type=int, default=100, help="scenes of the stream workload")
    p.add_argument("--skip-threshold", type=float, default=TokenCacheOptions.skip_threshold, help="stream cache: encoder skip threshold")
    p.add_argument(
        "--change-threshold", type=float, default=TokenCacheOptions.change_threshold, help="stream cache: token re-send threshold"
    )
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (1 on a shared 2-core box)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: accuracy,cost,saliency,alignment,stream")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.dataset != "easy-vqa":
        skip |= {"saliency", "alignment"}  # they read easy-VQA's one-shape images

    bundle = load_bundle(args.bundle)
    backend = OnnxRuntimeBackend(OrtOptions(threads=args.threads))
    result: dict = {
        "bundle": bundle.manifest.name,
        "dataset": args.dataset,
        "model_hash": bundle.manifest.model_hash,
        "command": "python bench/mas.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "backend": backend.describe(),
        },
        "mas_options": asdict(MasOptions()),
    }
    t0 = time.perf_counter()
    if "accuracy" not in skip:
        _log("accuracy per keep policy and ratio")
        ratios = [float(r) for r in args.ratios.split(",")]
        result["accuracy"] = accuracy(bundle, backend, ratios, args.policies.split(","), args.limit, args.dataset)
    gen = Generator(bundle, backend)
    try:
        if "cost" not in skip:
            _log("MAS cost per request")
            result["cost"] = cost(gen, args.cost_requests, 0.25, args.dataset)
        if "saliency" not in skip:
            _log("saliency AUC per background estimate")
            result["saliency_auc"] = saliency_auc(gen)
        if "alignment" not in skip:
            _log("token / word embedding alignment")
            result["alignment"] = alignment(gen)
        if "stream" not in skip:
            _log("stream workload")
            cache_options = TokenCacheOptions(skip_threshold=args.skip_threshold, change_threshold=args.change_threshold)
            options = SceneStreamOptions(scenes=args.scenes) if args.dataset == "scenes" else StreamOptions(scenes=args.scenes)
            result["stream"] = measure_stream_cache(gen, options, cache_options, 0.25)
    finally:
        gen.close()
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if result.get("accuracy"):
        _log(f"plot: {plot_curve(result, Path(args.out).with_suffix('.png'))}")
    print(_markdown(result))
    _log(f"wrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
