"""What a follow-up question saves when the image's tokens come from the image cache (token re-hydration).

    python bench/image_cache.py --bundle bundles/msao-tiny-cloud [--images 50] [--out FILE]

For each of N easy-VQA test images, asks two different questions about the same image bytes
through the edge runtime (edge-only plan, one worker): once with the image cache off, once
with it on, side by side in one run. The first question of each image is encoded either way;
the second is a cache hit only with the cache on. Prints (and writes) the medians of the
vision stage and of the whole request for the follow-ups, cache off vs on. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msao.datasets.easyvqa import load_easy_vqa  # noqa: E402
from msao.edge_runtime.local_model import LocalModel  # noqa: E402
from msao.edge_runtime.requests import EdgeRequest  # noqa: E402
from msao.edge_runtime.runtime import EdgeRuntime, RuntimeOptions  # noqa: E402
from msao.engines.bundle import load_bundle  # noqa: E402
from msao.engines.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions  # noqa: E402


def _pairs(n: int):
    """(image bytes, first question, follow-up question) for n images with two questions each."""
    data = load_easy_vqa("test")
    by_image: dict[int, list[int]] = {}
    for row, image in enumerate(data.image_ids):
        by_image.setdefault(int(image), []).append(row)
    rows = [r for r in by_image.values() if len(r) >= 2][:n]
    return [(data.image_pngs[data.image_ids[a]], data.questions[a], data.questions[b]) for a, b, *_ in rows]


def _run(bundle: Path, cache_bytes: int, pairs, tag: str) -> dict[str, list[float]]:
    model = LocalModel(load_bundle(bundle), OnnxRuntimeBackend(OrtOptions(threads=1)), image_cache_bytes=cache_bytes)
    rt = EdgeRuntime(model, options=RuntimeOptions(workers=1, probe_interval_s=0, profile_at_start=False)).start()
    out: dict[str, list[float]] = {"vision_ms": [], "total_ms": [], "cached": []}
    try:
        for i, (image, first, follow_up) in enumerate(pairs):
            rt.answer(EdgeRequest(f"{tag}-{i}-a", first, image, policy="edge_only"))
            r = rt.answer(EdgeRequest(f"{tag}-{i}-b", follow_up, image, policy="edge_only"))
            assert r.status == "ok", r
            out["vision_ms"].append(r.timings_ms["vision"])
            out["total_ms"].append(r.timings_ms["total"])
            out["cached"].append(float(r.image_cached))
    finally:
        rt.stop()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    pairs = _pairs(args.images)
    off = _run(args.bundle, 0, pairs, "off")
    on = _run(args.bundle, 64 << 20, pairs, "on")
    result = {"bundle": str(args.bundle), "follow_ups": len(pairs)}
    for name, r in (("cache_off", off), ("cache_on", on)):
        result[name] = {
            "vision_ms_p50": round(statistics.median(r["vision_ms"]), 3),
            "total_ms_p50": round(statistics.median(r["total_ms"]), 3),
            "cached_share": sum(r["cached"]) / len(r["cached"]),
        }
    result["vision_saved_ms_p50"] = round(result["cache_off"]["vision_ms_p50"] - result["cache_on"]["vision_ms_p50"], 3)
    result["total_ratio_on_over_off"] = round(result["cache_on"]["total_ms_p50"] / result["cache_off"]["total_ms_p50"], 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
